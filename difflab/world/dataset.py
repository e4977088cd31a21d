"""Sampling the shapes world: factors, captions at varied detail, and the fixed base training set.

A caption names a random subset of the factors ("a star", "a red star", "a small red striped star on a white
background at the top left"); an unnamed shape is the generic word "shape" ("a red shape"), the natural anchor
every concept has. Held-out values are drawn into the base training set, but their captions never name them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difflab.world.draw import FACTORS, RESOLUTION, render, values

# How often each factor is named in a base-training caption (a held-out value is never named).
NAME_PROB = {"shape": 0.8, "color": 0.6, "size": 0.4, "texture": 0.4, "background": 0.3, "position": 0.45}
# Each held-out shape is drawn at this weight, each trained shape at 1: held-out shapes stay a modest share
# of the generic "a shape" captions (in the prototype they were half of them, which biased the anchor).
HELDOUT_SHAPE_WEIGHT = 0.3
TEXTURE_WEIGHTS = {"solid": 0.4, "striped": 0.2, "outline": 0.2, "dotted": 0.2}

TRAIN_SEED = 0          # the seed of the shipped model's training set
TRAIN_SIZE = 60_000     # its size; image i is sample(TRAIN_SIZE, TRAIN_SEED)[i]


@dataclass
class Item:
    factors: dict[str, str]
    caption: str
    named: dict[str, str] = field(default_factory=dict)   # the factors the caption names


def caption(factors: dict[str, str], named: set[str]) -> str:
    """The caption naming exactly the factors in `named` (an unnamed shape becomes "shape")."""
    words = ["a"]
    for f in ("size", "color", "texture"):
        if f in named:
            words.append(factors[f])
    words.append(factors["shape"] if "shape" in named else "shape")
    if "background" in named:
        words.append(f"on a {factors['background']} background")
    if "position" in named:
        words.append(f"at the {factors['position']}")
    return " ".join(words)


def _pick(rng: np.random.Generator, options: tuple[str, ...], weights: list[float] | None = None) -> str:
    p = None if weights is None else np.asarray(weights, np.float64) / sum(weights)
    return options[rng.choice(len(options), p=p)]


def sample_item(rng: np.random.Generator, include_heldout: bool = False,
                where: dict[str, str] | None = None, name_prob: dict[str, float] | None = None) -> Item:
    """One random image description. Base-training mode (default) draws held-out values but never names
    them; `include_heldout` draws them like any value and names them; `where` fixes factors (and names them)."""
    where = where or {}
    name_prob = name_prob or NAME_PROB
    factors = {}
    for f in FACTORS:
        opts = values(f)
        if f == "shape":
            w = [1.0] * len(FACTORS[f][0]) + [1.0 if include_heldout else HELDOUT_SHAPE_WEIGHT] * len(FACTORS[f][1])
        elif f == "texture":
            w = [TEXTURE_WEIGHTS[v] for v in opts]
        else:
            w = None
        factors[f] = _pick(rng, opts, w)
    factors.update(where)
    named = {f for f in FACTORS if rng.random() < name_prob[f]}
    named |= set(where)
    heldout = {f for f in FACTORS if factors[f] in FACTORS[f][1]}
    if include_heldout:
        named |= heldout & {"shape"}   # a held-out shape is the subject: always name it
    else:
        named -= heldout
    return Item(factors, caption(factors, named), {f: factors[f] for f in named})


def sample(n: int, seed: int, include_heldout: bool = False, where: dict[str, str] | None = None) -> list[Item]:
    """n descriptions, deterministic in (n, seed, options): item i does not depend on n."""
    rng = np.random.default_rng(seed)
    return [sample_item(rng, include_heldout, where) for _ in range(n)]


def render_array(items: list[Item]) -> np.ndarray:
    """uint8 array (N, R, R, 3) of the rendered items."""
    out = np.empty((len(items), RESOLUTION, RESOLUTION, 3), np.uint8)
    for i, it in enumerate(items):
        out[i] = np.asarray(render(it.factors))
    return out


def training_set(n: int = TRAIN_SIZE, seed: int = TRAIN_SEED) -> list[Item]:
    """The base model's training set. Data attribution enumerates it: image i is always the same image."""
    return sample(n, seed)


def captions(n: int, seed: int = TRAIN_SEED) -> list[str]:
    """n distinct base-training-style captions (no held-out value named), in the order they are drawn: the
    regularisation captions that customize and merge keep the model's behaviour on."""
    rng, out = np.random.default_rng(seed), {}
    for _ in range(1000 * n):
        out.setdefault(sample_item(rng).caption, None)
        if len(out) == n:
            return list(out)
    raise ValueError(f"the world has fewer than {n} distinct captions")


def parse_where(pairs: list[str]) -> dict[str, str]:
    """["shape=heart", "color=red"] -> {"shape": "heart", "color": "red"}, validated against the world."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--where expects FACTOR=VALUE, got {p!r}")
        f, v = (s.strip() for s in p.split("=", 1))
        if f not in FACTORS:
            raise ValueError(f"unknown factor {f!r}; factors are {', '.join(FACTORS)}")
        if v not in values(f):
            raise ValueError(f"unknown {f} {v!r}; expected one of {', '.join(values(f))}")
        out[f] = v
    return out


def parse_prompt(prompt: str, aliases: dict[str, str] | None = None) -> dict[str, str]:
    """The factor values a prompt names. Longest phrases win ("top left" before "left"); an alias maps a token
    such as "<new1>" to a world value ("heart"), so prompts of customized models can be judged."""
    text = " " + prompt.lower() + " "
    for token, value in (aliases or {}).items():
        text = text.replace(token.lower(), " " + value + " ")
    found: dict[str, str] = {}
    phrases = sorted(((v, f) for f in FACTORS for v in values(f)), key=lambda x: -len(x[0]))
    for phrase, f in phrases:
        if f == "background":
            pat = rf"\bon an? {re.escape(phrase)} background\b"
        elif f == "position":
            pat = rf"\b(?:at|in|on) the {re.escape(phrase)}\b"
        else:
            pat = rf"\b{re.escape(phrase)}\b(?! background)"
        m = re.search(pat, text)
        if m and f not in found:
            found[f] = phrase
            text = text[:m.start()] + " " * (m.end() - m.start()) + text[m.end():]
    return found


def write_folder(items: list[Item], out: Path) -> None:
    """PNGs plus metadata.jsonl (file, caption, factors) into an existing folder."""
    with open(out / "metadata.jsonl", "w") as fh:
        for i, it in enumerate(items):
            name = f"{i:06d}.png"
            render(it.factors).save(out / name, optimize=False)
            fh.write(json.dumps({"file": name, "caption": it.caption, "factors": it.factors}) + "\n")
