"""Attribution by Unlearning (AbU; Wang et al., NeurIPS 2024): unlearn the synthesized image and see which
training images the model forgets along with it.

    L_unlearn(θ) = -L(ẑ, θ) + (N/2) (θ - θ0)ᵀ F (θ - θ0)         (AbU eq. 3: EWC-regularised unlearning)
    θ <- θ + (α/N) F⁻¹ ∇θ L(ẑ, θ)                                (eq. 5: Fisher-preconditioned gradient ascent)
    τ(ẑ, z_i) = L(z_i, θ_-ẑ) - L(z_i, θ0)                        (eq. 6: higher = more influential)

F is the diagonal Fisher E[(∇θ ℓ)²] of the training set (one random t and noise per image, as the official
`compute_fisher.py`), L the denoising loss of core.diffusion. Only the cross-attention K/V projections move by
default (the paper's best variant). The loss sweep uses timesteps t = 0, 1000/T, 2000/T, ... and noise seeded by
the training image's index, so the "before" and "after" passes see identical noise however the sweep is batched
or split over processes (the official code seeds per batch, so both passes must be batched identically).

Where difflab departs from the official code (../shared/reference/data-attribution.md):
- the query latent is multiplied by the VAE's scaling factor (the official AbC path forgets it);
- the Fisher is damped by `damping` x the layer's mean Fisher (FastGDA's 0.1; the official code divides by a raw
  F in which near-zero entries explode); `damping=0` is the official behaviour;
- N is the training set's size (the official AbC code hard-codes 400M; only α/N matters) and the unlearning
  noise is seeded, so a ranking is reproducible.
The Fisher and the "before" losses do not depend on the query: both are cached beside the training images.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.core.data import (ImageFolder, encode_latents, encode_prompts, fingerprint, load_image, save_tensors,
                               to_pixels)
from difflab.core.diffusion import add_noise, diffusion_loss, target
from difflab.core.params import freeze_all_but, select
from difflab.core.sweep import sweep
from difflab.core.trainer import TrainConfig, train
from difflab.errors import DifflabError


@dataclass
class UnlearnConfig:
    params: str = "xattn_kv"     # cross-attention K/V: the paper's best (KV > cross-attn > attn > full, Table 3)
    steps: int = 10              # Newton steps (official: COCO 1, AbC 100; 10 x 10 x 16 samples cost ~8 s here)
    lr: float = 3e-4             # α. The step is α/N F⁻¹∇L, so α depends on N: on a 200-image shapes set α = 1e-4
                                 # raises the training losses by ~1% on average, 1e-3 by ~30% (the model forgets
                                 # everything); see docs/BENCHMARKS.md
    batch: int = 16              # (ε, t) samples per micro-batch (official AbC: 16 x 10 accumulation)
    grad_accum: int = 10
    damping: float = 0.1         # F + damping * mean(F_layer); 0 = the official undamped F
    fisher_epochs: int = 1       # passes over the training set for the Fisher (one (t, ε) per image and pass)
    time_samples: int = 10       # loss-sweep timesteps t = 0, 100, ..., 900 (the official AbC setting)
    flips: bool = False          # also score each image's mirror image and keep the max (the paper's rule when
                                 # the model trained with flips; the shapes model did not: "left" means left)
    seed: int = 0
    sweep_batch: int = 64        # training images per loss-sweep forward (x time_samples rows)


@dataclass
class TrainingData:
    """What the sweeps need of a training set: latents, text embeddings, and the file names (in order)."""
    z: torch.Tensor
    c: torch.Tensor
    files: list[str]
    folder: Path | None = None
    z_flip: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.z)


def resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def training_data(pipe, folder: str | Path, flips: bool = False) -> TrainingData:
    """Latents and text embeddings of an image folder (PNG + metadata.jsonl), cached there by encoder."""
    f = ImageFolder(folder, size=resolution(pipe))
    return TrainingData(f.latents(pipe.vae), f.text_embeddings(pipe), [r["file"] for r in f.records], Path(folder),
                        f.latents(pipe.vae, flip=True) if flips else None)


def query_tensors(pipe, image, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent (1, C, h, w), text embedding (1, L, D)) of a query: a path or PIL image of any size and mode,
    converted to RGB and resized (bicubic) to the model's resolution, then VAE-encoded (scaled, unlike the
    official AbC path)."""
    size = resolution(pipe)
    im = load_image(image, size) if isinstance(image, (str, Path)) else image.convert("RGB").resize((size, size))
    return encode_latents(pipe.vae, to_pixels([im])).cpu(), encode_prompts(pipe, [prompt]).cpu()


def _device(module) -> torch.device:
    return next(module.parameters()).device


