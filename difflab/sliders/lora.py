"""Sliders as peft LoRA adapters on the UNet: creation, saving in the diffusers LoRA format, kohya import,
and inference (several sliders with scales, from step k on).

A slider folder holds `pytorch_lora_weights.safetensors` (diffusers' format, with the LoraConfig in the
safetensors metadata, so `pipe.load_lora_weights(folder)` restores rank and alpha) and `slider_config.json`
(what it was trained on and for). `difflab generate --slider DIR:SCALE` and plain diffusers both load it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from difflab.errors import DifflabError

SLIDER_CONFIG = "slider_config.json"
# peft target_modules as regexes over module paths (robust to class renames); names as in core.params
TARGETS = {
    "xattn_kv": r".*attn2\.(to_k|to_v)$",                      # SliderSpace's default ("xattn-strict")
    "xattn": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "noxattn": r".*attn1\.(to_q|to_k|to_v|to_out\.0)$",        # Concept Sliders' default (self-attention)
    "attn": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
}


def add_sliders(unet, names: list[str], rank: int = 1, alpha: float = 1.0, targets: str = "xattn_kv",
                init: str = "ortho", seed: int = 0) -> dict[str, dict[str, torch.nn.Parameter]]:
    """Inject one LoRA adapter per name; return each one's trainable tensors.

    init "ortho" (SliderSpace's code): B is a fixed random unit direction per layer, frozen, and A (kaiming
    uniform, a=1) trains, so every layer's output moves along one direction that training never rotates.
    init "zero" (Concept Sliders, standard LoRA): B = 0, A kaiming, both train; the slider starts as a no-op.
    """
    from peft import LoraConfig
    if targets not in TARGETS:
        raise DifflabError(f"unknown slider targets {targets!r}; one of {', '.join(TARGETS)}")
    if init not in ("ortho", "zero"):
        raise DifflabError(f"unknown slider init {init!r}: ortho or zero")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        with warnings.catch_warnings():   # several adapters in one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS[targets],
                                        init_lora_weights=True), adapter_name=name)
        params = {}
        for mod_name, mod in unet.named_modules():
            if not hasattr(mod, "lora_A") or name not in mod.lora_A:
                continue
            a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
            with torch.no_grad():
                if init == "ortho":
                    torch.nn.init.kaiming_uniform_(a, a=1, generator=g)
                    q, _ = torch.linalg.qr(torch.randn(b.shape[0], max(b.shape[1], 1), generator=g))
                    b.copy_(q[:, :b.shape[1]])
            params[f"{mod_name}.lora_A.{name}.weight"] = a
            if init == "zero":
                params[f"{mod_name}.lora_B.{name}.weight"] = b
        if not params:
            raise DifflabError(f"no UNet module matches slider targets {targets!r}")
        out[name] = params
    return out


def trainable_flags(unet, sliders: dict[str, dict[str, torch.nn.Parameter]]) -> None:
    """requires_grad exactly on the sliders' trainable tensors (peft's set_adapter re-enables every tensor of
    the active adapter, the frozen B included; call this after switching)."""
    keep = {id(p) for params in sliders.values() for p in params.values()}
    for p in unet.parameters():
        p.requires_grad_(id(p) in keep)


def save_slider(pipe, adapter: str, folder: str | Path, meta: dict) -> Path:
    """One adapter -> FOLDER/pytorch_lora_weights.safetensors (diffusers format + LoraConfig metadata) and
    FOLDER/slider_config.json."""
    from peft.utils import get_peft_model_state_dict
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=adapter).items()}
    cfg = pipe.unet.peft_config[adapter].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    type(pipe).save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=cfg)
    (folder / SLIDER_CONFIG).write_text(json.dumps({**meta, "rank": cfg["r"], "alpha": cfg["lora_alpha"]}, indent=2) + "\n")
    return folder


def import_kohya(pt_file: str | Path, out: str | Path, model="shapes") -> Path:
    """Convert an official kohya-style slider (`slider_i.pt`: lora_down / lora_up / alpha per module) into a
    difflab slider folder. Loaded with weights_only=True (no pickle code runs)."""
    from difflab.core.runs import output_folder
    from difflab.models import load_pipeline
    try:
        state = torch.load(pt_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DifflabError(f"cannot read {pt_file} as a tensor file: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict) or not any(k.endswith("lora_down.weight") for k in state):
        raise DifflabError(f"{pt_file} has no kohya LoRA keys (*.lora_down.weight / *.lora_up.weight / *.alpha)")
    state = {k: v.float() if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in state.items()}
    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    load_lora(pipe, state, "imported", source=str(pt_file))
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
    with output_folder(Path(out)) as tmp:
        save_slider(pipe, "imported", tmp, {"source": str(pt_file), "format": "kohya", "base_model": str(model),
                                             "ranks": sorted(ranks)})
    return Path(out)


def load_lora(pipe, path_or_state, name: str, source: str | None = None) -> None:
    """pipe.load_lora_weights, refusing a file that installs nothing (made for another base model: diffusers only
    warns) or whose shapes do not fit."""
    before = set(pipe.get_list_adapters().get("unet", [])) if hasattr(pipe, "get_list_adapters") else set()
    src = source or str(path_or_state)
    try:
        pipe.load_lora_weights(path_or_state, adapter_name=name)
    except Exception as e:
        raise DifflabError(f"slider/LoRA {src} does not fit this model (made for another base model?): "
                           f"{str(e).splitlines()[0][:200]}") from e
    if name not in set(pipe.get_list_adapters().get("unet", [])) - before:
        raise DifflabError(f"slider/LoRA {src} matches no module of this model's UNet (made for another base model?)")


def load_sliders(pipe, specs: list[str], prefix: str = "slider") -> tuple[list[str], list[float]]:
    """Load slider folders as adapters named prefix0, prefix1, ...; returns (names, scales), all inactive."""
    from difflab.adapters import parse_adapter
    names, scales = [], []
    for i, spec in enumerate(specs):
        path, scale = parse_adapter(spec, "slider")
        name = f"{prefix}{i}"
        load_lora(pipe, path, name)
        names.append(name)
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=[0.0] * len(names))
    return names, scales


def delayed_start(pipe, names: list[str], scales: list[float], start: int = 0,
                  fixed: tuple[list[str], list[float]] = ((), ()), end: int | None = None) -> dict:
    """Pipeline kwargs that apply the sliders from denoising step `start` on (steps before keep the base model's
    layout: Concept Sliders' `start_noise`), and, with `end`, only before step `end` (a window; on the shapes
    model size is settled late, so an early end loses it: docs/BENCHMARKS.md, sliders, session 11). The callback
    fires after a step, so it switches after step start-1 (and end-1). `fixed` adapters (other LoRAs) stay on
    at their weights throughout."""
    fn, fw = list(fixed[0]), list(fixed[1])
    pipe.set_adapters(fn + list(names), adapter_weights=fw + (list(scales) if start <= 0 else [0.0] * len(names)))
    if start <= 0 and end is None:
        return {}

    def on_step_end(p, i, t, kwargs):
        if i == start - 1:
            p.set_adapters(fn + list(names), adapter_weights=fw + list(scales))
        if end is not None and i == end - 1:
            p.set_adapters(fn + list(names), adapter_weights=fw + [0.0] * len(names))
        return kwargs
    return {"callback_on_step_end": on_step_end}
