"""Adapters a pipeline can take on: `DIR[:SCALE]` folders written by difflab's methods.

A folder holding `pytorch_lora_weights.safetensors` is a diffusers LoRA (sliders, peft-trained adapters) and
loads through `pipe.load_lora_weights`, so plain diffusers code can use the same folder. A folder holding
`pytorch_custom_diffusion_weights.safetensors` (or Adobe's `delta.bin`) is a Custom Diffusion / Concept Ablation
result: its K/V matrices are written into the UNet (W0 + SCALE (W - W0)) and its tokens added.
"""
from __future__ import annotations

import math
from pathlib import Path

from difflab.errors import DifflabError

LORA_FILE = "pytorch_lora_weights.safetensors"


def parse_adapter(spec: str, what: str = "adapter") -> tuple[Path, float]:
    """"DIR" or "DIR:SCALE" -> (DIR, SCALE), the scale 1 by default. A folder whose own name holds a colon is taken
    whole; otherwise a scale that is not a finite number is an error, not part of a path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).is_dir():
        try:
            scale = float(tail)
        except ValueError:
            scale = float("nan")
        if not math.isfinite(scale):
            raise DifflabError(f"{what} scale {tail!r} in {spec!r} is not a number (use DIR:SCALE with a finite SCALE, "
                               "e.g. RUN/slider_0:1.5)")
        path = Path(head)
    else:
        path, scale = Path(spec), 1.0
    if not path.is_dir():
        raise DifflabError(f"{what} {path} is not a folder")
    return path, scale


def apply_adapters(pipe, specs: list[str]) -> tuple[list[str], list[float]]:
    """Load every adapter into the pipeline at its scale; returns the LoRA adapters' (names, scales)."""
    names, weights = [], []
    for i, spec in enumerate(specs):
        path, scale = parse_adapter(spec)
        if (path / LORA_FILE).is_file():
            name = f"adapter{i}"
            from difflab.sliders.lora import load_lora
            load_lora(pipe, path, name)
            names.append(name)
            weights.append(scale)
        elif (path / "pytorch_custom_diffusion_weights.safetensors").is_file() or (path / "delta.bin").is_file():
            from difflab.customize import apply_weights
            apply_weights(pipe, path, scale)
        elif any((path / f).is_file() for f in ("erased_embedding_rows.safetensors", "erased_unet.safetensors")):
            from difflab.erase import apply_erased
            apply_erased(pipe, path)
        else:
            raise DifflabError(f"{path} holds no adapter difflab knows ({LORA_FILE}, "
                               "pytorch_custom_diffusion_weights.safetensors or delta.bin)")
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names, weights
