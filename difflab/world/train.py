"""Training the shipped shapes models from scratch: VAE, oracle, CLIP, the UNet with its text encoder, and the
tagger (an attribution encoder).

`difflab world train --out DIR` runs every stage in order; `--stage NAME` runs one (two stages can run side by
side on two cores: vae || oracle, then unet || clip). Each stage writes `DIR/<stage>/` with diffusers'
`save_pretrained` (safetensors) and checkpoints that a rerun resumes from. Every stage uses the core training
loop; only the loss and the parameters differ. The data are the fixed training set `training_set()`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.core.diffusion import diffusion_loss
from difflab.core.runs import atomic_write_json
from difflab.core.trainer import TrainConfig, train
from difflab.world import dataset
from difflab.world.draw import FACTORS, RESOLUTION, values
from difflab.world.tokenizer import build_tokenizer

STAGES = ("vae", "oracle", "clip", "unet", "decoder", "tagger")

# --- component configurations ------------------------------------------------------------------------------
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION)
# Three levels (8x8, 4x4, 2x2 latents): at 2x2 every cell touches a different corner, so zero padding tells
# the network where it is and "at the top left" can be placed (a 2-level prototype never learned position).
UNET_CONFIG = dict(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                   layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=32)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")

DEFAULT_STEPS = {"vae": 2400, "oracle": 3000, "clip": 1500, "unet": 11500, "decoder": 3000, "tagger": 3000}


def _images_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_images(cache: Path, n: int = dataset.TRAIN_SIZE, seed: int = dataset.TRAIN_SEED) -> np.ndarray:
    """The rendered training set, cached as .npy (rendering 60k images takes about a minute)."""
    path = cache / f"train-{seed}-{n}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    arr = dataset.render_array(dataset.training_set(n, seed))
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), arr, allow_pickle=False)
    path.with_suffix(".tmp.npy").rename(path)
    return arr


@torch.no_grad()
def heldout_psnr(vae, n: int = 1000, seed: int = 12345) -> float:
    """Reconstruction PSNR (dB, images in [-1, 1]) on n fresh images, held-out values included."""
    held = _images_tensor(dataset.render_array(dataset.sample(n, seed, include_heldout=True)))
    rec = vae.decode(vae.encode(held).latent_dist.mean).sample.clamp(-1, 1)
    return float(10 * torch.log10(4.0 / F.mse_loss(rec, held)))


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def _log_to(path: Path):
    def on_log(step, logs):
        with open(path, "a") as fh:
            fh.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in logs.items()}}) + "\n")
    return on_log


# --- stages ------------------------------------------------------------------------------------------------
def train_vae(out: Path, steps: int, seed: int = 0, batch: int = 32) -> dict:
    """AutoencoderKL on the training images: L2 + L1 reconstruction, a tiny KL (SD's recipe minus the GAN)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    x_all = _images_tensor(training_images(out / "cache"))

    def batch_fn(i):
        return x_all[torch.from_numpy(_rng(seed, i).integers(0, len(x_all), batch))]

    def loss_fn(x):
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l2, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        return l2 + 0.5 * l1 + 1e-4 * kl, {"l2": l2.item()}

    params = dict(vae.named_parameters())
    cfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=200, lr_schedule="cosine", checkpoint_every=500,
                      seed=seed, desc="vae", ema_decay=None, weight_decay=0.0)
    d = out / "vae"
    d.mkdir(parents=True, exist_ok=True)
    train(params, loss_fn, batch_fn, cfg, out=d, modules=[vae], on_log=_log_to(d / "log.jsonl"))
    vae.eval()
    with torch.no_grad():   # SD's scaling_factor makes latents unit-variance for the UNet
        z = torch.cat([vae.encode(x_all[i:i + 500]).latent_dist.mean for i in range(0, 5000, 500)])
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    psnr = heldout_psnr(vae)
    vae.save_pretrained(d / "final")
    return {"vae_psnr_db": psnr, "vae_scaling_factor": vae.config.scaling_factor}


