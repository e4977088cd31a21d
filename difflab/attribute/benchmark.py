"""An AbC-style attribution benchmark built on the shapes world (AbC: Wang et al., ICCV 2023, section 3).

Ground truth by construction: each Custom Diffusion model is taught a concept from a few exemplar images, so the
images it synthesizes with the concept's token are influenced by those exemplars. Attribution is then retrieval:
rank the exemplars of the query's own model among distractors (here: the shapes model's training set, AbC's
LAION subset), scored by Recall@K (K = 5, 10, 100) and AP = (1/|E|) Σ_j j / rank_j, as AbC's eval.py.

Two families, as the paper's object- and style-centric models:
- object: one exemplar showing a held-out shape (heart or moon) with random colour, texture, size, place and
  background; synthesized with "a <new1> shape", optionally on another background, at another size or place;
- style: three exemplars sharing the held-out texture "dotted" and one colour on different trained shapes;
  synthesized as "a <new1> {shape}" for trained shapes. `style="all-but-shape"`: the three exemplars agree on
  every factor but the shape (texture dotted, colour, background, place; size large) and are captioned with their shape
  ("a <new1> star"), so the token carries the style and few distractors share it (with "texture", 40-64
  distractors match a query's shape, texture and colour: docs/BENCHMARKS.md); `style="combination"` is the same
  with a trained texture (the models copy everything but the held-out texture).
The first half of the models is the training split (it fits the tuned heads), the second half the test split.
Distractors that are exact copies of an exemplar (the world is discrete: same six factors, same pixels) are
left out of that model's candidates, since no method could tell them apart.

Two measurements say how much of the ground truth a query carries, so that a method's score can be read against
what is attainable: `fidelity`, the share of each family's queries in which the oracle sees the exemplars'
held-out value (the object's shape; the style's texture and colour), and the `oracle` row, retrieval with the
oracle's factor probabilities as the feature (a feature that reads every factor of the world exactly). The base
training set draws held-out values too (it only never names them), so distractors share most factors with an
exemplar, and a query that does not copy its exemplar's incidental factors cannot single it out.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from difflab.attribute.features import cached_features, embed_images
from difflab.attribute.tuned import TuneConfig, save_heads, train_heads, whitening_only
from difflab.attribute.unlearn import TrainingData, UnlearnConfig, attribute_by_unlearning, sweep_losses
from difflab.core.runs import atomic_write_json, refuse_other_settings, write_metrics
from difflab.customize import CustomizeConfig
from difflab.errors import DifflabError


def _customize_defaults() -> CustomizeConfig:
    # lr 2e-3: the paper's 1e-5-scale rates barely move the shapes model in 400 steps (docs/BENCHMARKS.md,
    # Customize); no augmentation: the exemplars' size and place are part of what the model should copy
    return CustomizeConfig(steps=400, lr=2e-3, augment=False, progress=False)


@dataclass
class BenchmarkConfig:
    models: int = 16                 # Custom Diffusion models: the first half train the heads, the second test
    extra_train_models: int = 40     # more models for the heads only (AbC tunes on many more models than it tests)
    synth_per_model: int = 16
    distractors: int = 10_000        # the first N images of the shapes model's training set (0: all 60,000)
    concept_seed: int = 40_000
    encoder: str = "shapes-clip"
    customize: CustomizeConfig = field(default_factory=_customize_defaults)
    tune: TuneConfig = field(default_factory=TuneConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    unlearn_queries: int = 2         # AbU queries per test model (0: skip AbU); AbU ran on 400 of AbC's queries
    unlearn_distractors: int = 2000  # AbU's candidates: exemplars + this many distractors (AbU used 100k of 1M)
    style: str = "texture"           # what a style model's exemplars share: "texture" (+ colour), "all-but-shape"
                                     # (dotted, colour, background, place, large) or "combination" (same, trained texture)
    seed: int = 0
    heads_per_kind: bool = False     # one pair of heads per family (object, style), each scoring its own queries:
                                     # AbC's object-only and style-only heads (released as an ablation)
    folds: int = 0                   # also K-fold cross-validation over every built model (metrics.json "crossval"):
                                     # each model scored by heads fitted without it; 8 test models are few


def folder_config(out: str | Path) -> BenchmarkConfig:
    """The settings a built benchmark folder's config.json records (a field it does not know takes its default)."""
    known = lambda cls, d: {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
    nested = {"customize": CustomizeConfig, "tune": TuneConfig, "unlearn": UnlearnConfig}
    raw = known(BenchmarkConfig, json.loads((Path(out) / "config.json").read_text()))
    return BenchmarkConfig(**{k: nested[k](**known(nested[k], v)) if k in nested else v for k, v in raw.items()})


def concepts(cfg: BenchmarkConfig) -> list[dict]:
    """The exemplar sets and synthesis prompts of every model, deterministic in cfg.concept_seed."""
    from difflab.world import dataset
    from difflab.world.draw import FACTORS, values
    rng = np.random.default_rng(cfg.concept_seed)
    held_shapes, trained_shapes = FACTORS["shape"][1], FACTORS["shape"][0]
    out = []
    for j in range(cfg.models + cfg.extra_train_models):   # model j is the same whatever the total
        if j % 2 == 0:
            kind = "object"
            ex = [dataset.sample_item(rng, True, {"shape": held_shapes[(j // 2) % len(held_shapes)]}).factors]
            prompts = []
            for _ in range(cfg.synth_per_model):
                f, v = [("", ""), ("background", rng.choice(values("background"))), ("size", rng.choice(values("size"))),
                        ("position", rng.choice(values("position")))][rng.integers(4)]
                prompts.append({"": "a <new1> shape", "background": f"a <new1> shape on a {v} background",
                                "size": f"a {v} <new1> shape", "position": f"a <new1> shape at the {v}"}[f])
        else:
            kind = "style"
            color = values("color")[rng.integers(len(values("color")))]
            if cfg.style == "texture":
                ex = [dataset.sample_item(rng, False, {"texture": "dotted", "color": color,
                                                       "shape": trained_shapes[rng.integers(len(trained_shapes))]}).factors
                      for _ in range(3)]
            elif cfg.style in ("all-but-shape", "combination"):
                # "combination": a trained texture instead of the held-out one, which the models copy least (taken
                # in turn, not drawn, so that every other model is the same as under "all-but-shape")
                texture = "dotted" if cfg.style == "all-but-shape" else FACTORS["texture"][0][(j // 2) % 3]
                shared = dataset.sample_item(rng, False, {"texture": texture, "color": color, "size": "large"}).factors
                ex = [{**shared, "shape": str(s)} for s in rng.choice(trained_shapes, 3, replace=False)]
            else:
                raise DifflabError(f"unknown style {cfg.style!r}; use texture, all-but-shape or combination")
            prompts = [f"a <new1> {trained_shapes[rng.integers(len(trained_shapes))]}" for _ in range(cfg.synth_per_model)]
        out.append({"kind": kind, "exemplars": ex, "prompts": prompts})
    return out


def _write_exemplars(folder: Path, factor_list: list[dict], name_shape: bool = False) -> None:
    from difflab.world.draw import render
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as fh:
        for i, f in enumerate(factor_list):
            render(f).save(folder / f"{i:02d}.png")
            prompt = f"a <new1> {f['shape']}" if name_shape else "a <new1> shape"
            fh.write(json.dumps({"file": f"{i:02d}.png", "prompt": prompt, "factors": f}) + "\n")


def _model_customize(cfg: BenchmarkConfig, j: int) -> CustomizeConfig:
    return CustomizeConfig(**{**asdict(cfg.customize), "seed": cfg.seed + j})


def build(out: Path, cfg: BenchmarkConfig, progress: bool = True,
          shard: tuple[int, int] = (0, 1)) -> tuple[list[dict], list[int]]:
    """Distractors, exemplars, one Custom Diffusion model per concept and its synthesized images (resumable).

    With `shard=(i, n)` this process builds only the models j with j % n == i, so n processes (or machines sharing
    `out`) split them; what the models share (the distractors, the class images, made with model 0's settings) is
    deterministic, made by whichever process comes first and renamed into place whole. Model j is the same however
    the work is split. Returns the concepts and the models not built yet (by other shards)."""
    from tqdm.auto import tqdm

    from difflab.customize import Concept, class_latents, regularisation_prompts, save_weights, train_concepts
    from difflab.generate import generate_images, save_images
    from difflab.models import load_pipeline
    from difflab.world import dataset
    dis = out / "distractors"
    if not (dis / "metadata.jsonl").exists():
        tmp = out / f".distractors.{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        dataset.write_folder(dataset.training_set(cfg.distractors or dataset.TRAIN_SIZE), tmp)
        try:
            tmp.rename(dis)
        except OSError:   # another shard got there first, with the same images
            shutil.rmtree(tmp)
    cons = concepts(cfg)
    def done(j: int) -> bool:
        return (out / "models" / f"{j:02d}" / "synth" / "metadata.jsonl").exists()
    i, n = shard
    mine = [j for j in range(len(cons)) if j % n == i and not done(j)]
    if mine:   # the class images every model trains with: model 0's, whichever model this process starts with
        c0 = _model_customize(cfg, 0)
        class_latents(load_pipeline("shapes"), regularisation_prompts(Concept(""), c0), c0.num_class_images, c0,
                      out / "class" / "0.safetensors")
    for j in tqdm(mine, desc="models", disable=not progress):
        c, d = cons[j], out / "models" / f"{j:02d}"
        named = c["kind"] == "style" and cfg.style != "texture"   # the exemplars' captions name their shape
        _write_exemplars(d / "exemplars", c["exemplars"], named)
        pipe = load_pipeline("shapes")
        ccfg = _model_customize(cfg, j)
        train_concepts(pipe, [Concept(str(d / "exemplars"), captions=named)], ccfg, work=out)
        (d / "weights").mkdir(parents=True, exist_ok=True)
        save_weights(pipe, d / "weights", ["<new1>"], ccfg.params, base="shapes", extra={"kind": c["kind"]})
        pipe.set_progress_bar_config(disable=True)
        images, records = generate_images(pipe, c["prompts"], seed=cfg.concept_seed + 1000 * j, progress=False)
        (d / "synth").mkdir(exist_ok=True)
        save_images(images, records, d / "synth", extra={"model": j, "kind": c["kind"]})
    return cons, [j for j in range(len(cons)) if not done(j)]


def _features(folder: Path, encoder: str) -> torch.Tensor:
    from difflab.core.data import load_folder_images
    return embed_images(load_folder_images(folder), encoder)


@torch.no_grad()
def oracle_features(images, oracle=None, batch_size: int = 500, readout: bool = True) -> torch.Tensor:
    """The oracle's per-factor probabilities, concatenated and L2-normalised: the reference feature. With
    readout=False, the 256-d features its factor heads read (L2-normalised): the oracle's network as an encoder
    supervised on every factor, as AbC uses an ImageNet-supervised ViT."""
    from difflab.models import load_oracle
    from difflab.world.oracle import to_tensor
    oracle = (oracle or load_oracle()).eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i:i + batch_size]).to(oracle.device)
        out.append((oracle.readings(x) if readout else oracle.features(x)).cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def shows_concept(synth_images, concept: dict, oracle=None) -> list[bool]:
    """Per synthesized image of a model: whether it shows its exemplars' held-out value, as the oracle reads it
    (the shape for an object, the texture and colour for a style)."""
    from difflab.models import load_oracle
    ex = concept["exemplars"][0]
    keys = ("shape",) if concept["kind"] == "object" else ("texture", "color")
    return [all(p[k] == ex[k] for k in keys) for p in (oracle or load_oracle()).predict(synth_images)]


def fidelity(synth_images, concept: dict, oracle=None) -> float:
    """Share of a model's synthesized images that show its exemplars' held-out value (`shows_concept`)."""
    return float(np.mean(shows_concept(synth_images, concept, oracle)))


def benchmark_features(out: Path, cfg: BenchmarkConfig, ids):
    """({model j: its exemplars' features}, {j: its queries' features}, distractor features, distractor factors as
    sorted JSON) of the models `ids` of a built benchmark folder, under cfg.encoder."""
    from difflab.core.data import read_metadata
    dis_feats, _ = cached_features(out / "distractors", cfg.encoder)
    dis_factors = [json.dumps(r["factors"], sort_keys=True) for r in read_metadata(out / "distractors")]
    ex = {j: _features(out / "models" / f"{j:02d}" / "exemplars", cfg.encoder) for j in ids}
    syn = {j: _features(out / "models" / f"{j:02d}" / "synth", cfg.encoder) for j in ids}
    return ex, syn, dis_feats, dis_factors


def fit_heads(train_ids, cons, ex, syn, dis: torch.Tensor, tcfg: TuneConfig, per_kind: bool = False) -> dict:
    """{None: heads fitted on every training model} or, per_kind, {"object": ..., "style": ...}, each pair fitted
    on its family's models only."""
    heads = {}
    for kind in ("object", "style") if per_kind else (None,):
        fit = [j for j in train_ids if kind in (None, cons[j]["kind"])]
        if not fit:
            raise DifflabError(f"heads per family need training models of each family; none is a {kind} model "
                               "(add --extra-train-models)")
        s, g = stack_groups(fit, syn)
        e, ge = stack_groups(fit, ex)
        heads[kind] = train_heads(s, g, e, ge, dis, tcfg)
    return heads


def kind_scorer(heads: dict, cons, dis: torch.Tensor, ex, syn):
    """feature_scorer for the heads of `fit_heads`: a query of model j is scored by its family's heads."""
    scorers = {kind: feature_scorer(dis, ex, syn, h) for kind, h in heads.items()}
    return lambda j, q, keep: scorers[cons[j]["kind"] if None not in scorers else None](j, q, keep)


def feature_scorer(dis: torch.Tensor, ex, syn, heads):
    """score_queries' scores_fn for features: query q of model j against the kept distractors, then its model's
    exemplars, untuned, whitened only (when the heads whiten) and tuned. The distractors are mapped once."""
    white = whitening_only(heads) if heads.whitened else None
    with torch.no_grad():
        real_dis = heads.real(dis)
        white_dis = white.real(dis) if white else None

    @torch.no_grad()
    def scores(j: int, q: int, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"features": torch.cat([dis[keep], ex[j]]) @ syn[j][q]}
        if white is not None:
            out["whitened"] = torch.cat([white_dis[keep], white.real(ex[j])]) @ white.synth(syn[j][q:q + 1])[0]
        out["tuned"] = torch.cat([real_dis[keep], heads.real(ex[j])]) @ heads.synth(syn[j][q:q + 1])[0]
        return out
    return scores


def stack_groups(ids, feats) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of models `ids` stacked, and the model each row belongs to (train_heads' groups)."""
    return torch.cat([feats[j] for j in ids]), torch.cat([torch.full((len(feats[j]),), j) for j in ids])


def score_queries(ids, cons: list[dict], dis_factors: list[str], n_queries, n_exemplars,
                  scores_fn) -> dict[str, list[dict]]:
    """AbC's metrics of every query of models `ids` (n_queries[j] queries, n_exemplars[j] exemplars):
    scores_fn(j, q, keep) -> {method: scores over the kept distractors then model j's exemplars}.
    Returns {method: [{"model", "query", "map", "recall@K", ...} per query]}."""
    per: dict[str, list[dict]] = {}
    for j in ids:
        keep = kept_distractors(cons[j], dis_factors)
        for q in range(n_queries[j]):
            for name, scores in scores_fn(j, q, keep).items():
                per.setdefault(name, []).append({"model": j, "query": q, **rank_metrics(scores, n_exemplars[j])})
    return per


def crossval_folds(ids, cons: list[dict], k: int) -> list[list[int]]:
    """k folds of models `ids`: each family's models dealt round-robin in model order, so every fold holds its
    share of both families and the heads fitted on the other folds see both."""
    if not 2 <= k <= len(ids):
        raise DifflabError(f"cross-validation needs 2 to {len(ids)} folds (one model each at most), not {k}")
    folds = [[] for _ in range(k)]
    for kind in ("object", "style"):
        for i, j in enumerate(j for j in ids if cons[j]["kind"] == kind):
            folds[i % k].append(j)
    return [sorted(f) for f in folds if f]


def cross_validate(ids, k: int, cons: list[dict], ex, syn, dis: torch.Tensor, dis_factors: list[str],
                   tcfg: TuneConfig, per_kind: bool = False, extra_scores=None) -> dict[str, list[dict]]:
    """K-fold cross-validation of the tuned heads over models `ids` (crossval_folds): each fold's queries scored
    (score_queries' rows) by heads fitted on the other folds' models, so every model is a test model once and none
    is scored by heads that saw it. A fixed test split of a few models measures Recall@10 to +-0.1 (the models'
    queries succeed or fail together); this uses every built model. extra_scores(j, q, keep): more methods' rows
    (the oracle's reference)."""
    per: dict[str, list[dict]] = {}
    for fold in crossval_folds(ids, cons, k):
        heads = fit_heads([j for j in ids if j not in fold], cons, ex, syn, dis, tcfg, per_kind)
        scorer = kind_scorer(heads, cons, dis, ex, syn)
        scores = scorer if extra_scores is None else \
            lambda j, q, keep: {**scorer(j, q, keep), **extra_scores(j, q, keep)}
        for m, rows in score_queries(fold, cons, dis_factors, {j: len(syn[j]) for j in fold},
                                     {j: len(ex[j]) for j in fold}, scores).items():
            per.setdefault(m, []).extend(rows)
    return per


def summarize(per: dict[str, list[dict]], cons: list[dict]) -> dict:
    """score_queries' rows -> {method: mean metrics, "by_kind": {family: {method: mean metrics}}, "ci95": intervals
    over the models (model_intervals), "queries": how many}."""
    metrics_only = lambda r: {k: v for k, v in r.items() if k not in ("model", "query")}
    out = {m: _mean([metrics_only(r) for r in rows]) for m, rows in per.items()}
    kinds = [kind for kind in ("object", "style") if any(cons[r["model"]]["kind"] == kind for r in per["features"])]
    out["by_kind"] = {kind: {m: _mean([metrics_only(r) for r in rows if cons[r["model"]]["kind"] == kind])
                             for m, rows in per.items()} for kind in kinds}
    out["ci95"] = model_intervals(per)
    out["queries"] = len(per["features"])
    return out


def _split(cfg: BenchmarkConfig) -> tuple[list[int], list[int]]:
    n = cfg.models
    return list(range(n // 2)) + list(range(n, n + cfg.extra_train_models)), list(range(n // 2, n))


def rank_metrics(scores: torch.Tensor, n_exemplars: int) -> dict[str, float]:
    """AbC's metrics for one query whose candidates end with its n_exemplars exemplars."""
    from difflab.metrics import retrieval_metrics
    rel = np.zeros(len(scores), bool)
    rel[-n_exemplars:] = True
    return retrieval_metrics(scores[None].numpy(), rel[None])


def _mean(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def model_intervals(per: dict[str, list[dict]], keys=("map", "recall@10")) -> dict[str, dict[str, list[float]]]:
    """95 % intervals of each method's mean metrics, by the cluster bootstrap over test models (a model's queries
    share its exemplars and succeed or fail together, so the models, not the queries, are the independent draws),
    and of the tuned features' gain over the untuned ones ("tuned - features", paired query by query)."""
    from difflab.metrics import cluster_bootstrap_ci
    rows = dict(per)
    if "tuned" in per and "features" in per:
        untuned = {(r["model"], r["query"]): r for r in per["features"]}
        rows["tuned - features"] = [{**t, **{k: t[k] - untuned[t["model"], t["query"]][k] for k in keys}}
                                    for t in per["tuned"]]
    return {m: {k: [round(v, 4) for v in cluster_bootstrap_ci([r[k] for r in rs], [r["model"] for r in rs])]
                for k in keys} for m, rs in rows.items()}


def kept_distractors(concept: dict, dis_factors: list[str]) -> torch.Tensor:
    """Indices of the distractors (their factors as sorted JSON) that stay candidates for a model: exact copies of
    its exemplars removed."""
    copies = {json.dumps(f, sort_keys=True) for f in concept["exemplars"]}
    return torch.tensor([i for i, f in enumerate(dis_factors) if f not in copies])


def abu_candidates(pipe, exemplars: Path, dis: TrainingData, keep: torch.Tensor, token: bool = True) -> TrainingData:
    """What AbU scores for one customized model `pipe`: the kept distractors under their own captions, then the
    exemplars, under "a <new1> shape" (AbU's AbC protocol) or, with token=False, under their own captions with the
    token removed ("a <new1> star" -> "a star"; benchmarks/bench_abu_captions.py)."""
    from difflab.core.data import encode_latents, encode_prompts, load_folder_images, read_metadata, to_pixels
    z_ex = encode_latents(pipe.vae, to_pixels(load_folder_images(exemplars)))
    captions = (["a <new1> shape"] * len(z_ex) if token else
                [r["prompt"].replace("<new1> ", "") for r in read_metadata(exemplars)])
    return TrainingData(torch.cat([dis.z[keep], z_ex]), torch.cat([dis.c[keep], encode_prompts(pipe, captions)]), [])


# settings that decide what `build` makes (the models, exemplars, queries, distractors): a folder built with other
# values is refused rather than mixed; the rest (tuning, AbU, model counts: model j is the same whatever the total)
# may change between runs of one folder
BUILD_SETTINGS = ("synth_per_model", "distractors", "concept_seed", "customize", "style", "seed")


def run_benchmark(out: str | Path, cfg: BenchmarkConfig | None = None, progress: bool = True,
                  shard: tuple[int, int] = (0, 1)) -> dict:
    """Build the benchmark (resumable), tune the heads on its training split, evaluate every method on its test
    split, and write heads/ and metrics.json into `out`. With `shard=(i, n)` (see `build`), a process whose share
    is built while other shards' models are missing returns {"pending": [their models]}; the last one evaluates."""
    cfg = cfg or BenchmarkConfig()
    out = Path(out)
    refuse_other_settings(out, json.loads(json.dumps(asdict(cfg))), BUILD_SETTINGS, asdict(BenchmarkConfig()))
    if cfg.folds:   # a bad K refused before anything is built
        crossval_folds(range(cfg.models + cfg.extra_train_models), concepts(cfg), cfg.folds)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))
    t0 = time.time()
    cons, missing = build(out, cfg, progress, shard)
    if missing:
        return {"pending": [f"model-{j:02d}" for j in missing]}
    t_build = time.time() - t0
    ex, syn, dis_feats, dis_factors = benchmark_features(out, cfg, range(len(cons)))
    train_ids, test_ids = _split(cfg)
    # the reference: the oracle's factor readings of the test split, and how often a query shows its concept
    from difflab.core.data import load_folder_images
    from difflab.models import load_oracle
    oracle = load_oracle()
    scored = sorted(train_ids + test_ids) if cfg.folds else test_ids   # every model, with cross-validation
    ref = {j: {part: oracle_features(load_folder_images(out / "models" / f"{j:02d}" / part), oracle)
               for part in ("exemplars", "synth")} for j in scored}
    dis_oracle = oracle_features(load_folder_images(out / "distractors"), oracle)
    fid = {j: fidelity(load_folder_images(out / "models" / f"{j:02d}" / "synth"), cons[j], oracle) for j in scored}
    mean_fidelity = lambda ids: {kind: float(np.mean([fid[j] for j in ids if cons[j]["kind"] == kind]))
                                 for kind in ("object", "style") if any(cons[j]["kind"] == kind for j in ids)}

    t1 = time.time()
    heads = fit_heads(train_ids, cons, ex, syn, dis_feats, cfg.tune, cfg.heads_per_kind)
    shutil.rmtree(out / "heads", ignore_errors=True)   # an earlier run's heads (one pair or per family) go
    for kind, h in heads.items():   # heads/ (one pair), or heads/object and heads/style
        save_heads(h, out / "heads" / (kind or ""), cfg.encoder,
                   {"benchmark": str(out), "train_models": [j for j in train_ids if kind in (None, cons[j]["kind"])],
                    "family": kind or "all"})
    t_tune = time.time() - t1

    def candidates(j: int, n_dis: int | None = None) -> torch.Tensor:
        return kept_distractors(cons[j], dis_factors[:n_dis])

    encoder_scores = kind_scorer(heads, cons, dis_feats, ex, syn)

    @torch.no_grad()
    def oracle_scores(j: int, q: int, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """The oracle's factor readings (the reference)."""
        return {"oracle": torch.cat([dis_oracle[keep], ref[j]["exemplars"]]) @ ref[j]["synth"][q]}

    feature_scores = lambda j, q, keep: {**encoder_scores(j, q, keep), **oracle_scores(j, q, keep)}
    per = score_queries(test_ids, cons, dis_factors, {j: len(s) for j, s in syn.items()},
                        {j: len(e) for j, e in ex.items()}, feature_scores)
    metrics = summarize(per, cons)
    metrics["fidelity"] = mean_fidelity(test_ids)
    metrics["models"] = {"train": len(train_ids), "test": len(test_ids)}
    if cfg.folds:
        per_cv = cross_validate(scored, cfg.folds, cons, ex, syn, dis_feats, dis_factors, cfg.tune,
                                cfg.heads_per_kind, oracle_scores)
        metrics["crossval"] = {**summarize(per_cv, cons), "fidelity": mean_fidelity(scored), "folds": cfg.folds,
                               "models": len(scored)}
        atomic_write_json(out / "per_query_crossval.json", per_cv)
    else:   # an earlier run's cross-validation would read as this run's
        (out / "per_query_crossval.json").unlink(missing_ok=True)
    if cfg.unlearn_queries:
        metrics["unlearn_subset"] = unlearn_eval(out, cfg, test_ids, {j: len(e) for j, e in ex.items()}, candidates,
                                                 feature_scores, progress)
        metrics["unlearn"] = metrics["unlearn_subset"]["unlearn"]
    metrics["seconds"] = {"build": round(t_build, 1), "tune": round(t_tune, 1), "total": round(time.time() - t0, 1)}
    atomic_write_json(out / "per_query.json", per)
    write_metrics(out, metrics)
    return metrics


def unlearn_eval(out: Path, cfg: BenchmarkConfig, test_ids, n_exemplars: dict[int, int], candidates, feature_scores,
                 progress: bool = True) -> dict:
    """AbU on the first `unlearn_queries` queries of each test model, against its exemplars (conditioned on the
    training prompt "a <new1> shape", as AbU's AbC runs) plus the first `unlearn_distractors` distractors; the
    Fisher is the base model's over those distractors, reused for every customized model (as AbU does). The
    feature methods are scored on the same candidates (`feature_scores`, from run_benchmark)."""
    from difflab.attribute.unlearn import cached_fisher, forgetting, query_tensors, training_data
    from safetensors.torch import load_file

    from difflab.core.data import read_metadata, save_tensors
    from difflab.customize import apply_weights
    from difflab.models import load_pipeline
    base = load_pipeline("shapes")
    full = training_data(base, out / "distractors")
    n = min(cfg.unlearn_distractors, len(full))
    dis = TrainingData(full.z[:n], full.c[:n], full.files[:n])
    fisher = cached_fisher(base.unet, base.scheduler, TrainingData(dis.z, dis.c, dis.files, out / "distractors"),
                           cfg.unlearn, progress=progress)
    rows: dict[str, list[dict]] = {"unlearn": []}
    forgot = []   # per query: how much unlearning raised the candidates' losses overall (unlearn.forgetting)
    for j in test_ids:
        pipe = load_pipeline("shapes")
        apply_weights(pipe, out / "models" / f"{j:02d}" / "weights")
        keep = candidates(j, n)
        data = abu_candidates(pipe, out / "models" / f"{j:02d}" / "exemplars", dis, keep)
        before = None
        recs = read_metadata(out / "models" / f"{j:02d}" / "synth")
        for q in range(min(cfg.unlearn_queries, len(recs))):
            saved = out / "unlearn" / f"{j:02d}-{q:02d}.safetensors"   # a rerun (new heads, say) reuses AbU's scores
            if saved.exists():
                kept = load_file(saved)
                tau = kept["tau"]
                if "forgetting" in kept:   # (folders of sessions before 9 saved the scores only)
                    forgot.append(float(kept["forgetting"]))
            else:
                if before is None:
                    before = sweep_losses(pipe.unet, pipe.scheduler, data, cfg.unlearn, progress, "losses before")
                zq, cq = query_tensors(pipe, out / "models" / f"{j:02d}" / "synth" / recs[q]["file"], recs[q]["prompt"])
                tau = attribute_by_unlearning(pipe, data, zq, cq, cfg.unlearn, fisher, before, progress=False)
                forgot.append(forgetting(tau, before))
                save_tensors(saved, {"tau": tau, "forgetting": torch.tensor(forgot[-1])})
            for name, scores in {"unlearn": tau, **feature_scores(j, q, keep)}.items():
                rows.setdefault(name, []).append(rank_metrics(scores, n_exemplars[j]))
    res = {m: _mean(r) for m, r in rows.items()}
    res["queries"] = len(rows["unlearn"])
    res["candidates"] = n
    if forgot:
        res["forgetting"] = float(np.mean(forgot))
    return res
