"""The oracle: a small CNN that reads every factor of a shapes-world image from its pixels.

It knows the ground truth of the world (held-out values included), so it is the judge of every method:
`judge(images, prompts)` checks each image against the factor values its prompt names.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from difflab.world.draw import FACTORS, values


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class Oracle(ModelMixin, ConfigMixin):
    """Image (B, 3, 32, 32) in [-1, 1] -> one logit vector per factor. Saved like any diffusers model."""

    @register_to_config
    def __init__(self, factors: dict[str, list[str]] | None = None, width: int = 16, resolution: int = 32):
        super().__init__()
        factors = factors or {f: list(values(f)) for f in FACTORS}
        self.factor_values = factors
        w = width
        self.features = nn.Sequential(_block(3, w), nn.AvgPool2d(2), _block(w, 2 * w), nn.AvgPool2d(2),
                                      _block(2 * w, 4 * w), nn.AvgPool2d(2), nn.Flatten(),
                                      nn.Linear(4 * w * (resolution // 8) ** 2, 256), nn.SiLU())
        self.heads = nn.ModuleDict({f: nn.Linear(256, len(v)) for f, v in factors.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {f: head(h) for f, head in self.heads.items()}

    def readings(self, x: torch.Tensor) -> torch.Tensor:
        """Per factor the softmax over its values, concatenated in sorted factor order: (B, sum of value counts)."""
        logits = self(x)
        return torch.cat([logits[f].softmax(-1) for f in sorted(logits)], 1)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 500) -> list[dict[str, str]]:
        """Factor values of each image (PIL images, a uint8 array (N, H, W, 3), or a [-1, 1] tensor)."""
        x = to_tensor(images).to(self.device, self.dtype)
        self.eval()
        preds = {f: [] for f in self.factor_values}
        for i in range(0, len(x), batch_size):
            for f, logits in self(x[i:i + batch_size]).items():
                preds[f].append(logits.argmax(-1).cpu())
        idx = {f: torch.cat(v).tolist() for f, v in preds.items()}
        return [{f: self.factor_values[f][idx[f][i]] for f in self.factor_values} for i in range(len(x))]


def to_tensor(images) -> torch.Tensor:
    """PIL images / uint8 arrays (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1]."""
    if torch.is_tensor(images):
        return images.float()
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def judge(predictions: list[dict[str, str]], named: list[dict[str, str]]) -> dict:
    """Score predictions against the factors each prompt names.

    accuracy[f]: share right among images whose prompt names f; joint: share with every named factor right
    (over images whose prompt names at least one); rates[f][v]: how often the oracle sees value v.
    """
    n = len(predictions)
    acc, joint_hits, joint_n = {}, 0, 0
    for f in FACTORS:
        idx = [i for i in range(n) if f in named[i]]
        if idx:
            acc[f] = sum(predictions[i][f] == named[i][f] for i in idx) / len(idx)
    for p, want in zip(predictions, named):
        if want:
            joint_n += 1
            joint_hits += all(p[f] == v for f, v in want.items())
    rates = {f: {v: sum(p[f] == v for p in predictions) / max(1, n) for v in values(f)} for f in FACTORS}
    return {"n": n, "accuracy": acc, "joint": joint_hits / joint_n if joint_n else None, "rates": rates}


def parse_aliases(pairs: list[str]) -> dict[str, str]:
    """["<new1>=heart"] -> {"<new1>": "heart"}; the value must be a value of some factor."""
    from difflab.errors import DifflabError
    out = {}
    for p in pairs:
        tok, _, val = p.partition("=")
        if not tok.strip() or not val.strip():
            raise DifflabError(f"--alias expects TOKEN=VALUE (e.g. \"<new1>=heart\"), got {p!r}")
        if not any(val.strip() in values(f) for f in FACTORS):
            raise DifflabError(f"alias value {val.strip()!r} is no value of the shapes world")
        out[tok.strip()] = val.strip()
    return out


def judge_folder(folder, oracle: "Oracle | None" = None, aliases: dict[str, str] | None = None) -> dict:
    """Judge every image of a folder against its prompt; write judge.json (scores) and judge.jsonl
    (each image's predicted factors). The scores are returned."""
    from pathlib import Path

    from difflab.core.data import load_folder_images, read_metadata, text_of
    from difflab.core.runs import atomic_write_json
    from difflab.world.dataset import parse_prompt
    folder = Path(folder)
    records = read_metadata(folder)
    if oracle is None:
        from difflab.models import load_oracle
        oracle = load_oracle()
    images = load_folder_images(folder, records, size=oracle.config.resolution)
    preds = oracle.predict(images)
    named = [parse_prompt(text_of(r), aliases) for r in records]
    result = judge(preds, named)
    with open(folder / ".judge.jsonl.tmp", "w") as fh:
        for r, p in zip(records, preds):
            fh.write(json.dumps({"file": r["file"], "factors": p}) + "\n")
    (folder / ".judge.jsonl.tmp").replace(folder / "judge.jsonl")
    atomic_write_json(folder / "judge.json", result)
    return result
