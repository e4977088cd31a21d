"""The gold standard of attribution (AbU's counterfactual test, section 5.1), made cheap by the shapes world.

For a query ẑ made by a model θ0 trained on D, each method names its top-K training images; a model θ_-K is
retrained from scratch on D without them (same initialisation, same seed, same order of the remaining images),
and the better method is the one whose removal hurts ẑ most:

    ΔL(ẑ) = L(ẑ, θ_-K) - L(ẑ, θ0)              (timesteps 0, 5, ..., 995; the same noise for both models)
    ΔG(ẑ) = d(G_θ0(ε, c), G_θ_-K(ε, c))        (the query regenerated with the same noise and prompt)

d is the shapes-CLIP cosine distance, the pixel MSE, and the share of the oracle's six factors that changed.
The paper retrains a 16-A100-hour COCO model per (query, method, K); here the model is a small UNet on 100
shapes images (the shipped VAE and text encoder frozen, as JourneyTRAK's COCO model freezes SD's), so every
retraining takes a few minutes on a CPU (`shard` splits them between processes). Every retraining is saved as
it finishes; a rerun resumes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflab.attribute.unlearn import (TrainingData, UnlearnConfig, attribute_by_unlearning, cached_fisher,
                                       cached_losses, forgetting, image_losses, training_data)
from difflab.core.diffusion import diffusion_loss
from difflab.core.runs import atomic_write_json, refuse_other_settings, write_metrics
from difflab.core.trainer import TrainConfig, train

METHODS = ("unlearn", "features", "tuned", "random")


@dataclass
class GoldConfig:
    # 100 images, 900 steps (288 epochs): a model that depends on particular images. At 300 images and 64 epochs
    # no method's removals changed the query's loss measurably (docs/BENCHMARKS.md, sessions 4 and 7)
    n_train: int = 100            # training images (world sample, base captions)
    # factors held fixed in the gold world (and never named): with only shape, colour and texture varying, a
    # small UNet learns to draw the shapes in a few hundred steps, so queries are shapes, not blobs
    fixed: dict = field(default_factory=lambda: {"size": "large", "position": "center", "background": "white"})
    data_seed: int = 31_000
    queries: int = 8
    query_seed: int = 32_000      # the queries' prompts (base captions that name a shape) and generation seeds
    k: int = 5                    # images removed per (query, method): 5% (the paper's K = 4000 is 3.4%)
    steps: int = 900              # small-model training steps (~140 s at 1 thread)
    batch: int = 32
    lr: float = 1e-3
    channels: tuple[int, ...] = (32, 32, 32)
    caption_dropout: float = 0.1  # for classifier-free guidance when the queries are generated
    seed: int = 0
    # how a retraining leaves the removed images out: "mask" keeps the base run's batches, noise and timesteps and
    # zeroes the removed images' loss terms (the batch mean keeps its denominator, so every other image's gradient
    # is the base run's); "skip" drops them from the order, so every later batch differs (the paper's literal
    # reading, whose trajectory noise swamped the effect in session 4: docs/BENCHMARKS.md)
    order: str = "mask"
    eval_stride: int = 5          # ΔL timesteps 0, 5, ..., 995 (the paper's stride)
    # deterministic kernels on CUDA: retrainings must differ by what they remove, not by CUDA's atomics (two
    # identical 4-step retrainings on an H100 differed by 1.5e-3 per weight without them; docs/BENCHMARKS.md)
    deterministic: bool = True
    methods: tuple[str, ...] = ("unlearn", "features", "random")
    encoder: str = "shapes-clip"  # the feature method's encoder
    tuned: str | None = None      # a tuned-heads folder (difflab attribute benchmark) for the "tuned" method
    # AbU on the small model: every parameter, α 1e-6. UnlearnConfig's K/V at α 3e-4 (set for the shipped model)
    # raised this model's training losses 3-4x over (`forgetting`), so its rankings followed fragile images, not the
    # query; chosen on query seed 32,000 and confirmed on 33,000 and 34,000 (docs/BENCHMARKS.md, session 9)
    unlearn: UnlearnConfig = field(default_factory=lambda: UnlearnConfig(params="full", lr=1e-6))


def small_unet(cfg: GoldConfig):
    from diffusers import UNet2DConditionModel

    from difflab.world.train import UNET_CONFIG
    torch.manual_seed(cfg.seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": tuple(cfg.channels)})


def training_order(n: int, keep: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The indices the training loop visits: epoch permutations of all n images with the removed ones skipped,
    so the remaining images keep their relative order (order "skip"; with nothing removed, also "mask")."""
    rng, out, total = np.random.default_rng(seed), [], 0
    while total < count:
        perm = rng.permutation(n)
        perm = perm[keep[perm]]
        out.append(perm)
        total += len(perm)
    return np.concatenate(out)[:count]