def train_decoder(out: Path, steps: int, seed: int = 4, batch: int = 32) -> dict:
    """Fine-tune only the VAE decoder on the cached latents. The encoder, and so the UNet's latent space, stay
    fixed, so this stage runs beside UNet training and sharpens what the oracle must read (textures)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae" / "final")
    x_all = _images_tensor(training_images(out / "cache"))
    lat_path = out / "cache" / "latents.pt.safetensors"
    if not lat_path.exists():
        raise FileNotFoundError(f"{lat_path} is written by the unet stage; run it first")
    z_all = load_file(lat_path)["z"] / vae.config.scaling_factor
    vae.requires_grad_(False)
    params = {f"decoder.{k}": v for k, v in vae.decoder.named_parameters()}
    params.update({f"post_quant_conv.{k}": v for k, v in vae.post_quant_conv.named_parameters()})
    for p in params.values():
        p.requires_grad_(True)

    def batch_fn(i):
        idx = torch.from_numpy(_rng(seed, i).integers(0, len(x_all), batch))
        return z_all[idx], x_all[idx]

    def loss_fn(b):
        z, x = b
        rec = vae.decode(z).sample
        l2 = F.mse_loss(rec, x)
        return l2 + 0.5 * F.l1_loss(rec, x), {"l2": l2.item()}

    cfg = TrainConfig(steps=steps, lr=3e-4, warmup_steps=100, lr_schedule="cosine", checkpoint_every=500,
                      seed=seed, desc="decoder", weight_decay=0.0)
    d = out / "decoder"
    d.mkdir(parents=True, exist_ok=True)
    train(params, loss_fn, batch_fn, cfg, out=d, modules=[vae], on_log=_log_to(d / "log.jsonl"))
    vae.eval()
    psnr = heldout_psnr(vae)
    vae.save_pretrained(d / "final")
    return {"vae_psnr_db_after_decoder": psnr}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generated images do to the oracle's input: blur, noise and small colour shifts. The generator is on
    x's device."""
    b, dev = x.shape[0], x.device
    k = torch.tensor([1.0, 2.0, 1.0], device=dev)
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    w = torch.rand(b, 1, 1, 1, generator=g, device=dev) * 0.8
    x = (1 - w) * x + w * blurred
    x = x + torch.randn(x.shape, generator=g, device=dev) * torch.rand(b, 1, 1, 1, generator=g, device=dev) * 0.05
    x = (x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g, device=dev) - 0.5))
         + 0.1 * (torch.rand(b, 3, 1, 1, generator=g, device=dev) - 0.5))
    return x.clamp(-1, 1)


def _train_reader(out: Path, name: str, net, x_all: torch.Tensor, y_all: dict[str, torch.Tensor], steps: int,
                  seed: int, batch: int) -> Path:
    """The oracle's and the tagger's training: a cross-entropy per factor on augmented images (a label of -100,
    cross_entropy's ignore_index, counts nothing: the tagger's unnamed factors). Returns out/name."""
    def batch_fn(i):
        idx = torch.from_numpy(_rng(seed, i).integers(0, len(x_all), batch))
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return _augment(x_all[idx], g), {f: y[idx] for f, y in y_all.items()}

    def loss_fn(b):
        x, y = b
        logits = net(x)
        return sum(F.cross_entropy(logits[f], y[f]) for f in FACTORS), {}

    cfg = TrainConfig(steps=steps, lr=2e-3, warmup_steps=100, lr_schedule="cosine", checkpoint_every=500,
                      seed=seed, desc=name, weight_decay=1e-4)
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    train(dict(net.named_parameters()), loss_fn, batch_fn, cfg, out=d, modules=[net], on_log=_log_to(d / "log.jsonl"))
    return d


def train_oracle(out: Path, steps: int, seed: int = 1, batch: int = 128, n: int = 60_000) -> dict:
    """The oracle on fresh procedural images with every value (held-out included) drawn and known."""
    from difflab.world.oracle import Oracle, judge
    torch.manual_seed(seed)
    oracle = Oracle(width=16)
    items = dataset.sample(n, seed=seed, include_heldout=True)
    x_all = _images_tensor(dataset.render_array(items))
    y_all = {f: torch.tensor([values(f).index(it.factors[f]) for it in items]) for f in FACTORS}
    d = _train_reader(out, "oracle", oracle, x_all, y_all, steps, seed, batch)
    test = dataset.sample(5000, seed=777, include_heldout=True)
    res = judge(oracle.predict(dataset.render_array(test)), [it.factors for it in test])
    oracle.save_pretrained(d / "final")
    return {f"oracle_acc_{f}": a for f, a in res["accuracy"].items()}


