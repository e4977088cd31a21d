"""SliderSpace (Gandikota et al. 2025): discover the directions in which a model's images of one prompt vary,
and turn each into a rank-1 LoRA slider.

    1. sample x^(n) ~ model(prompt), n = 1..N                       (seeds, optional prompt variants)
    2. phi^(n) = CLIP_image(x^(n)) / ||.||                          (the final image, or the one-step x0-hat)
    3. v_1..v_k = top-k principal directions of {phi^(n)} (centred)
    4. for slider i:  Delta_i = phi(x0-hat with slider i) - phi(x0-hat without)
                      L_i = 1 - cos(Delta_i, v_i)                  (paper eq. 5; the code's -0.1 cos is the
                                                                    same up to a constant and a scale)
       x0-hat is the one-step prediction from x_t = noised training sample at a random t, decoded by the VAE:
       the loss differentiates through one UNet call, the decoder and the CLIP image tower.

Feature points: "final" (default; the official code's choice) embeds the finished images for the PCA;
"x0" (the paper's) embeds the one-step x0-hat at the training timesteps, the very feature the loss moves,
so PCA and loss share one space. "final" is the default because it is what released sliders were trained
with and its directions are those of the images users see; both are measured in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.core.diffusion import add_noise, predict_x0
from difflab.errors import DifflabError
from difflab.sliders.lora import add_sliders, save_slider, trainable_flags


@dataclass
class DiscoverConfig:
    num_sliders: int = 8
    num_samples: int = 512            # images for the PCA (official: 1000 on SDXL)
    feature_point: str = "final"      # "final" (official code) or "x0" (paper)
    rank: int = 1                     # official: rank 1, alpha 1
    alpha: float = 1.0
    targets: str = "xattn_kv"         # official SDXL default: attn2.to_k / attn2.to_v
    init: str = "ortho"               # official: frozen random orthonormal B, trained A
    steps: int = 600                  # 300: alignment cos 0.05 and one slider below half its seeds (BENCHMARKS.md)
    batch_size: int = 8
    sliders_per_step: int = 3         # official: 3 random sliders per step
    lr: float = 2e-3                  # official: AdamW 2e-3, constant
    t_range: tuple[int, int] = (200, 800)   # training timesteps: x0-hat informative, the slider's effect visible
    sample_steps: int = 25
    guidance: float = 5.0
    clip: str = "shapes-clip"
    seed: int = 0
    progress: bool = True


def clip_features(backbone, images01: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image features of images in [0, 1] (differentiable)."""
    return F.normalize(backbone(images01).float(), dim=-1)


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (UNet space) -> images in [0, 1]."""
    return ((vae.decode(z / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample_latents(pipe, prompts: list[str], n: int, seed: int, steps: int, guidance: float,
                   batch_size: int = 64, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """n final latents, prompts cycled; sample k uses seed + k (as `difflab generate`)."""
    from tqdm.auto import tqdm
    jobs = [(prompts[k % len(prompts)], seed + k) for k in range(n)]
    out = []
    for i in tqdm(range(0, n, batch_size), desc="sample", disable=not progress, unit="batch"):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        out.append(pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                        generator=gens, output_type="latent").images)
    return torch.cat(out), [p for p, _ in jobs]


def principal_directions(feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(components (k, D), explained variance ratio (k,), mean (D,)) of the centred features (no whitening).
    The sign of each component is made deterministic: its largest-magnitude entry is positive."""
    mean = feats.mean(0)
    _, s, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    comps = vh[:k]
    idx = comps.abs().argmax(1)
    comps = comps * comps.gather(1, idx[:, None]).sign()
    var = s ** 2
    return comps, (var[:k] / var.sum()), mean