def train_small(data: TrainingData, empty: torch.Tensor, scheduler, cfg: GoldConfig, removed=(), progress: bool = False):
    """A small UNet trained from scratch on `data` without the `removed` indices; deterministic in cfg.seed.
    `empty` is the empty caption's embedding (caption dropout), `scheduler` the one the model trains with."""
    if cfg.order not in ("mask", "skip"):
        raise ValueError(f"GoldConfig.order must be 'mask' or 'skip', not {cfg.order!r}")
    unet = small_unet(cfg)
    keep = np.ones(len(data), bool)
    keep[list(removed)] = False
    visit = keep if cfg.order == "skip" else np.ones(len(data), bool)
    order = torch.from_numpy(training_order(len(data), visit, cfg.steps * cfg.batch, cfg.seed))
    kept = torch.from_numpy(keep)

    def batch_fn(i):
        idx = order[i * cfg.batch:(i + 1) * cfg.batch]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        c = data.c[idx].clone()
        c[torch.rand(len(idx), generator=g) < cfg.caption_dropout] = empty
        return data.z[idx], c, kept[idx].float(), g

    def loss_fn(b):
        z, c, w, g = b   # the noise and timesteps of all len(idx) images are drawn, kept or not
        return (diffusion_loss(unet, scheduler, z, c, generator=g, reduction="none") * w).sum() / len(w), {}

    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=min(50, cfg.steps // 10), lr_schedule="cosine",
                     weight_decay=0.0, seed=cfg.seed, desc="train", progress=progress, log_every=max(1, cfg.steps),
                     deterministic=cfg.deterministic)
    train({f"unet.{k}": v for k, v in unet.named_parameters()}, loss_fn, batch_fn, tc, modules=[unet])
    unet.eval().requires_grad_(False)
    return unet


def world_items(n: int, seed: int, fixed: dict):
    """World samples (base-training captions) with the `fixed` factors set and left out of the captions."""
    from difflab.world import dataset
    items = dataset.sample(n, seed)
    for it in items:
        it.factors.update(fixed)
        it.named = {f: v for f, v in it.named.items() if f not in fixed}
        it.caption = dataset.caption(it.factors, set(it.named))
    return items


def make_world(out: Path, cfg: GoldConfig) -> list[dict]:
    """The training folder (out/train) and the query prompts: base captions of fresh samples that name a shape."""
    from difflab.world import dataset
    train_dir = out / "train"
    if not (train_dir / "metadata.jsonl").exists():
        train_dir.mkdir(parents=True, exist_ok=True)
        dataset.write_folder(world_items(cfg.n_train, cfg.data_seed, cfg.fixed), train_dir)
    items = [it for it in world_items(cfg.queries * 20, cfg.query_seed, cfg.fixed) if "shape" in it.named][:cfg.queries]
    return [{"prompt": it.caption, "seed": cfg.query_seed + q, "factors": it.named} for q, it in enumerate(items)]


def _pipe_with(pipe, unet):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(**{**pipe.components, "unet": unet})


def _regenerate(pipe, unet, queries: list[dict]):
    from difflab.generate import generate_images
    p = _pipe_with(pipe, unet)
    p.set_progress_bar_config(disable=True)
    images = []
    for q in queries:
        images += generate_images(p, [q["prompt"]], seed=q["seed"], progress=False)[0]
    return images


