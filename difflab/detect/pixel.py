"""Pixel-level detection of inpainted regions (Epstein et al. 2023, sec. 4): data made automatically, an FCN
trained with a weighted Dice loss, pixel AP and IoU.

Data: for each real image, a random mask of strokes and boxes covering 15-35 % of it; the hole is inpainted by
diffusers' inpainting pipeline for the model (`AutoPipelineForInpainting.from_pipe`: a real inpainting UNet
where the model has one, otherwise masked latent blending at every step, which is what that pipeline does
for a 4-channel text-to-image UNet); then the original pixels are pasted back outside the mask, so the label
is exact: 1 where the pixels were synthesised, 0 where they are the camera's. Where only whole-image
generators exist, CutMix composites (a box of a fake image pasted into a real one) give the same labels.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from difflab import metrics as M
from difflab.detect.data import AugmentConfig, augment, read_folder, read_image, resize_square, split_mask
from difflab.detect.image import to_tensor
from difflab.errors import DifflabError

MASK_FRACTION = (0.15, 0.35)


def random_mask(rng: np.random.Generator, size: int, fraction: tuple[float, float] = MASK_FRACTION) -> np.ndarray:
    """A bool (size, size) mask of random overlapping strokes, boxes and ellipses whose area is a target drawn
    from U[fraction]; a shape that would overshoot the upper bound is redrawn."""
    lo, hi = fraction
    target = rng.uniform(lo, hi)
    canvas = Image.new("L", (size, size), 0)
    covered = 0.0
    for _ in range(200):
        trial = canvas.copy()
        d = ImageDraw.Draw(trial)
        kind = rng.integers(3)
        if kind == 0:   # a stroke: a short random walk with a thick pen
            pts = [tuple(rng.uniform(0, size, 2))]
            for _ in range(rng.integers(2, 5)):
                pts.append(tuple(np.clip(np.array(pts[-1]) + rng.normal(0, size / 4, 2), 0, size - 1)))
            d.line(pts, fill=255, width=max(1, int(rng.uniform(0.06, 0.16) * size)), joint="curve")
        else:           # a box or an ellipse
            w, h = rng.uniform(0.15, 0.5, 2) * size
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            (d.rectangle if kind == 1 else d.ellipse)([x, y, x + w, y + h], fill=255)
        frac = (np.asarray(trial) > 127).mean()
        if frac <= hi:
            canvas, covered = trial, frac
        if covered >= target:
            break
    mask = np.asarray(canvas) > 127
    if not lo <= mask.mean() <= hi:   # unlucky draws: try again with the next numbers of the same stream
        return random_mask(rng, size, fraction)
    return mask


def paste_back(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Generated pixels inside the mask, the original's (bit-exact) outside."""
    return np.where(mask[..., None], generated, original)


def make_inpainted(model, real: str | Path, out: str | Path, n: int | None = None, seed: int = 0,
                   steps: int = 25, guidance: float = 5.0, batch_size: int = 32, fraction=MASK_FRACTION,
                   progress: bool = True) -> Path:
    """Inpaint a random mask of each real image (prompt: its caption, if the folder has metadata.jsonl).
    Writes OUT/<i>.png, OUT/<i>.mask.png (white = inpainted) and metadata.jsonl (file, mask, source, prompt,
    mask_fraction), atomically."""
    from diffusers import AutoPipelineForInpainting
    from tqdm.auto import tqdm

    from difflab.core.runs import output_folder
    from difflab.detect.data import list_images
    from difflab.models import load_pipeline
    real = Path(real)
    files = list_images(real)[:n]
    prompts = {}
    if (real / "metadata.jsonl").exists():
        from difflab.core.data import read_metadata, text_of
        prompts = {r["file"]: text_of(r) for r in read_metadata(real)}
    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    with output_folder(Path(out)) as tmp, open(tmp / "metadata.jsonl", "w") as fh:
        for i in tqdm(range(0, len(files), batch_size), desc="inpaint", disable=not progress, unit="batch"):
            chunk = files[i:i + batch_size]
            with Image.open(chunk[0]) as im0:
                size = min(im0.size)
            originals = [read_image(f, size) for f in chunk]
            masks = [random_mask(rng, size, fraction) for _ in chunk]
            texts = [prompts.get(str(f.relative_to(real)), "") for f in chunk]
            gens = [torch.Generator("cpu").manual_seed(seed + i + k) for k in range(len(chunk))]
            with torch.no_grad():
                result = inpaint(texts, image=[Image.fromarray(o) for o in originals],
                                 mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks],
                                 height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                                 generator=gens).images
            for k, (f, o, m, g, t) in enumerate(zip(chunk, originals, masks, result, texts)):
                name = f"{i + k:06d}"
                g = np.asarray(g.convert("RGB").resize((size, size), Image.BICUBIC))
                Image.fromarray(paste_back(o, g, m)).save(tmp / f"{name}.png")
                Image.fromarray(m.astype(np.uint8) * 255).save(tmp / f"{name}.mask.png")
                fh.write(json.dumps({"file": f"{name}.png", "mask": f"{name}.mask.png", "source": str(f),
                                     "prompt": t, "mask_fraction": float(m.mean())}) + "\n")
    return Path(out)


