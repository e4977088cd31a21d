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


def encode(pipe, prompts: list[str], resolution: int | None = None):
    """(encoder_hidden_states, added_cond_kwargs or None) for a batch of prompts."""
    device = pipe.unet.device
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
