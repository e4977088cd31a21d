"""`difflab attribute`: argument parsing and printing only; every command is one call into `difflab.attribute`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from difflab.cli import _Group, main
from difflab.errors import DifflabError


# --- attribute -----------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def attribute():
    """Which training images made this image? Feature ranking (AbC), tuned features, unlearning (AbU).

    A training folder is PNGs + metadata.jsonl (file, caption or prompt); its features, latents, Fisher and
    "before" losses are cached in FOLDER/.difflab-cache/ (safetensors) and reused across queries. A query image of
    any size or mode is converted to RGB and resized (bicubic) to the encoder's or the model's input.
    """


@attribute.command("rank")
@click.option("--train", "train_dir", type=click.Path(path_type=Path), required=True, help="Training image folder.")
@click.option("--query", type=click.Path(path_type=Path), required=True, help="The synthesized image.")
@click.option("--method", type=click.Choice(["features", "tuned", "unlearn"]), default="features", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--model", default="shapes", show_default=True, help="The model trained on --train (unlearn).")
@click.option("--prompt", default=None, help="The query's prompt (unlearn; default: from metadata.jsonl beside it).")
@click.option("--k", "k", type=click.IntRange(1), default=10, show_default=True, help="Top images in the sheet.")
@click.option("--encoder", default="shapes-clip", show_default=True,
              help="features/tuned: shapes-clip, shapes-dreamsim (the shipped DreamSim), shapes-tagger (the shipped "
                   "tagger's factor readings), a DreamSim or tagger folder, a transformers CLIP/DINO folder or hub id, "
                   "or A+B: two encoders' features side by side.")
@click.option("--heads", type=click.Path(path_type=Path), default=None, help="tuned: a heads/ folder.")
@click.option("--fisher", type=click.Path(path_type=Path), default=None,
              help="unlearn: a Fisher file to use (checked against the model) or to write.")
@click.option("--unlearn-steps", type=click.IntRange(1), default=10, show_default=True)
@click.option("--unlearn-lr", type=float, default=3e-4, show_default=True, help="alpha of the Newton step (alpha/N F^-1 grad).")
@click.option("--params", type=click.Choice(["xattn_kv", "xattn", "attn", "full"]), default="xattn_kv", show_default=True)
@click.option("--flips", is_flag=True, help="unlearn: score mirror images too and keep the max.")
def attribute_rank(train_dir, query, method, out, model, prompt, k, encoder, heads, fisher, unlearn_steps, unlearn_lr,
                   params, flips):
    """Rank every training image for one query. OUT gets ranking.json, top.png, config.json, metrics.json."""
    from difflab.attribute import UnlearnConfig, rank
    cfg = UnlearnConfig(steps=unlearn_steps, lr=unlearn_lr, params=params, flips=flips)
    click.echo(json.dumps(rank(train_dir, query, out, method, model, prompt, k, encoder, heads, cfg, fisher), indent=2))


def _shard(value: str) -> tuple[int, int]:
    """--shard I/N -> (I, N), or the one-line error."""
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise DifflabError(f"--shard {value!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


@attribute.command("benchmark")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Benchmark folder (resumable).")
@click.option("--models", type=click.IntRange(2), default=16, show_default=True, help="Custom Diffusion models (half train the heads).")
@click.option("--extra-train-models", type=click.IntRange(0), default=40, show_default=True,
              help="More models that only train the heads (with 8, the heads memorise them; docs/BENCHMARKS.md).")
@click.option("--synth", type=click.IntRange(1), default=16, show_default=True, help="Synthesized images per model.")
@click.option("--distractors", type=click.IntRange(0), default=10_000, show_default=True,
              help="First N images of the shapes training set (0: all 60,000).")
@click.option("--customize-steps", type=click.IntRange(1), default=400, show_default=True)
@click.option("--recipe", is_flag=True,
              help="Train each model with the single-concept recipe (shapes_recipe: 2,000 steps; models that copy "
                   "their exemplars) instead of 400 steps at lr 2e-3; --customize-steps is then ignored.")
@click.option("--params", "customize_params", type=click.Choice(["xattn_kv", "xattn"]), default="xattn_kv",
              show_default=True,
              help="What each model's Custom Diffusion trains: cross-attention K/V, or all of cross-attention (more "
                   "of the style models' queries show their exemplars: docs/BENCHMARKS.md, attribution, session 11).")
@click.option("--tune-steps", type=click.IntRange(1), default=300, show_default=True)
# (the defaults are TuneConfig's, written out: the CLI imports no torch before a command runs)
@click.option("--tune-negatives", type=click.IntRange(1), default=4096, show_default=True,
              help="Distractors drawn per step of the heads' contrastive loss.")
@click.option("--tune-temperature", type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True,
              help="Temperature of the heads' contrastive loss.")
@click.option("--tune-head", type=click.Choice(["linear", "channel"]), default="channel", show_default=True,
              help="The heads: a scale per feature channel (AbC's ablation), or AbC's linear maps.")
@click.option("--tune-lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True,
              help="Learning rate of the heads (AbC's linear heads: 1e-4).")
@click.option("--tune-whiten", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Whiten the features with the distractors' principal axes first, with this shrinkage (0: off).")
@click.option("--tune-hard-negatives", type=click.IntRange(0), default=0, show_default=True,
              help="Per query and step, also this many of its 200 nearest distractors as negatives.")
@click.option("--unlearn-queries", type=click.IntRange(0), default=2, show_default=True, help="AbU queries per test model (0: skip).")
@click.option("--unlearn-distractors", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--encoder", default="shapes-clip", show_default=True,
              help="shapes-clip, shapes-dreamsim, shapes-tagger (the tagger's factor readings), a DreamSim or "
                   "tagger folder, a transformers CLIP/DINO folder or hub id, or A+B: two encoders' features side by "
                   "side (shapes-clip+shapes-tagger with --heads-per-kind: docs/BENCHMARKS.md, attribution, session 17).")
@click.option("--heads-per-kind", is_flag=True,
              help="One pair of heads per family (OUT/heads/object, OUT/heads/style), each scoring its own family's "
                   "queries: AbC's object-only and style-only heads.")
@click.option("--folds", type=click.IntRange(0), default=0, show_default=True,
              help="Also K-fold cross-validation over every built model (metrics.json \"crossval\"): each fold's "
                   "models scored by heads fitted on the others; a far tighter figure than the test split's few "
                   "models (0: off).")
@click.option("--style", type=click.Choice(["texture", "all-but-shape", "combination"]), default="texture",
              show_default=True,
              help="What a style model's three exemplars share: the held-out texture and a colour; every factor but "
                   "the shape (which the distractors rarely share); or that with a trained texture.")
@click.option("--shard", default="0/1", show_default=True,
              help="I/N: build only every N-th model from the I-th, so N processes or machines sharing OUT split the "
                   "build; the last to finish evaluates and writes metrics.json.")
def attribute_benchmark(out, models, extra_train_models, synth, distractors, customize_steps, recipe, customize_params,
                        tune_steps, tune_negatives, tune_temperature, tune_head, tune_lr, tune_whiten,
                        tune_hard_negatives, unlearn_queries, unlearn_distractors, encoder, heads_per_kind, folds, style,
                        shard):
    """The AbC-style benchmark on the shapes world: exemplars -> Custom Diffusion models -> synthesized queries;
    tunes the heads (OUT/heads) and writes metrics.json: {"features": {"map", "recall@5", "recall@10",
    "recall@100"}, "tuned": {...}, "unlearn": {...}}, with "ci95": 95 % intervals of mAP and Recall@10 (and of the
    tuned gain, "tuned - features") by a bootstrap over the test models, whose queries are not independent; with
    --folds K, "crossval": the same over every built model, each scored by heads fitted on the other folds."""
    from difflab.attribute import BenchmarkConfig, TuneConfig, run_benchmark
    from difflab.attribute.benchmark import _customize_defaults
    from difflab.customize import shapes_recipe
    if recipe:
        ccfg = shapes_recipe(progress=False)
    else:
        ccfg = _customize_defaults()
        ccfg.steps = customize_steps
    ccfg.params = customize_params
    cfg = BenchmarkConfig(models=models, extra_train_models=extra_train_models, synth_per_model=synth, distractors=distractors, encoder=encoder,
                          customize=ccfg, tune=TuneConfig(steps=tune_steps, negatives=tune_negatives,
                                                          temperature=tune_temperature, head=tune_head, lr=tune_lr,
                                                          whiten=tune_whiten, hard_negatives=tune_hard_negatives), unlearn_queries=unlearn_queries,
                          unlearn_distractors=unlearn_distractors, style=style, heads_per_kind=heads_per_kind,
                          folds=folds)
    click.echo(json.dumps(run_benchmark(out, cfg, shard=_shard(shard)), indent=2))


@attribute.command("gold")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder (resumable).")
@click.option("--queries", type=click.IntRange(1), default=8, show_default=True)
# (the defaults are GoldConfig's, written out: the CLI imports no torch before a command runs)
@click.option("--k", "k", type=click.IntRange(1), default=5, show_default=True,
              help="Training images removed per method and query.")
@click.option("--n-train", type=click.IntRange(2), default=100, show_default=True,
              help="Training set size of the small model.")
@click.option("--steps", type=click.IntRange(1), default=900, show_default=True,
              help="Small-model training steps.")
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True, help="Small-model batch size.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Small-model learning rate (cosine schedule).")
@click.option("--methods", default="unlearn,features,random", show_default=True,
              help="Comma-separated: unlearn, features, tuned (needs --heads), random.")
@click.option("--heads", type=click.Path(path_type=Path), default=None, help="tuned: a heads/ folder.")
@click.option("--unlearn-params", type=click.Choice(["xattn_kv", "xattn", "attn", "full"]), default="full",
              show_default=True, help="AbU's parameters in the small model (K/V is the paper's choice for SD).")
@click.option("--unlearn-lr", type=float, default=1e-6, show_default=True,
              help="AbU's alpha (step alpha/N F^-1 grad). metrics.json reports unlearn.forgetting, the training "
                   "losses' mean rise relative to their mean: near 1 or above, AbU made the model forget everything.")
@click.option("--query-seed", type=int, default=32_000, show_default=True,
              help="Seed of the queries' prompts and generation: another seed gives an independent set of queries "
                   "on the same training set and base model.")
@click.option("--shard", default="0/1", show_default=True,
              help="I/N: retrain only every N-th job from the I-th, so N processes or machines sharing OUT split the "
                   "work; the last to finish writes metrics.json.")
def attribute_gold(out, queries, k, n_train, steps, batch, lr, methods, heads, unlearn_params, unlearn_lr, query_seed,
                   shard):
    """The counterfactual gold standard: for each query of a small shapes model, retrain from scratch without
    each method's top K and measure the query's loss increase and how far its regenerated image moves.
    metrics.json: {"unlearn": {"loss_increase", "clip_distance", ...}, "features": {...}, "random": {...}}."""
    from difflab.attribute import GoldConfig, UnlearnConfig, gold_standard
    from difflab.attribute.gold import METHODS
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise DifflabError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
    if "tuned" in chosen and heads is None:
        raise DifflabError("--methods tuned needs --heads DIR")
    if k >= n_train:
        raise DifflabError(f"--k {k} removes the whole training set (--n-train {n_train})")
    i, n = _shard(shard)
    cfg = GoldConfig(queries=queries, k=k, n_train=n_train, steps=steps, batch=batch, lr=lr, methods=chosen,
                     tuned=str(heads) if heads else None, query_seed=query_seed,
                     unlearn=UnlearnConfig(params=unlearn_params, lr=unlearn_lr))
    m = gold_standard(out, cfg, shard=(i, n))
    click.echo(json.dumps({k: v for k, v in m.items() if k != "query_loss_base"}, indent=2))