def _image_distances(a, b) -> dict[str, list[float]]:
    """Per pair: shapes-CLIP cosine distance, pixel MSE (images in [0, 1]) and the share of oracle factors changed."""
    from difflab.core.data import to_pixels
    from difflab.metrics import cosine_distance, image_features
    from difflab.models import load_oracle
    fa, fb = image_features(a, "shapes-clip"), image_features(b, "shapes-clip")
    pa, pb = (to_pixels(a) + 1) / 2, (to_pixels(b) + 1) / 2
    oracle = load_oracle()
    ya, yb = oracle.predict(a), oracle.predict(b)
    changed = np.mean([[ra[f] != rb[f] for f in ra] for ra, rb in zip(ya, yb)], axis=1)
    return {"clip_distance": cosine_distance(fa, fb).tolist(), "mse": ((pa - pb) ** 2).flatten(1).mean(1).tolist(),
            "factors_changed": changed.tolist()}


def rank_training_set(method: str, q: int, pipe, data: TrainingData, zq, cq, query_image, cfg: GoldConfig,
                      fisher=None, before=None) -> torch.Tensor:
    """One query's score for every training image under one method (random: K seeded picks score K..1, the rest 0)."""
    if method == "random":
        scores = torch.zeros(len(data))
        scores[np.random.default_rng([cfg.seed, q]).choice(len(data), cfg.k, replace=False)] = torch.arange(cfg.k, 0, -1.0)
        return scores
    if method == "unlearn":
        scores = attribute_by_unlearning(pipe, data, zq, cq, cfg.unlearn, fisher, before, progress=False)
    elif method in ("features", "tuned"):
        from difflab.attribute.features import cached_features, embed_images
        feats, _ = cached_features(data.folder, cfg.encoder)
        query = embed_images([query_image], cfg.encoder)
        if method == "tuned":
            from difflab.attribute.tuned import load_heads
            heads = load_heads(cfg.tuned)
            feats, query = heads.real(feats), heads.synth(query)
        scores = (query @ feats.T)[0]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return scores