def cutmix(real: np.ndarray, fake: np.ndarray, rng: np.random.Generator,
           fraction=MASK_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """A box of `fake` (same place) pasted into `real`; the box is the mask. Area ~ U[fraction]."""
    s = real.shape[0]
    area = rng.uniform(*fraction) * s * s
    aspect = rng.uniform(0.5, 2.0)
    h = int(np.clip(round(np.sqrt(area * aspect)), 1, s))
    w = int(np.clip(round(area / h), 1, s))
    top, left = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
    mask = np.zeros((s, s), bool)
    mask[top:top + h, left:left + w] = True
    return paste_back(real, fake, mask), mask


def read_masked_folder(folder: str | Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images and masks of an inpainted folder (metadata.jsonl with "file" and "mask")."""
    from difflab.core.data import read_metadata
    folder = Path(folder)
    recs = read_metadata(folder)
    if "mask" not in recs[0]:
        raise DifflabError(f"{folder}/metadata.jsonl has no \"mask\" field: not an inpainted folder "
                           "(make one with `difflab detect inpaint`)")
    images = np.stack([read_image(folder / r["file"], size) for r in recs])
    masks = []
    for r in recs:
        try:
            with Image.open(folder / r["mask"]) as m:
                masks.append(np.asarray(resize_square(m.convert("L"), size).point(lambda v: 255 * (v > 127))) > 0)
        except OSError as e:
            raise DifflabError(f"cannot read mask {folder / r['mask']}: {e}") from e
    return images, np.stack(masks), [r["file"] for r in recs]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Generalised (weighted) Dice loss (Sudre et al. 2017, eq. 2) over the two classes fake and real:

        GDL = 1 - 2 sum_c w_c sum_i p_ci g_ci / sum_c w_c sum_i (p_ci + g_ci),   w_c = 1 / (sum_i g_ci)^2

    The weights stop the larger class (real pixels, 65-85 %) from dominating."""
    p = torch.sigmoid(logits).flatten()
    g = target.float().flatten()
    p2, g2 = torch.stack([p, 1 - p]), torch.stack([g, 1 - g])
    w = 1.0 / (g2.sum(1) ** 2).clamp_min(eps)
    inter = (w * (p2 * g2).sum(1)).sum()
    union = (w * (p2 + g2).sum(1)).sum()
    return 1 - 2 * inter / union.clamp_min(1e-12)


@dataclass
class PixelConfig:
    size: int = 32
    width: int = 32
    steps: int = 3000            # IoU 0.61 at 1500 steps, 0.67 at 3000 (1000 inpainted images; BENCHMARKS.md)
    batch_size: int = 32
    lr: float = 1e-3
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(blur_prob=0.0, jpeg_prob=0.0))
    cutmix_prob: float = 0.5    # with cutmix folders: share of each batch made by CutMix
    seed: int = 0
    progress: bool = True




@torch.no_grad()
def predict_masks(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """P(fake) per pixel, (N, H, W)."""
    model.eval()
    return np.concatenate([torch.sigmoid(model(to_tensor(images[i:i + batch_size]))).numpy()
                           for i in range(0, len(images), batch_size)])


def pixel_metrics(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict:
    """pixel_ap: AP over all pixels pooled (fake = positive); iou: pooled over all pixels at the threshold;
    iou_per_image: the mean of each image's IoU."""
    pred = prob > threshold
    return {"pixel_ap": M.average_precision(prob.ravel(), mask.ravel()), "iou": M.iou(pred, mask),
            "iou_per_image": float(np.mean([M.iou(p, m) for p, m in zip(pred, mask)])), "n": int(len(mask))}


def cutmix_test_set(real, fake, cfg: "PixelConfig", n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """n CutMix composites of the real and fake folders' test splits, with a fixed seed."""
    rs = [x[split_mask(p, "test", cfg.seed)] for x, p in (read_folder(f, cfg.size) for f in real)]
    fs = [x[split_mask(p, "test", cfg.seed)] for x, p in (read_folder(f, cfg.size) for f in fake)]
    rs, fs = np.concatenate(rs), np.concatenate(fs)
    if not len(rs) or not len(fs):
        return rs[:0], np.zeros((0, cfg.size, cfg.size), bool)
    rng = np.random.default_rng(12345)
    pairs = [cutmix(rs[rng.integers(len(rs))], fs[rng.integers(len(fs))], rng) for _ in range(n)]
    return np.stack([x for x, _ in pairs]), np.stack([m for _, m in pairs])


def train_pixel_detector(inpainted: list[str | Path], out: str | Path, cfg: PixelConfig | None = None,
                         real: list[str | Path] = (), cutmix_fake: list[str | Path] = ()) -> dict:
    """Train the FCN on inpainted folders (optional: whole real images with empty masks; CutMix of `real` and
    `cutmix_fake` folders). Evaluate on the inpainted folders' test split; write OUT (detector, config.json,
    metrics.json {"pixel_ap", "iou", "iou_per_image", "n"})."""
    from difflab.core.runs import atomic_write_json, output_folder, write_metrics
    from difflab.core.trainer import TrainConfig, train
    from difflab.detect.model import PixelDetector, save_detector
    cfg = cfg or PixelConfig()
    if not inpainted and not cutmix_fake:
        raise DifflabError("give --inpainted folders (from `difflab detect inpaint`) or --cutmix-fake folders")
    if cutmix_fake and not real:
        raise DifflabError("CutMix needs --real folders to paste the fakes into")
    data = [read_masked_folder(f, cfg.size) for f in inpainted]
    tr = [(x[split_mask(p, "train", cfg.seed)], m[split_mask(p, "train", cfg.seed)]) for x, m, p in data]
    reals = [read_folder(f, cfg.size) for f in real]
    real_tr = [x[split_mask(p, "train", cfg.seed)] for x, p in reals]
    fakes_tr = [x[split_mask(p, "train", cfg.seed)] for x, p in (read_folder(f, cfg.size) for f in cutmix_fake)]
    pool_x = np.concatenate([x for x, _ in tr] + real_tr) if tr or real_tr else None
    pool_m = np.concatenate([m for _, m in tr] + [np.zeros(x.shape[:3], bool) for x in real_tr])
    model = PixelDetector(cfg.width)

    def batch_fn(step):
        rng = np.random.default_rng([cfg.seed, step])
        xs, ms = [], []
        for _ in range(cfg.batch_size):
            if fakes_tr and (pool_x is None or rng.random() < cfg.cutmix_prob):
                r = real_tr[rng.integers(len(real_tr))]
                f = fakes_tr[rng.integers(len(fakes_tr))]
                x, m = cutmix(r[rng.integers(len(r))], f[rng.integers(len(f))], rng)
            else:
                k = rng.integers(len(pool_x))
                x, m = pool_x[k], pool_m[k]
            x = augment(x, rng, cfg.augment)
            if cfg.augment.flip and rng.random() < 0.5:
                x, m = x[:, ::-1], m[:, ::-1]
            xs.append(x)
            ms.append(m)
        return {"x": to_tensor(xs), "m": torch.from_numpy(np.ascontiguousarray(np.stack(ms)))}

    def loss_fn(b):
        logits = model(b["x"])
        loss = dice_loss(logits, b["m"])
        return loss, {"iou": M.iou((logits > 0).cpu().numpy(), b["m"].cpu().numpy())}

    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=0.0, seed=cfg.seed, log_every=max(1, cfg.steps // 20),
                     checkpoint_every=0, progress=cfg.progress, desc="detect-pixel")
    with output_folder(Path(out)) as tmp:
        hist = train(model.trainable(), loss_fn, batch_fn, tc, modules=[model])
        model.eval()
        if data:
            te_x = np.concatenate([x[split_mask(p, "test", cfg.seed)] for x, _, p in data])
            te_m = np.concatenate([m[split_mask(p, "test", cfg.seed)] for _, m, p in data])
        else:   # CutMix only: composites of the test splits (fixed seed), which no training batch drew from
            te_x, te_m = cutmix_test_set(real, cutmix_fake, cfg)
        if not len(te_x):
            raise DifflabError("the test split (20 % of files by name) is empty; add images")
        res = {**pixel_metrics(predict_masks(model, te_x), te_m), "test": "inpainted" if data else "cutmix"}
        save_detector(model, tmp, {"size": cfg.size, "threshold": 0.5})
        atomic_write_json(tmp / "config.json", {"config": asdict(cfg), "inpainted": [str(Path(f).resolve()) for f in inpainted],
                                                "real": [str(Path(f).resolve()) for f in real],
                                                "cutmix_fake": [str(Path(f).resolve()) for f in cutmix_fake]})
        atomic_write_json(tmp / "history.json", hist)
        return write_metrics(tmp, res)


def localize(run: str | Path, image: str | Path, out: str | Path | None = None) -> dict:
    """The predicted inpainted region of one image: writes OUT (default IMAGE.overlay.png: the image with the
    region tinted red, beside the mask) and returns {"fake_fraction", "overlay"}."""
    from difflab.detect.model import load_detector
    model, cfg = load_detector(run, kind="pixel")
    x = read_image(image, cfg["size"])
    prob = predict_masks(model, x[None])[0]
    mask = prob > cfg["threshold"]
    tint = x.astype(np.float32)
    tint[mask] = 0.45 * tint[mask] + 0.55 * np.array([255, 0, 0])
    canvas = Image.new("RGB", (2 * x.shape[1] + 4, x.shape[0]), "white")
    canvas.paste(Image.fromarray(tint.astype(np.uint8)), (0, 0))
    canvas.paste(Image.fromarray((prob * 255).astype(np.uint8)).convert("RGB"), (x.shape[1] + 4, 0))
    scale = max(1, 256 // x.shape[0])   # tiny images are shown enlarged, pixels kept sharp
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    out = Path(out) if out else Path(image).with_suffix(".overlay.png")
    tmp = out.with_name(f".{out.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(out)
    return {"fake_fraction": float(mask.mean()), "overlay": str(out)}
