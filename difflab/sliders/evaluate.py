"""What sliders do, seen and measured: strips over scales, a contact sheet, diverse generation, and the
oracle's verdict (which factor each slider moves, how often, how diverse the images become)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.report import sheet
from difflab.world.draw import FACTORS

SCALES = (-2.0, -1.0, 0.0, 1.0, 2.0)


@torch.no_grad()
def generate_at(pipe, names: list[str], weights: list[float], prompt: str, n: int, seed: int, start: int = 0,
                fixed=((), ()), end: int | None = None):
    """n images (seeds seed..seed+n-1) with the named sliders at the given weights, applied from step `start`."""
    from difflab.generate import generate_images
    from difflab.sliders.lora import delayed_start
    kw = delayed_start(pipe, names, weights, start, fixed, end)
    images, _ = generate_images(pipe, [prompt], n=n, seed=seed, progress=False, pipe_kwargs=kw)
    return images


def strip_rows(pipe, name: str, prompt: str, seed: int, n_seeds: int = 4, scales=SCALES) -> list[list[Image.Image]]:
    """Rows: seeds; columns: the slider's scale."""
    cols = [generate_at(pipe, [name], [s], prompt, n_seeds, seed) for s in scales]
    return [[cols[j][i] for j in range(len(scales))] for i in range(n_seeds)]


def contact_sheet(pipe, names: list[str], prompt: str, folder: Path, seed: int = 0, scales=SCALES) -> Path:
    """FOLDER/<slider>/strip.png for each slider (4 seeds x the scales) and FOLDER/contact_sheet.png (one row
    per slider: its strip's first seed)."""
    labels = [f"{s:+g}" for s in scales]
    first = []
    for name in names:
        rows = strip_rows(pipe, name, prompt, seed, scales=scales)
        sheet(rows, [f"seed {seed + i}" for i in range(len(rows))], labels).save(Path(folder) / name / "strip.png")
        first.append(rows[0])
    pipe.set_adapters(names, [0.0] * len(names))
    sheet(first, names, labels).save(Path(folder) / "contact_sheet.png")
    return Path(folder) / "contact_sheet.png"


def tv_distance(a: list[str], b: list[str], values: tuple[str, ...]) -> float:
    """Total variation distance between the empirical distributions of two label lists."""
    pa = np.array([a.count(v) for v in values]) / max(1, len(a))
    pb = np.array([b.count(v) for v in values]) / max(1, len(b))
    return float(0.5 * np.abs(pa - pb).sum())


def measure_sliders(pipe, names: list[str], prompt: str, seed: int = 0, n: int = 32, lo: float = -2.0,
                    hi: float = 2.0, oracle=None, progress: bool = False) -> dict:
    """For each slider, images at scale lo and hi over the same n seeds, judged by the oracle. The dominant
    factor is the one whose value distribution moves most (total variation) from lo to hi; `changed` is the
    share of seeds whose dominant factor differs between the two images."""
    from difflab.models import load_oracle
    oracle = oracle or load_oracle()
    per = {}
    for name in names:
        a = oracle.predict(generate_at(pipe, [name], [lo], prompt, n, seed))
        b = oracle.predict(generate_at(pipe, [name], [hi], prompt, n, seed))
        tv = {f: tv_distance([p[f] for p in a], [p[f] for p in b], FACTORS[f][0] + FACTORS[f][1]) for f in FACTORS}
        dom = max(tv, key=tv.get)
        per[name] = {"dominant_factor": dom, "tv": tv, "changed": float(np.mean([x[dom] != y[dom] for x, y in zip(a, b)]))}
    pipe.set_adapters(names, [0.0] * len(names))
    doms = [p["dominant_factor"] for p in per.values()]
    return {"sliders": per, "distinct_dominant_factors": len(set(doms)),
            "min_changed": min(p["changed"] for p in per.values())}


def random_compositions(n: int, num_sliders: int, seed: int, k: int = 2, max_scale: float = 2.0) -> np.ndarray:
    """SliderSpace's diversity mode: per image, k sliders drawn at random with scales ~ U[-max, max] (sparse)."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n, num_sliders))
    for i in range(n):
        pick = rng.choice(num_sliders, size=min(k, num_sliders), replace=False)
        w[i, pick] = rng.uniform(-max_scale, max_scale, size=len(pick))
    return w


@torch.no_grad()
def generate_diverse(pipe, names: list[str], prompt: str, n: int, seed: int = 0, k: int = 2,
                     max_scale: float = 2.0, start: int = 0, fixed=((), ())):
    """n images of `prompt`, image i with its own random sparse slider composition (seed + i as usual)."""
    w = random_compositions(n, len(names), seed, k, max_scale)
    images = [generate_at(pipe, names, list(w[i]), prompt, 1, seed + i, start, fixed)[0] for i in range(n)]
    pipe.set_adapters(names, [0.0] * len(names))
    return images, w


def factor_diversity(preds: list[dict[str, str]]) -> float:
    """Mean pairwise Hamming distance between oracle factor vectors (0 = all the same; 6 = all differ)."""
    keys = list(FACTORS)
    codes = np.array([[FACTORS[f][0].index(p[f]) if p[f] in FACTORS[f][0] else len(FACTORS[f][0]) + 1
                       for f in keys] for p in preds])
    i, j = np.triu_indices(len(codes), 1)
    return float((codes[i] != codes[j]).sum(1).mean())


def shape_confidence(oracle, images) -> np.ndarray:
    """The oracle's softmax probability of its predicted shape: the image is "a shape it recognises" above 0.5."""
    from difflab.world.oracle import to_tensor
    with torch.no_grad():
        logits = oracle(to_tensor(images))["shape"]
    return torch.softmax(logits, -1).max(-1).values.numpy()