def sweep_timesteps(scheduler, time_samples: int) -> torch.Tensor:
    n = scheduler.config.num_train_timesteps
    return torch.arange(0, n, n // time_samples)[:time_samples]


@torch.no_grad()
def image_losses(unet, scheduler, z: torch.Tensor, c: torch.Tensor, time_samples: int = 10, seed: int = 0,
                 batch: int = 64, progress: bool = True, desc: str = "loss sweep",
                 ids: torch.Tensor | None = None) -> torch.Tensor:
    """L(z_i, θ) for every row of z: the mean denoising loss over the fixed timesteps, noise seeded by the row's
    id (`ids[i]`, by default i), so a subset scored alone sees the noise it sees in the whole set."""
    ts = sweep_timesteps(scheduler, time_samples)
    dev = _device(unet)
    ids = torch.arange(len(z)) if ids is None else ids

    def fn(idx):
        noise = torch.stack([torch.randn((len(ts), *z.shape[1:]), generator=torch.Generator().manual_seed(
            seed * 1_000_003 + int(ids[i]))) for i in idx]).flatten(0, 1)
        x0 = z[idx].repeat_interleave(len(ts), 0).to(dev)
        ctx = c[idx].repeat_interleave(len(ts), 0).to(dev)
        per = diffusion_loss(unet, scheduler, x0, ctx, noise=noise.to(dev), t=ts.repeat(len(idx)).to(dev),
                             reduction="none")
        return per.view(len(idx), len(ts)).mean(1)

    return sweep(fn, len(z), batch, desc=desc, progress=progress)


def fisher_diagonal(unet, scheduler, z: torch.Tensor, c: torch.Tensor, params: dict[str, torch.nn.Parameter],
                    epochs: int = 1, seed: int = 0, batch: int = 32, progress: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal Fisher F = E_i[(∇θ ℓ(z_i, t, ε))²] over the training set, per-sample gradients by torch.func
    (vmap of grad), accumulated in float64; one (t, ε) per image and epoch, seeded by (seed, epoch, image)."""
    from torch.func import functional_call, grad, vmap
    dev = _device(unet)
    fixed = {n: p.detach() for n, p in params.items()}
    n_t = scheduler.config.num_train_timesteps

    def one_loss(p, x0, ctx, eps, t):
        x_t = add_noise(scheduler, x0[None], eps[None], t[None])
        out = functional_call(unet, p, (x_t, t[None], ctx[None])).sample
        return ((out.float() - target(scheduler, x0[None], eps[None], t[None]).float()) ** 2).mean()

    per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0, 0, 0), randomness="different")

    def fn(idx):
        img = idx % len(z)
        gens = [torch.Generator().manual_seed((seed * 1_000_003 + int(k // len(z))) * 1_000_003 + int(k % len(z)))
                for k in idx]
        eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(dev)
        t = torch.stack([torch.randint(0, n_t, (), generator=g) for g in gens]).to(dev)
        grads = per_sample(fixed, z[img].to(dev), c[img].to(dev), eps, t)
        return {n: (g.double() ** 2).sum(0) for n, g in grads.items()}

    total = sweep(fn, len(z) * epochs, batch, reduce="sum", desc="fisher", progress=progress)
    return {n: v / (len(z) * epochs) for n, v in total.items()}


# --- caches: what does not change between queries --------------------------------------------------------------
def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def fisher_key(unet, data: TrainingData, cfg: UnlearnConfig) -> dict:
    params = select(unet, cfg.params)
    return {"kind": "fisher", "model": fingerprint(unet, params), "params": cfg.params, "n": len(data),
            "files": _key_hash({"files": data.files}), "epochs": cfg.fisher_epochs, "seed": cfg.seed}


def _save_keyed(path: Path, tensors: dict[str, torch.Tensor], key: dict) -> None:
    save_tensors(path, tensors, {"key": json.dumps(key, sort_keys=True)})


def load_fisher(path: str | Path, unet, data: TrainingData, cfg: UnlearnConfig) -> dict[str, torch.Tensor]:
    """A saved Fisher, refused (one line) when it was computed for another model, parameter set or training set."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"no Fisher file at {path}")
    with safe_open(str(path), "pt") as fh:
        saved = json.loads((fh.metadata() or {}).get("key", "{}"))
        want = fisher_key(unet, data, cfg)
        for field, what in (("model", "model"), ("params", "parameter set"), ("files", "training set")):
            if saved.get(field) != want[field]:
                raise DifflabError(f"{path} is the Fisher of another {what} ({field} {saved.get(field)!r}, this run's "
                                   f"{want[field]!r}); delete it or pass the {what} it was computed for")
        return {k: fh.get_tensor(k) for k in fh.keys()}


def cached_fisher(unet, scheduler, data: TrainingData, cfg: UnlearnConfig, path: str | Path | None = None,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """The Fisher of `data` under `unet`: from `path` when given (checked; written there when absent), else
    cached beside the images."""
    key = fisher_key(unet, data, cfg)
    cache = Path(path) if path is not None else (
        data.folder / ".difflab-cache" / f"fisher-{_key_hash(key)}.safetensors" if data.folder else None)
    if cache is not None and cache.exists():
        return load_fisher(cache, unet, data, cfg)
    fisher = fisher_diagonal(unet, scheduler, data.z, data.c, select(unet, cfg.params), cfg.fisher_epochs,
                             cfg.seed, progress=progress)
    if cache is not None:
        _save_keyed(cache, fisher, key)
    return fisher


def cached_losses(unet, scheduler, data: TrainingData, cfg: UnlearnConfig, progress: bool = True) -> torch.Tensor:
    """The "before" losses L(z_i, θ0), (N,) or (N, 2) with flips, cached beside the images by model and settings."""
    from safetensors.torch import load_file
    key = {"kind": "losses", "model": fingerprint(unet), "kv": fingerprint(unet, select(unet, cfg.params)),
           "files": _key_hash({"files": data.files}), "t": cfg.time_samples, "seed": cfg.seed, "flips": cfg.flips}
    cache = data.folder / ".difflab-cache" / f"losses-{_key_hash(key)}.safetensors" if data.folder else None
    if cache is not None and cache.exists():
        return load_file(cache)["losses"]
    losses = sweep_losses(unet, scheduler, data, cfg, progress, "losses before")
    if cache is not None:
        _save_keyed(cache, {"losses": losses}, key)
    return losses


def sweep_losses(unet, scheduler, data: TrainingData, cfg: UnlearnConfig, progress: bool = True,
                 desc: str = "loss sweep") -> torch.Tensor:
    """L(z_i, θ) for the training set: (N,), or (N, 2) with the mirror images as the second column."""
    runs = [data.z] + ([data.z_flip] if cfg.flips else [])
    cols = [image_losses(unet, scheduler, z, data.c, cfg.time_samples, cfg.seed, cfg.sweep_batch, progress, desc)
            for z in runs]
    return torch.stack(cols, 1) if cfg.flips else cols[0]


# --- unlearning ---------------------------------------------------------------------------------------------------
def unlearn(unet, scheduler, z_query: torch.Tensor, c_query: torch.Tensor, fisher: dict[str, torch.Tensor],
            n_train: int, cfg: UnlearnConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    """Eq. 5 in place: `cfg.steps` steps of θ <- θ + (α/N) F⁻¹ ∇θ L(ẑ, θ) on the selected parameters, through
    the core training loop (plain SGD on -L, with each gradient multiplied by 1 / (N (F + damping mean F))).
    Returns the original values of the changed parameters (for `restore`)."""
    params = select(unet, cfg.params)
    missing = set(params) - set(fisher)
    if missing:
        raise DifflabError(f"the Fisher has no entry for {len(missing)} selected parameters (e.g. {min(missing)}): "
                           "it was computed for another parameter set")
    original = {n: p.detach().clone() for n, p in params.items()}
    freeze_all_but(unet, params)
    hooks = []
    for n, p in params.items():
        f = fisher[n].to(p.device, torch.float64)
        scale = (1.0 / (n_train * (f + cfg.damping * f.mean()).clamp_min(1e-30))).to(p.dtype)
        hooks.append(p.register_hook(lambda g, s=scale: g * s.to(g.device)))

    def batch_fn(i):   # the query travels with the batch, so it is on the device train() runs on
        return z_query, c_query, torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)

    def loss_fn(b):
        zq, cq, g = b
        loss = diffusion_loss(unet, scheduler, zq.expand(cfg.batch, *zq.shape[1:]),
                              cq.expand(cfg.batch, *cq.shape[1:]), generator=g)
        return -loss, {"query_loss": loss.item()}

    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, optimizer="sgd", weight_decay=0.0, max_grad_norm=None,
                     grad_accum=cfg.grad_accum, log_every=max(1, cfg.steps // 5), seed=cfg.seed, desc="unlearn",
                     progress=progress)
    try:
        train(params, loss_fn, batch_fn, tc, modules=[unet])
    finally:
        for h in hooks:
            h.remove()
        unet.requires_grad_(False)
        unet.eval()
    return original


@torch.no_grad()
def restore(unet, original: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    for n, v in original.items():
        params[n].copy_(v)


def attribute_by_unlearning(pipe, data: TrainingData, z_query: torch.Tensor, c_query: torch.Tensor,
                            cfg: UnlearnConfig | None = None, fisher: dict[str, torch.Tensor] | None = None,
                            before: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
    """τ(ẑ, z_i) for every training image (eq. 6), max over flips when `cfg.flips`; the UNet is restored after."""
    cfg = cfg or UnlearnConfig()
    unet, sched = pipe.unet, pipe.scheduler
    fisher = fisher if fisher is not None else cached_fisher(unet, sched, data, cfg, progress=progress)
    before = before if before is not None else cached_losses(unet, sched, data, cfg, progress)
    original = unlearn(unet, sched, z_query, c_query, fisher, len(data), cfg, progress)
    try:
        after = sweep_losses(unet, sched, data, cfg, progress, "losses after")
    finally:
        restore(unet, original)
    tau = after - before
    return tau.max(1).values if tau.ndim == 2 else tau


def forgetting(tau: torch.Tensor, before: torch.Tensor) -> float:
    """How much one unlearning run raised the training losses overall: mean τ / mean L(z_i, θ0). AbU wants the
    query forgotten, not the model; a value near or above 1 says α unlearned everything (every loss doubled), and
    the ranking then follows how fragile each image is rather than the query (docs/BENCHMARKS.md, gold standard)."""
    before = before[:, 0] if before.ndim == 2 else before   # (the images as given, not their mirrors)
    return float(tau.mean() / before.mean())

