"""Choosing which parameters train, by name pattern, the way the methods' papers name them.

diffusers names attention Linears `...attn1.to_q` (self-attention) and `...attn2.to_k` (cross-attention, whose
K/V read the text); the four Linears of an attention block are to_q, to_k, to_v and to_out.0.
"""
from __future__ import annotations

import re

import torch

PATTERNS = {
    # Custom Diffusion / Concept Ablation: the cross-attention projections that read the text embedding
    "xattn_kv": r"attn2\.(to_k|to_v)\.weight$",
    "xattn": r"attn2\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$",
    "attn": r"attn[12]\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$",
    "full": r".*",
}
# peft target modules for LoRA on a diffusers UNet (diffusers' own examples use these four)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def select(module: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Parameter]:
    """Parameters whose names match a named pattern ("xattn_kv", "xattn", "attn", "full") or a regex."""
    rx = re.compile(PATTERNS.get(pattern, pattern))
    chosen = {n: p for n, p in module.named_parameters() if rx.search(n)}
    if not chosen:
        raise ValueError(f"no parameter matches {pattern!r}")
    return chosen


def freeze_all_but(module: torch.nn.Module, chosen: dict[str, torch.nn.Parameter]) -> int:
    """requires_grad only for `chosen`; returns the number of trainable values."""
    ids = {id(p) for p in chosen.values()}
    for p in module.parameters():
        p.requires_grad_(id(p) in ids)
    return sum(p.numel() for p in chosen.values())


def lora_config(rank: int = 4, alpha: float | None = None, targets: list[str] | None = None,
                init: str | bool = "gaussian"):
    """peft LoraConfig for a UNet, as diffusers' training examples make it."""
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets or LORA_TARGETS,
                      init_lora_weights=init)
