"""Image-level detection: train, update online with replay, evaluate, score.

Training follows CNNDetection: binary cross-entropy on logits, fake = 1, blur + JPEG augmentation after the
resize and before the crop, random crop and flip. Batches are half real, half fake; the fake half is drawn
across the fake folders by weight, so a small new generator is not drowned by the ones before it. Every
folder is split by file name (70 % train, 10 % val, 20 % test, `data.split_of`): the decision threshold is
calibrated on val, and every figure in metrics.json is on test, which no training step saw.

    ap        average precision, fake = positive (threshold-free; the main figure, as in both papers)
    acc       balanced accuracy at p = 0.5;  acc_real / acc_fake its two halves
    acc_best  balanced accuracy at the best threshold on test itself (UniversalFakeDetect's "oracle" accuracy)
    acc_calibrated  at the threshold calibrated on val (what `detect score` uses)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab import metrics as M
from difflab.detect.data import AugmentConfig, augment, crop, read_folder, split_mask
from difflab.detect.model import BUILTIN, Detector, load_detector, save_detector
from difflab.errors import DifflabError


@dataclass
class DetectConfig:
    backbone: str = BUILTIN       # "cnn", or a backbone with a linear head ("shapes-clip", CLIP, DINO, ResNet)
    tune: str = "probe"           # for a named backbone: "probe" (frozen, UFD) or "full" (CNNDetection)
    width: int = 32               # the built-in CNN's width
    crop_size: int | None = None  # model input; default: the backbone's image size (32 for "cnn")
    load_size: int | None = None  # images are first resized to this (shorter side) and centre-cropped square
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    new_weight: float = 0.5       # update: share of the fake half drawn from the new folders (rest: replay)
    seed: int = 0
    progress: bool = True

    def resolve_sizes(self, model: Detector) -> None:
        if self.crop_size is None:
            self.crop_size = 32 if model.backbone_name == BUILTIN else model.features.image_size
        if self.load_size is None:   # CNNDetection: 256 -> crop 224; no crop margin for tiny images
            self.load_size = self.crop_size if self.crop_size <= 64 else round(self.crop_size * 256 / 224)
        if self.load_size < self.crop_size:
            raise DifflabError(f"--load-size {self.load_size} is smaller than the crop {self.crop_size}")

    @classmethod
    def from_dict(cls, d: dict) -> "DetectConfig":
        d = dict(d)
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Source:
    """One folder: its label (0 real, 1 fake), name, images (N, S, S, 3) uint8 and file paths."""
    name: str
    label: int
    folder: str
    images: np.ndarray
    paths: list[str]

    def split(self, split: str | None, seed: int = 0) -> np.ndarray:
        return self.images[split_mask(self.paths, split, seed)]


def load_sources(folders: list[str | Path], label: int, size: int, taken: set[str] | None = None) -> list[Source]:
    """Read folders; names are the folder names, made unique ("fake", "fake-2") across `taken`."""
    taken = taken if taken is not None else set()
    out = []
    for f in folders:
        base = Path(f).resolve().name or "images"
        name, k = base, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name)
        images, paths = read_folder(f, size)
        out.append(Source(name, label, str(Path(f).resolve()), images, paths))
    return out


def to_tensor(arrays: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], contiguous (a channels-last view would send some
    backbones down channels-last kernels: torch 2.13's CPU ResNet backward segfaults on them)."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(list(arrays)))).permute(0, 3, 1, 2).float().div(255).contiguous()


def training_batches(reals: list[np.ndarray], fakes: list[np.ndarray], fake_weights: list[float],
                     cfg: DetectConfig):
    """batch_fn(step) for the core loop: a function of the step alone, so runs are reproducible."""
    real_pool = np.concatenate(reals)
    w = np.asarray(fake_weights, np.float64)
    w = w / w.sum()

    def prep(a, rng):   # resize (done at load) -> blur/JPEG -> crop -> flip
        a = crop(augment(a, rng, cfg.augment), cfg.crop_size, rng)
        return a[:, ::-1] if cfg.augment.flip and rng.random() < 0.5 else a

    def batch_fn(step: int) -> dict:
        rng = np.random.default_rng([cfg.seed, step])
        half = cfg.batch_size // 2
        imgs = [prep(real_pool[i], rng) for i in rng.integers(len(real_pool), size=half)]
        for s in rng.choice(len(fakes), size=cfg.batch_size - half, p=w):
            imgs.append(prep(fakes[s][rng.integers(len(fakes[s]))], rng))
        y = torch.tensor([0.0] * half + [1.0] * (cfg.batch_size - half))
        return {"x": to_tensor(imgs), "y": y}
    return batch_fn


def fit(model: Detector, reals: list[np.ndarray], fakes: list[np.ndarray], fake_weights: list[float],
        cfg: DetectConfig) -> dict:
    """Minimise BCE(logit(x), y) over `cfg.steps` balanced batches through the core training loop."""
    from difflab.core.trainer import TrainConfig, train
    if any(len(a) == 0 for a in reals + fakes):
        raise DifflabError("a folder has no images in its training split (70 % by file name); add images")

    def loss_fn(b):
        logits = model(b["x"])
        loss = F.binary_cross_entropy_with_logits(logits, b["y"])
        return loss, {"acc": ((logits > 0).float() == b["y"]).float().mean().item()}

    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, max_grad_norm=1.0,
                     log_every=max(1, cfg.steps // 20), checkpoint_every=0, progress=cfg.progress,
                     desc=f"detect-{model.backbone_name}")
    hist = train(model.trainable(), loss_fn, training_batches(reals, fakes, fake_weights, cfg), tc, modules=[model])
    model.eval()
    return hist


@torch.no_grad()
def predict(model: Detector, images: np.ndarray, crop_size: int, batch_size: int = 256) -> np.ndarray:
    """P(fake) for uint8 images (N, S, S, 3), centre-cropped to the model's input."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor([crop(a, crop_size, None) for a in images[i:i + batch_size]])
        out.append(torch.sigmoid(model(x)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def detection_metrics(p_real: np.ndarray, p_fake: np.ndarray, threshold: float | None = None) -> dict:
    scores = np.concatenate([p_real, p_fake])
    labels = np.concatenate([np.zeros(len(p_real)), np.ones(len(p_fake))])
    acc, acc_real, acc_fake = M.balanced_accuracy(scores, labels, 0.5)
    out = {"ap": M.average_precision(scores, labels), "auc": M.auc(scores, labels), "acc": acc,
           "acc_real": acc_real, "acc_fake": acc_fake, "acc_best": M.best_threshold(scores, labels)[1]}
    if threshold is not None:
        out["acc_calibrated"] = M.balanced_accuracy(scores, labels, threshold)[0]
    return out


def evaluate(model: Detector, reals: list[Source], fakes: list[Source], crop_size: int,
             split: str = "test", threshold: float | None = None) -> dict:
    """Pooled metrics over every fake folder, and per fake folder against the same reals."""
    p_real = np.concatenate([predict(model, s.split(split), crop_size) for s in reals])
    p_fake = {s.name: predict(model, s.split(split), crop_size) for s in fakes}
    res = detection_metrics(p_real, np.concatenate(list(p_fake.values())), threshold)
    res["per_fake"] = {k: detection_metrics(p_real, v, threshold) for k, v in p_fake.items()}
    res["n_real"], res["n_fake"] = int(len(p_real)), int(sum(len(v) for v in p_fake.values()))
    return res


def calibrate(model: Detector, reals: list[Source], fakes: list[Source], crop_size: int) -> float:
    """The threshold on P(fake) that maximises balanced accuracy on the val split."""
    p_real = np.concatenate([predict(model, s.split("val"), crop_size) for s in reals])
    p_fake = np.concatenate([predict(model, s.split("val"), crop_size) for s in fakes])
    if not len(p_real) or not len(p_fake):
        return 0.5
    labels = np.concatenate([np.zeros(len(p_real)), np.ones(len(p_fake))])
    return M.best_threshold(np.concatenate([p_real, p_fake]), labels)[0]


def _save_run(tmp: Path, model: Detector, cfg: DetectConfig, reals: list[Source], fakes: list[Source],
              log: list[dict], hist: dict) -> dict:
    """Calibrate, evaluate on test, write detector + config.json + metrics.json into the run folder."""
    from difflab.core.runs import atomic_write_json, write_metrics
    threshold = calibrate(model, reals, fakes, cfg.crop_size)
    res = evaluate(model, reals, fakes, cfg.crop_size, "test", threshold)
    res["threshold"] = threshold
    save_detector(model, tmp, {"crop_size": cfg.crop_size, "load_size": cfg.load_size, "threshold": threshold})
    atomic_write_json(tmp / "config.json", {"config": asdict(cfg), "real": [s.folder for s in reals],
                                            "fake": [s.folder for s in fakes], "log": log})
    atomic_write_json(tmp / "history.json", hist)
    return write_metrics(tmp, res)


def train_detector(real: list[str | Path], fake: list[str | Path], out: str | Path,
                   cfg: DetectConfig | None = None) -> dict:
    """Train a detector on real and fake folders; write the run to `out` (atomically). Returns metrics."""
    from difflab.core.runs import output_folder
    cfg = cfg or DetectConfig()
    if not real or not fake:
        raise DifflabError("detection needs at least one --real and one --fake folder")
    model = Detector(cfg.backbone, cfg.width, cfg.tune)
    cfg.resolve_sizes(model)
    taken: set[str] = set()
    reals, fakes = load_sources(real, 0, cfg.load_size, taken), load_sources(fake, 1, cfg.load_size, taken)
    with output_folder(Path(out)) as tmp:
        hist = fit(model, [s.split("train") for s in reals], [s.split("train") for s in fakes],
                   [1.0] * len(fakes), cfg)
        log = [{"op": "train", "fake": [s.folder for s in fakes], "steps": cfg.steps}]
        return _save_run(tmp, model, cfg, reals, fakes, log, hist)


def update_detector(run: str | Path, fake: list[str | Path], out: str | Path | None = None,
                    real: list[str | Path] = (), steps: int | None = None, replay: bool = True,
                    progress: bool = True) -> dict:
    """Online update: continue from RUN's weights on new fake folders (and optional new reals), replaying the
    run's earlier folders so old generators are not forgotten. The new folders get `new_weight` of the fake
    half of each batch, the earlier ones share the rest. Writes to `out` (default: RUN, replaced atomically)."""
    from difflab.core.runs import output_folder
    run = Path(run)
    model, dcfg = load_detector(run, kind="image")
    try:
        meta = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DifflabError(f"{run} has no readable config.json (was it written by `difflab detect train`?)") from e
    cfg = DetectConfig.from_dict(meta["config"])
    cfg.progress = progress
    if steps is not None:
        cfg.steps = steps
    if not fake:
        raise DifflabError("update needs at least one new --fake folder")
    old_real, old_fake = (meta["real"], meta["fake"]) if replay else ([], [])
    for f in old_real + old_fake:
        if not Path(f).is_dir():
            raise DifflabError(f"replay folder {f} (from {run}/config.json) is gone; restore it or pass --no-replay")
    new_fake = [str(Path(f).resolve()) for f in fake]
    old_fake = [f for f in old_fake if f not in new_fake]
    taken: set[str] = set()
    reals = load_sources(list(dict.fromkeys(old_real + [str(Path(r).resolve()) for r in real])), 0, cfg.load_size, taken)
    if not reals:
        raise DifflabError("update without replay needs --real folders")
    olds, news = load_sources(old_fake, 1, cfg.load_size, taken), load_sources(new_fake, 1, cfg.load_size, taken)
    w_new = cfg.new_weight if olds else 1.0
    weights = [(1 - w_new) / max(1, len(olds))] * len(olds) + [w_new / len(news)] * len(news)
    with output_folder(Path(out or run)) as tmp:
        hist = fit(model, [s.split("train") for s in reals], [s.split("train") for s in olds + news], weights, cfg)
        log = meta.get("log", []) + [{"op": "update", "fake": new_fake, "steps": cfg.steps, "replay": replay}]
        return _save_run(tmp, model, cfg, reals, olds + news, log, hist)


def score_images(run: str | Path, paths: list[str | Path]) -> list[dict]:
    """P(fake) of each image (folders are expanded), with the verdict at the run's calibrated threshold."""
    from difflab.detect.data import list_images, read_image
    model, cfg = load_detector(run, kind="image")
    files = []
    for p in paths:
        if Path(p).is_dir():
            files += list_images(p)
        elif Path(p).is_file():
            files.append(Path(p))
        else:
            raise DifflabError(f"{p} does not exist")
    if not files:
        raise DifflabError("no images to score")
    images = np.stack([read_image(f, cfg["load_size"]) for f in files])
    probs = predict(model, images, cfg["crop_size"])
    return [{"file": str(f), "p_fake": round(float(p), 6), "fake": bool(p > cfg["threshold"])}
            for f, p in zip(files, probs)]
