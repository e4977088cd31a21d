"""Text conditioning for training, SD 1.x/2.x and SDXL alike, with gradients reaching token embeddings.

diffusers' `encode_prompt` runs under no_grad-friendly code paths and returns CFG pairs; training needs the
plain conditional embeddings, differentiable (Custom Diffusion and Concept Ablation train token rows), plus
SDXL's pooled text embedding and size ids.
"""
from __future__ import annotations

import torch


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def tokenizers_and_encoders(pipe) -> list[tuple]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def pipeline_modules(pipe) -> list:
    """The modules a training loss on a pipeline may run (UNet, VAE, text encoders): `train` moves them all to
    its device together, so no step mixes devices, and puts them back afterwards."""
    return [pipe.unet, pipe.vae] + [te for _, te in tokenizers_and_encoders(pipe)]


def encode(pipe, prompts: list[str], resolution: int | None = None):
    """(encoder_hidden_states, added_cond_kwargs or None) for a batch of prompts."""
    # (diffusers' `.device` walks the module's hooks: milliseconds per call, which a training step notices)
    device = next(pipe.text_encoder.parameters()).device
    if not is_sdxl(pipe):
        tok = pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        return pipe.text_encoder(ids)[0], None
    hidden, pooled = [], None
    for tok, te in tokenizers_and_encoders(pipe):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])   # SDXL conditions on the penultimate layer
        pooled = out[0] if out[0].ndim == 2 else pooled   # text_embeds of the projection model
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=hidden[0].dtype, device=device)
    return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}


def encode_deduplicated(pipe, prompts: list[str], needs_grad=lambda p: True, resolution: int | None = None,
                        cache: dict | None = None):
    """`encode` for a batch with repeated prompts: each distinct prompt runs through the text encoder(s) once,
    and without autograd where `needs_grad(prompt)` is false (e.g. class prompts, which hold no trained token).
    With `cache` (a dict the caller keeps for one training run) those prompts' embeddings are computed once per
    device and reused: they cannot change while only token rows they do not contain train.
    Same result as `encode(pipe, prompts)`, at a fraction of the text-encoder cost of a training step."""
    uniq = list(dict.fromkeys(prompts))
    grad = [p for p in uniq if needs_grad(p)]
    rest = [p for p in uniq if not needs_grad(p)]
    parts = []
    if grad:
        parts.append(encode(pipe, grad, resolution))
    if rest:
        parts.append(_encode_frozen(pipe, rest, resolution, cache))
    hidden = torch.cat([h for h, _ in parts])
    row = {p: i for i, p in enumerate(grad + rest)}
    index = torch.tensor([row[p] for p in prompts], device=hidden.device)
    add = None
    if parts[0][1] is not None:
        add = {k: torch.cat([a[k] for _, a in parts])[index] for k in parts[0][1]}
    return hidden[index], add


def _encode_frozen(pipe, prompts: list[str], resolution: int | None, cache: dict | None):
    """`encode` without autograd, through `cache` ((prompt, device) -> one prompt's outputs) when given."""
    if cache is None:
        with torch.no_grad():
            return encode(pipe, prompts, resolution)
    device = next(pipe.text_encoder.parameters()).device
    missing = [p for p in prompts if (p, device) not in cache]
    if missing:
        with torch.no_grad():
            h, a = encode(pipe, missing, resolution)
        for i, p in enumerate(missing):
            cache[(p, device)] = (h[i], {k: v[i] for k, v in a.items()} if a is not None else None)
    got = [cache[(p, device)] for p in prompts]
    hidden = torch.stack([h for h, _ in got])
    add = {k: torch.stack([a[k] for _, a in got]) for k in got[0][1]} if got[0][1] is not None else None
    return hidden, add