def gold_standard(out: str | Path, cfg: GoldConfig | None = None, progress: bool = True,
                  shard: tuple[int, int] = (0, 1)) -> dict:
    """Run the whole counterfactual test into `out` (resumable) and return the metrics (also metrics.json).

    `shard=(i, n)` retrains only every n-th (query, method) job from the i-th: n processes (or machines sharing
    `out`) split the retrainings, each after the same base model and rankings (computed by whichever comes first:
    both are deterministic). A shard that finishes before the others returns {"pending": [missing jobs]}; the last
    one to finish, or any later run, writes metrics.json."""
    from diffusers import UNet2DConditionModel
    from tqdm.auto import tqdm

    from difflab.core.data import encode_latents, encode_prompts, to_pixels
    from difflab.generate import save_images
    from difflab.models import load_pipeline
    cfg = cfg or GoldConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(asdict(cfg)))   # (tuples as JSON lists, to compare with the saved ones)
    # (a setting added since a folder was made counts as its default there: `deterministic` since session 11)
    refuse_other_settings(out, settings, defaults=json.loads(json.dumps(asdict(GoldConfig()))))
    atomic_write_json(out / "config.json", settings)
    t0 = time.time()
    queries = make_world(out, cfg)
    pipe = load_pipeline("shapes")
    data = training_data(pipe, out / "train")
    empty = encode_prompts(pipe, [""])[0]

    base_dir = out / "base"
    if (base_dir / "config.json").exists():
        unet0 = UNet2DConditionModel.from_pretrained(base_dir).eval().requires_grad_(False)
    else:
        unet0 = train_small(data, empty, pipe.scheduler, cfg, progress=progress)
        unet0.save_pretrained(base_dir)
    pipe0 = _pipe_with(pipe, unet0)
    qdir = out / "queries"
    if not (qdir / "metadata.jsonl").exists():
        qdir.mkdir(exist_ok=True)
        images = _regenerate(pipe, unet0, queries)
        save_images(images, [{"file": f"{i:03d}.png", **q} for i, q in enumerate(queries)], qdir)
    from difflab.core.data import load_folder_images
    q_images = load_folder_images(qdir)
    zq = encode_latents(pipe.vae, to_pixels(q_images))
    cq = encode_prompts(pipe, [q["prompt"] for q in queries])
    n_t = pipe.scheduler.config.num_train_timesteps
    loss0 = image_losses(unet0, pipe.scheduler, zq, cq, n_t // cfg.eval_stride, seed=cfg.seed + 1, progress=False)

    rank_path = out / "rankings.json"
    rankings = json.loads(rank_path.read_text()) if rank_path.exists() else {}
    forgot_path = out / "forgetting.json"
    forgot = json.loads(forgot_path.read_text()) if forgot_path.exists() else {}
    fisher = before = None
    for m in cfg.methods:
        for q in range(len(queries)):
            key = f"{m}-{q}"
            if key in rankings:
                continue
            if m == "unlearn" and fisher is None:
                fisher = cached_fisher(unet0, pipe.scheduler, data, cfg.unlearn, progress=progress)
                before = cached_losses(unet0, pipe.scheduler, data, cfg.unlearn, progress)
            scores = rank_training_set(m, q, pipe0, data, zq[q:q + 1], cq[q:q + 1], q_images[q], cfg, fisher, before)
            rankings[key] = scores.topk(cfg.k).indices.tolist()
            if m == "unlearn":   # how much unlearning this query made the model forget overall (unlearn.forgetting)
                forgot[str(q)] = forgetting(scores, before)
                atomic_write_json(forgot_path, forgot)
            atomic_write_json(rank_path, rankings)

    rdir = out / "retrain"
    rdir.mkdir(exist_ok=True)
    # query-major, so that a partial run (or the first jobs of every shard) covers every method
    jobs = [(m, q) for q in range(len(queries)) for m in cfg.methods]
    i, n = shard
    for m, q in tqdm(jobs[i::n], desc="retrain", disable=not progress):
        path = rdir / f"{m}-{q}.json"
        if path.exists():
            continue
        unet = train_small(data, empty, pipe.scheduler, cfg, removed=rankings[f"{m}-{q}"])
        loss = image_losses(unet, pipe.scheduler, zq[q:q + 1], cq[q:q + 1], n_t // cfg.eval_stride, seed=cfg.seed + 1,
                            progress=False, ids=torch.tensor([q]))[0]   # the noise loss0[q] saw
        regen = _regenerate(pipe, unet, [queries[q]])[0]
        regen.save(rdir / f"{m}-{q}.png")
        d = _image_distances([q_images[q]], [regen])
        atomic_write_json(path, {"loss_increase": float(loss - loss0[q]), **{k: v[0] for k, v in d.items()}})

    pending = [f"{m}-{q}" for m, q in jobs if not (rdir / f"{m}-{q}.json").exists()]
    if pending:
        return {"pending": pending}
    metrics = {}
    for m in cfg.methods:
        rows = [json.loads((rdir / f"{m}-{q}.json").read_text()) for q in range(len(queries))]
        metrics[m] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        metrics[m]["per_query"] = {k: [r[k] for r in rows] for k in rows[0]}
    if "unlearn" in metrics and forgot:
        metrics["unlearn"]["forgetting"] = float(np.mean(list(forgot.values())))
    if "random" in metrics:
        base = metrics["random"]["loss_increase"]
        for m in cfg.methods:
            metrics[m]["loss_increase_vs_random"] = metrics[m]["loss_increase"] / base if base > 0 else float("nan")
    metrics["queries"] = len(queries)
    metrics["k"] = cfg.k
    metrics["n_train"] = cfg.n_train
    metrics["query_loss_base"] = loss0.tolist()
    metrics["seconds"] = round(time.time() - t0, 1)
    write_metrics(out, metrics)
    return metrics