def train_tagger(out: Path, steps: int, seed: int = 5, batch: int = 128, n: int = dataset.TRAIN_SIZE) -> dict:
    """The tagger: the oracle's network trained on the base training set and its captions only. A factor's
    cross-entropy counts where the caption names it, so the held-out values (never named) have no class, and
    nothing but what the generator's own captions say supervises it; the oracle's generation augmentation on
    every image. An attribution encoder (`difflab.attribute.features`, "shapes-tagger"): where the CLIP image
    tower mixes the factors, its readings keep them apart for the heads to weigh."""
    from difflab.world.oracle import Oracle, judge
    torch.manual_seed(seed)
    trained = {f: list(FACTORS[f][0]) for f in FACTORS}
    tagger = Oracle(factors=trained, width=16)
    items = dataset.training_set(n)   # the first n images of the training set (all of it by default)
    x_all = _images_tensor(training_images(out / "cache", n))
    # -100 (cross_entropy's ignore_index) where the caption does not name the factor
    y_all = {f: torch.tensor([trained[f].index(it.named[f]) if f in it.named else -100 for it in items])
             for f in FACTORS}
    d = _train_reader(out, "tagger", tagger, x_all, y_all, steps, seed, batch)
    # how well it reads fresh images' trained values (a held-out value has no class: those images are left out)
    test = [it for it in dataset.sample(5000, seed=777) if all(it.factors[f] in trained[f] for f in FACTORS)]
    res = judge(tagger.predict(dataset.render_array(test)), [it.factors for it in test])
    tagger.save_pretrained(d / "final")
    return {f"tagger_acc_{f}": a for f, a in res["accuracy"].items()}


def clip_config(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **TEXT_CONFIG),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                           image_size=RESOLUTION, patch_size=4),
        projection_dim=64)


