"""The shapes world: a procedural captioned dataset with known factors, its oracle, and its shipped models."""
from __future__ import annotations

from pathlib import Path

from difflab.world.draw import FACTORS, RESOLUTION, render, values
from difflab.world.dataset import Item, parse_prompt, sample, training_set
from difflab.world.oracle import Oracle, judge, judge_folder

__all__ = ["FACTORS", "RESOLUTION", "render", "values", "Item", "sample", "training_set", "parse_prompt",
           "Oracle", "judge", "judge_folder", "info", "sample_folder"]


def info() -> dict:
    """{"factors": {name: {"trained": [...], "heldout": [...]}}, "resolution": R}"""
    return {"factors": {f: {"trained": list(t), "heldout": list(h)} for f, (t, h) in FACTORS.items()},
            "resolution": RESOLUTION}


def sample_folder(out, n: int, seed: int = 0, include_heldout: bool = False, where: list[str] = ()) -> Path:
    """Write n sampled images and metadata.jsonl (file, caption, factors) into `out`, atomically."""
    from difflab.core.runs import output_folder
    from difflab.errors import DifflabError
    from difflab.world.dataset import parse_where, write_folder
    try:
        fixed = parse_where(list(where))
    except ValueError as e:
        raise DifflabError(str(e)) from e
    held = any(v in FACTORS[f][1] for f, v in fixed.items())
    items = sample(n, seed, include_heldout=include_heldout or held, where=fixed)
    with output_folder(Path(out)) as tmp:
        write_folder(items, tmp)
    return Path(out)