def discover(model, prompt: str | list[str], out: str | Path, cfg: DiscoverConfig | None = None) -> dict:
    """Run SliderSpace for `prompt` (or a list of prompt variants) and write OUT/slider_0 .. slider_{k-1},
    OUT/config.json, OUT/pca.safetensors, strips and a contact sheet, and OUT/metrics.json."""
    from difflab.core.runs import atomic_write_json, output_folder, write_metrics
    from difflab.core.trainer import TrainConfig, train
    from difflab.models import load_pipeline
    from difflab.similarity import load_backbone
    cfg = cfg or DiscoverConfig()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(p.strip() for p in prompts):
        raise DifflabError("discover needs a non-empty prompt")
    if cfg.feature_point not in ("final", "x0"):
        raise DifflabError(f"feature point {cfg.feature_point!r}: final or x0")
    if cfg.num_sliders < 1 or cfg.num_sliders >= cfg.num_samples:
        raise DifflabError(f"--num {cfg.num_sliders} needs more samples than sliders: at most "
                           f"{cfg.num_samples - 1} principal directions come from {cfg.num_samples} samples")
    t0 = time.time()
    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    for m in (unet, vae, pipe.text_encoder):
        m.requires_grad_(False)
    backbone = load_backbone(cfg.clip).eval().requires_grad_(False)

    # 1-3: samples, features, principal directions
    z0, sample_prompts = sample_latents(pipe, prompts, cfg.num_samples, cfg.seed, cfg.sample_steps, cfg.guidance,
                                        progress=cfg.progress)
    from difflab.core.conditioning import encode, pipeline_modules
    with torch.no_grad():
        cond = {p: encode(pipe, [p])[0] for p in prompts}
        feats = []
        g = torch.Generator().manual_seed(cfg.seed + 1)
        for i in range(0, len(z0), 64):
            z = z0[i:i + 64]
            if cfg.feature_point == "x0":
                t = torch.randint(*cfg.t_range, (len(z),), generator=g)
                z_t = add_noise(sched, z, torch.randn(z.shape, generator=g), t)
                c = torch.cat([cond[p] for p in sample_prompts[i:i + 64]])
                z = predict_x0(sched, z_t, unet(z_t, t, c).sample, t)
            feats.append(clip_features(backbone, decode(vae, z)))
        feats = torch.cat(feats)
    v, ratio, mean = principal_directions(feats, cfg.num_sliders)
    t_pca = time.time() - t0

    # 4: one rank-r LoRA per direction, trained on the alignment loss
    names = [f"slider_{i}" for i in range(cfg.num_sliders)]
    sliders = add_sliders(unet, names, cfg.rank, cfg.alpha, cfg.targets, cfg.init, cfg.seed)
    params = {k: p for s in sliders.values() for k, p in s.items()}

    def batch_fn(step):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.integers(len(z0), size=cfg.batch_size)
        t = torch.from_numpy(rng.integers(*cfg.t_range, size=cfg.batch_size))
        noise = torch.from_numpy(rng.standard_normal(z0[:cfg.batch_size].shape).astype(np.float32))
        chosen = rng.choice(cfg.num_sliders, size=min(cfg.sliders_per_step, cfg.num_sliders), replace=False)
        c = torch.cat([cond[sample_prompts[j]] for j in idx])
        return {"z_t": add_noise(sched, z0[idx], noise, t), "t": t, "c": c, "chosen": torch.from_numpy(chosen)}

    def loss_fn(b):
        z_t, t, c = b["z_t"], b["t"], b["c"]
        with torch.no_grad():
            unet.disable_adapters()
            phi_ref = clip_features(backbone, decode(vae, predict_x0(sched, z_t, unet(z_t, t, c).sample, t)))
            unet.enable_adapters()
        losses = []
        for i in b["chosen"].tolist():
            unet.set_adapters([names[i]], [1.0])
            trainable_flags(unet, sliders)
            phi = clip_features(backbone, decode(vae, predict_x0(sched, z_t, unet(z_t, t, c).sample, t)))
            losses.append((1 - F.cosine_similarity(phi - phi_ref, v[i][None].to(phi), dim=-1)).mean())
        loss = torch.stack(losses).mean()
        return loss, {"cos": 1 - loss.item()}

    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=0.0, seed=cfg.seed, max_grad_norm=None,
                     log_every=max(1, cfg.steps // 20), checkpoint_every=0, progress=cfg.progress,
                     desc="sliderspace")
    t1 = time.time()
    with output_folder(Path(out)) as tmp:
        hist = train(params, loss_fn, batch_fn, tc, modules=[*pipeline_modules(pipe), backbone])
        unet.eval()
        t_train = time.time() - t1
        from safetensors.torch import save_file
        save_file({"components": v.contiguous(), "explained_variance_ratio": ratio.contiguous(), "mean": mean},
                  tmp / "pca.safetensors")
        for i, name in enumerate(names):
            save_slider(pipe, name, tmp / name, {"method": "sliderspace", "prompt": prompts, "pc_index": i,
                                                 "explained_variance_ratio": float(ratio[i]), "base_model": str(model),
                                                 "encoder": cfg.clip, "feature_point": cfg.feature_point,
                                                 "targets": cfg.targets, "init": cfg.init})
        atomic_write_json(tmp / "config.json", {"prompt": prompts, "config": asdict(cfg), "model": str(model)})
        atomic_write_json(tmp / "history.json", hist)
        from difflab.sliders.evaluate import contact_sheet
        contact_sheet(pipe, names, prompts[0], tmp, seed=cfg.seed + 10_000)
        metrics = {"num_sliders": cfg.num_sliders, "explained_variance_ratio": ratio.tolist(),
                   "final_alignment_cos": hist.get("cos", [float("nan")])[-1], "seconds_sampling_pca": t_pca,
                   "seconds_training": t_train, "seconds_per_step": t_train / cfg.steps}
        if str(model) == "shapes":
            from difflab.sliders.evaluate import measure_sliders
            metrics.update(measure_sliders(pipe, names, prompts[0], seed=cfg.seed + 20_000, progress=cfg.progress))
        metrics["seconds_total"] = time.time() - t0
        return write_metrics(tmp, metrics)