def soft_clip_loss(logits_per_image: torch.Tensor, caption_id: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with soft targets: every pair whose captions are the same text is a positive,
    spread evenly (captions repeat: "a shape")."""
    same = (caption_id[:, None] == caption_id[None, :]).float()
    tgt = same / same.sum(1, keepdim=True)
    li = -(tgt * logits_per_image.log_softmax(-1)).sum(-1).mean()
    lt = -(tgt * logits_per_image.T.log_softmax(-1)).sum(-1).mean()
    return (li + lt) / 2


def train_clip(out: Path, steps: int, seed: int = 2, batch: int = 256) -> dict:
    """A tiny CLIP (transformers CLIPModel) trained contrastively on the training set's images and captions
    (`soft_clip_loss`: captions repeat, so the InfoNCE targets are soft)."""
    from transformers import CLIPModel
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = CLIPModel(clip_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    items = dataset.training_set()
    x_all = _images_tensor(training_images(out / "cache"))
    ids = tok([it.caption for it in items], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    caption_id = torch.tensor(np.unique([it.caption for it in items], return_inverse=True)[1])

    def batch_fn(i):
        idx = torch.from_numpy(_rng(seed, i).integers(0, len(items), batch))
        return x_all[idx], ids[idx], caption_id[idx]

    def loss_fn(b):
        x, t, cid = b
        return soft_clip_loss(model(input_ids=t, pixel_values=x).logits_per_image, cid), {}

    cfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=200, lr_schedule="cosine", checkpoint_every=500,
                      seed=seed, desc="clip", weight_decay=0.05)
    d = out / "clip"
    d.mkdir(parents=True, exist_ok=True)
    train(dict(model.named_parameters()), loss_fn, batch_fn, cfg, out=d, modules=[model],
          on_log=_log_to(d / "log.jsonl"))
    model.save_pretrained(d / "final")
    tok.save_pretrained(d / "final")
    return {}


def build_unet() -> "UNet2DConditionModel":
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**UNET_CONFIG)


def clip_text_encoder(out: Path):
    """The text tower of the trained shapes CLIP as a standalone CLIPTextModel (the pipeline's text encoder)."""
    from transformers import CLIPModel, CLIPTextModel
    clip = CLIPModel.from_pretrained(out / "clip" / "final")
    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())   # transformers 5: same module names, no text_model level
    return te.eval()


def train_unet(out: Path, steps: int, seed: int = 3, batch: int = 64, caption_dropout: float = 0.1) -> dict:
    """The UNet on cached VAE latents and cached text embeddings of the frozen CLIP text tower (as Stable
    Diffusion conditions on a frozen CLIP): the epsilon loss with 10% empty captions (for classifier-free
    guidance), AdamW, EMA 0.999.

    Why frozen CLIP text: trained jointly from scratch with the UNet, the text encoder never separated the
    position words ("top left" and "bottom right" ended 0.6 apart against 4.5 for "red"/"blue"), and position
    stayed at chance after 5,000 steps; the contrastively trained tower separates them (its zero-shot position
    accuracy is 96%), and caching its embeddings makes each step cheaper.
    """
    from diffusers import AutoencoderKL, DDPMScheduler
    from safetensors.torch import load_file, save_file
    torch.manual_seed(seed)
    tok = build_tokenizer()
    unet = build_unet()
    te = clip_text_encoder(out)
    vae = AutoencoderKL.from_pretrained(out / "vae" / "final").eval()
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    items = dataset.training_set()
    lat_path = out / "cache" / "latents.pt.safetensors"
    if lat_path.exists():
        z_all = load_file(lat_path)["z"]
    else:
        x_all = _images_tensor(training_images(out / "cache"))
        with torch.no_grad():
            z_all = torch.cat([vae.encode(x_all[i:i + 500]).latent_dist.mean for i in range(0, len(x_all), 500)])
        z_all = z_all * vae.config.scaling_factor
        save_file({"z": z_all.contiguous()}, lat_path)
    # every distinct caption (and the empty one, index 0) embedded once
    texts = [""] + sorted({it.caption for it in items})
    index = {t: i for i, t in enumerate(texts)}
    cap_idx = torch.tensor([index[it.caption] for it in items])
    with torch.no_grad():
        emb = torch.cat([te(tok(texts[i:i + 1000], padding="max_length", max_length=tok.model_max_length,
                                return_tensors="pt").input_ids).last_hidden_state for i in range(0, len(texts), 1000)])

    def batch_fn(i):
        r = _rng(seed, i)
        idx = torch.from_numpy(r.integers(0, len(items), batch))
        c = cap_idx[idx].clone()
        c[torch.from_numpy(r.random(batch) < caption_dropout)] = 0
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return z_all[idx], emb[c], g

    def loss_fn(b):
        z, c, g = b
        return diffusion_loss(unet, sched, z, c, generator=g), {}

    params = {f"unet.{k}": v for k, v in unet.named_parameters()}
    cfg = TrainConfig(steps=steps, lr=7e-4, warmup_steps=200, lr_schedule="cosine", checkpoint_every=500,
                      seed=seed, desc="unet", ema_decay=0.999, weight_decay=0.0)
    d = out / "unet"
    d.mkdir(parents=True, exist_ok=True)
    train(params, loss_fn, batch_fn, cfg, out=d, modules=[unet], on_log=_log_to(d / "log.jsonl"))
    unet.save_pretrained(d / "final" / "unet")
    te.save_pretrained(d / "final" / "text_encoder")
    return {"distinct_captions": len(texts) - 1}


def assemble(out: Path, dest: Path) -> None:
    """Put the trained parts together as one diffusers StableDiffusionPipeline folder plus oracle and CLIP."""
    import shutil
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    tok = build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "decoder" / "final" if (out / "decoder" / "final").exists()
                                          else out / "vae" / "final"),
        text_encoder=CLIPTextModel.from_pretrained(out / "unet" / "final" / "text_encoder"),
        tokenizer=tok, unet=UNet2DConditionModel.from_pretrained(out / "unet" / "final" / "unet"),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest / "pipeline")
    for part in ("oracle", "clip", "tagger"):
        if (dest / part).exists():
            shutil.rmtree(dest / part)
        shutil.copytree(out / part / "final", dest / part)


def run(out: Path, stages=STAGES, steps: dict | None = None) -> dict:
    steps = {**DEFAULT_STEPS, **(steps or {})}
    fns = {"vae": train_vae, "oracle": train_oracle, "clip": train_clip, "unet": train_unet,
           "decoder": train_decoder, "tagger": train_tagger}
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "train_report.json"
    for s in stages:
        done = json.loads(report_path.read_text()) if report_path.exists() else {}
        if (out / s / "final").exists() and s in done and done[s]["steps"] >= steps[s]:
            continue   # finished earlier (perhaps in a process beside this one); delete DIR/<stage> to redo it
        from difflab.core.trainer import latest_checkpoint
        earlier = done.get(s, {}).get("seconds", 0.0) if latest_checkpoint(out / s) is not None else 0.0
        t0 = time.time()
        metrics = fns[s](out, steps[s])
        # re-read: a stage running beside this one in another process may have written its entry meanwhile
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        # a resumed or extended stage adds to the time it had already taken
        report[s] = {"steps": steps[s], "seconds": round(earlier + time.time() - t0, 1), **metrics}
        atomic_write_json(report_path, report)
    return report
