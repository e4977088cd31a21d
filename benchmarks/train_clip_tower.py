"""A CLIP image tower trained against the shipped shapes CLIP's frozen text tower: a longer-trained, larger or
generation-robust encoder to try as the attribution benchmark's encoder (`bench_abc_heads.py --encoder OUT/final`).

The text side is locked (the reverse of LiT, which locks the image side): the text tower and its features of the
training captions stay the shipped CLIP's, so the new tower lives in the same text space (zero-shot readings,
CLIP score) and only the image side changes. The loss is the shipped CLIP's soft InfoNCE
(`difflab.world.train.soft_clip_loss`). A share of the images (--augment) goes through the oracle's generation
augmentation (blur, noise, colour shifts); with --recon a share is replaced by its reconstruction through the
shipped VAE, which is what every generated image has been through.

    python benchmarks/train_clip_tower.py clip-long --steps 1000 --batch 1024 --warmup 300     # the shipped size
    python benchmarks/train_clip_tower.py clip-wide --hidden 192 --layers 6 --heads 6 --steps 2700 --batch 1024 --warmup 300
    python benchmarks/train_clip_tower.py clip-recon --recon 0.5 --steps 1000 --batch 512 --threads 1
    python benchmarks/bench_abc_heads.py abc-xattn --encoder clip-long/final --probe
    python benchmarks/bench_abc_heads.py abc-xattn --encoder clip-long/final --test "head=channel,lr=0.003,whiten=0.1"

OUT/final is a transformers CLIPModel folder (the shipped text tower, the new image tower) with a
preprocessor_config.json that says its pixels are in [-1, 1] (mean 0.5, std 0.5). The core training loop runs it
(on a GPU where there is one; resumable from OUT/checkpoints); OUT/metrics.json records the settings and time.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def recon_images(x: torch.Tensor, cache: Path) -> torch.Tensor:
    """x (N, 3, 32, 32) in [-1, 1] through the shipped VAE (encode to the posterior mean, decode), cached."""
    from diffusers import AutoencoderKL

    from difflab.models import shapes_dir
    path = cache / f"recon-{len(x)}.npy"
    if not path.exists():
        vae = AutoencoderKL.from_pretrained(shapes_dir("pipeline") / "vae").eval()
        with torch.no_grad():
            r = torch.cat([vae.decode(vae.encode(x[i:i + 1000]).latent_dist.mean).sample.clamp(-1, 1)
                           for i in range(0, len(x), 1000)])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), (r.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1)).numpy())
        path.with_suffix(".tmp.npy").rename(path)
    from difflab.world.train import _images_tensor
    return _images_tensor(np.load(path, allow_pickle=False))


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("out", type=Path, help="run folder: OUT/final is the CLIP folder, OUT/checkpoints resume")
    ap.add_argument("--hidden", type=int, default=96, help="width of the image tower (shipped: 96)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (shipped: 4)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (shipped: 4)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a tenth of --steps, at most 300)")
    ap.add_argument("--augment", type=float, default=0.5, help="share of images given the generation augmentation")
    ap.add_argument("--recon", type=float, default=0.0, help="share of images replaced by their VAE reconstruction")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import CLIPConfig, CLIPModel

    from difflab.core.runs import atomic_write_json
    from difflab.core.trainer import TrainConfig, train
    from difflab.models import shapes_dir
    from difflab.world import dataset
    from difflab.world.tokenizer import build_tokenizer
    from difflab.world.train import _augment, _images_tensor, _rng, soft_clip_loss, training_images

    cache = a.out / "cache"
    x_all = _images_tensor(training_images(cache))
    r_all = recon_images(x_all, cache) if a.recon > 0 else None
    captions = [it.caption for it in dataset.training_set()]
    texts, caption_id = np.unique(captions, return_inverse=True)
    caption_id = torch.from_numpy(caption_id.reshape(-1)).long()

    shipped = CLIPModel.from_pretrained(shapes_dir("clip")).eval()
    tok = build_tokenizer()
    with torch.no_grad():   # the locked text side: one feature per distinct caption, computed once
        ids = tok(list(texts), padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        text_feats = F.normalize(torch.cat([shipped.text_projection(shipped.text_model(input_ids=ids[i:i + 2000])
                                                                    .pooler_output)
                                            for i in range(0, len(ids), 2000)]), dim=-1)
    cfg = shipped.config.to_dict()
    cfg["vision_config"].update(hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                                num_attention_heads=a.heads)
    torch.manual_seed(a.seed)
    model = CLIPModel(CLIPConfig.from_dict(cfg))
    model.text_model.load_state_dict(shipped.text_model.state_dict())
    model.text_projection.load_state_dict(shipped.text_projection.state_dict())
    model.text_model.requires_grad_(False)
    model.text_projection.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}   # image tower, projection, scale
    # a buffer, so that the training loop moves it to the device once with the model (not saved with it)
    model.register_buffer("caption_features", text_feats, persistent=False)

    def batch_fn(i):
        rng = _rng(a.seed, i)
        idx = torch.from_numpy(rng.integers(0, len(x_all), a.batch))
        x = x_all[idx]
        if r_all is not None:
            x = torch.where(torch.from_numpy(rng.random(a.batch) < a.recon)[:, None, None, None], r_all[idx], x)
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + i)
        x = torch.where(torch.from_numpy(rng.random(a.batch) < a.augment)[:, None, None, None], _augment(x, g), x)
        return x, caption_id[idx]

    def loss_fn(b):
        x, cid = b
        f = F.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * f @ model.caption_features[cid].T
        return soft_clip_loss(logits, cid), {}

    tcfg = TrainConfig(steps=a.steps, lr=a.lr, warmup_steps=min(300, a.steps // 10) if a.warmup is None else a.warmup, lr_schedule="cosine",
                       weight_decay=0.05, betas=(0.9, 0.98), max_grad_norm=None, mixed_precision=a.mixed_precision,
                       checkpoint_every=500, seed=a.seed, desc="clip tower")
    t0 = time.time()
    hist = train(params, loss_fn, batch_fn, tcfg, out=a.out, modules=[model])
    model.save_pretrained(a.out / "final")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shapes_dir("clip") / name, a.out / "final" / name)
    (a.out / "final" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                         "image_std": [0.5] * 3}))
    loss = hist.get("loss", [float("nan")])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    atomic_write_json(a.out / "metrics.json", {**vars(a), "out": str(a.out), "seconds": round(time.time() - t0, 1),
                                               "final_loss": loss[-1], "device": device})
    print(f"{a.out / 'final'}: loss {loss[0]:.3f} -> {loss[-1]:.3f} in {time.time() - t0:.0f} s on {device}")


if __name__ == "__main__":
    main()
