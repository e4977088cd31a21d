"""The shapes model's quality, measured by the oracle: the prompt sets behind the foundation's bars."""
from __future__ import annotations

import numpy as np

from difflab.world.dataset import parse_prompt
from difflab.world.draw import FACTORS
from difflab.world.oracle import judge


def prompt_sets(seed: int = 0, per_set: int = 36) -> dict[str, list[str]]:
    """color_shape: every "a {color} {shape}" over trained values; size / position: random trained
    combinations that also name the size or the position; heldout: prompts naming a held-out shape."""
    rng = np.random.default_rng(seed)
    tr = {f: FACTORS[f][0] for f in FACTORS}

    def pick(f):
        return tr[f][rng.integers(len(tr[f]))]
    return {
        "color_shape": [f"a {c} {s}" for c in tr["color"] for s in tr["shape"]],
        "size": [f"a {pick('size')} {pick('color')} {pick('shape')}" for _ in range(per_set)],
        "position": [f"a {pick('color')} {pick('shape')} at the {pick('position')}" for _ in range(per_set)],
        "heldout": [f"a {c} {s}" for s in FACTORS["shape"][1] for c in ("",) + tr["color"]],
    }


def evaluate(pipe, oracle, n: int = 4, seed: int = 10_000, steps: int = 25, guidance: float = 5.0,
             progress: bool = False, sets: dict[str, list[str]] | None = None) -> dict:
    """Generate n images per prompt of each set (seeds never used in training) and judge them.
    Returns {set: judge-result} plus the images and prompts under "_images"."""
    from difflab.generate import generate_images
    sets = sets or prompt_sets()
    out, keep = {}, {}
    for name, prompts in sets.items():
        prompts = [" ".join(p.split()) for p in prompts]
        images, records = generate_images(pipe, prompts, n=n, seed=seed, steps=steps, guidance=guidance,
                                          progress=progress)
        preds = oracle.predict(images)
        out[name] = judge(preds, [parse_prompt(r["prompt"]) for r in records])
        keep[name] = (images, records, preds)
    out["_images"] = keep
    return out


def headline(res: dict) -> dict[str, float]:
    """The numbers the foundation's bars are about, flat."""
    return {
        "color_shape.shape": res["color_shape"]["accuracy"]["shape"],
        "color_shape.color": res["color_shape"]["accuracy"]["color"],
        "color_shape.joint": res["color_shape"]["joint"],
        "size.size": res["size"]["accuracy"]["size"],
        "position.position": res["position"]["accuracy"]["position"],
        "heldout.shape": res["heldout"]["accuracy"]["shape"],
    }


BARS = {"color_shape.shape": (">=", 0.90), "color_shape.color": (">=", 0.90), "color_shape.joint": (">=", 0.80),
        "size.size": (">=", 0.75), "position.position": (">=", 0.75), "heldout.shape": ("<=", 0.20)}
