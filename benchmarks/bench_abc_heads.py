"""Tuned heads on a built AbC-style benchmark: settings chosen on held-out training models, then the test split.

    python benchmarks/bench_abc_heads.py OUT --val 8 --grid "head=linear,lr=0.0001,whiten=0" "whiten=0.3"
    python benchmarks/bench_abc_heads.py OUT --test "head=channel,lr=0.003,whiten=0.1"
    python benchmarks/bench_abc_heads.py OUT --feature oracle --val 8 --grid "head=channel,lr=0.003,whiten=0"
    python benchmarks/bench_abc_heads.py OUT --split 32,24 --test "..."    # the built models split another way
    python benchmarks/bench_abc_heads.py OUT --per-kind --test "..."        # heads per family (AbC's ablation)
    python benchmarks/bench_abc_heads.py OUT --encoder shapes-dreamsim --test "..."   # another encoder
    python benchmarks/bench_abc_heads.py OUT --curve 10,20,40 --test "..."   # heads fitted on fewer training models
    python benchmarks/bench_abc_heads.py OUT --by-fidelity --test "..."      # queries that show the concept or not
    python benchmarks/bench_abc_heads.py OUT --cv 6 --grid "..." "..."       # choose by cross-validation instead

OUT is a folder built by `difflab attribute benchmark`. Each --grid entry is a set of TuneConfig fields
(comma-separated key=value) on top of the folder's own tune settings (a field the folder does not record takes
TuneConfig's default: spell out head, lr and whiten to be sure what runs). With whitening, a "whitening only" row
scores the whitened features before any head is trained. Validation: the heads are fitted on every training model
but the last --val, and scored (as the benchmark scores its test split) on those --val models; the test split is
not looked at. --test fits on all training models and scores the test split, by kind too. --feature oracle
replaces the encoder's features by the oracle's factor readings (benchmark.oracle_features): what the heads make
of a feature that reads every factor exactly; --feature oracle-backbone by the 256-d features of the oracle's
network that its factor heads read (an encoder supervised on every factor, as AbC's ImageNet-supervised ViT);
--encoder scores another encoder than the folder's (its features of the distractors are cached beside them).
--per-kind fits one pair of heads on the object models and one on the style models, each scoring its own family's
queries (AbC released such object-only and style-only heads as an ablation): it says what a weighting that
depends on the family buys. --probe says how well each factor can be read linearly from the features (probes
fitted on 8,000 distractors, scored on the other 2,000 and on every built model's queries, labelled by the
oracle's reading: how well the encoder reads generated images). --curve N1,N2,...
fits the --test heads on N randomly drawn training models (--reps draws each, seeded; each family in its share)
and scores the same test split: whether more customized models would help the heads. --by-fidelity splits the
test (or validation) queries' Recall@10 by whether each shows its exemplars' held-out value (the oracle's
reading). Each header line gives the scored models' fidelity (how often their queries show the exemplars' held-out
value). Prints markdown tables; 1 thread reproduces to the digit.
"""
import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch


def parse(spec: str, base):
    from difflab.attribute import TuneConfig
    kw = {}
    for item in filter(None, spec.split(",")):
        k, v = item.split("=")
        kw[k] = type(getattr(TuneConfig(), k))(v) if not isinstance(getattr(TuneConfig(), k), bool) else v == "true"
    return dataclasses.replace(base, progress=False, **kw)


def oracle_bank(out: Path, ids, readout: bool = True):
    """The oracle's features (its factor readings, or with readout=False its network's 256-d features) of models
    `ids`' exemplars and queries and of the distractors, cached in OUT."""
    from safetensors.torch import load_file

    from difflab.attribute.benchmark import oracle_features
    from difflab.core.data import load_folder_images, save_tensors
    from difflab.models import load_oracle
    cache = out / ".difflab-cache" / ("oracle.safetensors" if readout else "oracle-backbone.safetensors")
    t = load_file(cache) if cache.exists() else {}
    want = {"dis": out / "distractors", **{f"{part}-{j}": out / "models" / f"{j:02d}" / part
                                           for j in ids for part in ("exemplars", "synth")}}
    if set(want) - set(t):
        oracle = load_oracle()
        t.update({k: oracle_features(load_folder_images(want[k]), oracle, readout=readout) for k in set(want) - set(t)})
        save_tensors(cache, t)
    return {j: t[f"exemplars-{j}"] for j in ids}, {j: t[f"synth-{j}"] for j in ids}, t["dis"]


def evaluate(fit_ids, eval_ids, tcfg, cons, ex, syn, dis, dis_factors, per_kind=False, cv=0):
    """Heads fitted on fit_ids; benchmark.summarize's metrics over eval_ids' queries, and the rows ("rows"). per_kind:
    one pair of heads per family, fitted on its models only and scoring its queries only (AbC's object-only and
    style-only heads, an ablation of the paper), as if the benchmark case said which family a query comes from.
    cv=K: K-fold cross-validation over eval_ids instead (benchmark.cross_validate; fit_ids unused)."""
    from difflab.attribute.benchmark import cross_validate, fit_heads, kind_scorer, score_queries, summarize
    if cv:
        per = cross_validate(eval_ids, cv, cons, ex, syn, dis, dis_factors, tcfg, per_kind)
    else:
        heads = fit_heads(fit_ids, cons, ex, syn, dis, tcfg, per_kind)
        scored = [j for kind in heads for j in eval_ids if kind in (None, cons[j]["kind"])]   # by family, as fitted
        per = score_queries(scored, cons, dis_factors, {j: len(x) for j, x in syn.items()},
                            {j: len(x) for j, x in ex.items()}, kind_scorer(heads, cons, dis, ex, syn))
    return {**summarize(per, cons), "rows": per}   # rows per query: {method: [{"model", "query", metric: value}]}


def probe_line(dis: torch.Tensor, dis_factors: list[str], queries: torch.Tensor, query_factors: list[str],
               fit: int = 8000, steps: int = 500) -> str:
    """How well each factor can be read linearly from the features: a softmax probe per factor (features
    standardised on the first `fit` distractors, Adam 1e-2, `steps` full-batch steps) trained on the first `fit`
    distractors and scored on the rest, and on the queries (generated images) as the oracle reads them."""
    facts, qfacts = [json.loads(f) for f in dis_factors], [json.loads(f) for f in query_factors]
    mu, sd = dis[:fit].mean(0), dis[:fit].std(0).clamp_min(1e-8)
    z, zq = (dis - mu) / sd, (queries - mu) / sd
    acc, acc_q = {}, {}
    for k in facts[0]:
        vals = sorted({f[k] for f in facts})
        y = torch.tensor([vals.index(f[k]) for f in facts])
        yq = torch.tensor([vals.index(f[k]) if f[k] in vals else -1 for f in qfacts])
        torch.manual_seed(0)
        probe = torch.nn.Linear(z.shape[1], len(vals))
        opt = torch.optim.Adam(probe.parameters(), 1e-2)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(z[:fit]), y[:fit]).backward()
            opt.step()
        with torch.no_grad():
            acc[k] = (probe(z[fit:]).argmax(1) == y[fit:]).float().mean().item()
            acc_q[k] = (probe(zq).argmax(1) == yq).float().mean().item()
    return (", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f"; on the {len(queries)} queries, as the oracle "
            "reads them: " + ", ".join(f"{k} {v:.3f}" for k, v in acc_q.items()))


HEADER = ("| {} | {} | R@5 | R@10 | R@100 | object mAP / R@10 | style mAP / R@10 | 95 % interval (models) |\n"
          "|---|---|---|---|---|---|---|---|")


def curve_draw(train_ids, cons, n: int, seed: int) -> list[int]:
    """n training models drawn at random, each family (object, style) in its share of the training split and at
    least one of each, so that heads per family (--per-kind) can be fitted on every draw."""
    rng = random.Random(seed)
    obj = [j for j in train_ids if cons[j]["kind"] == "object"]
    sty = [j for j in train_ids if cons[j]["kind"] == "style"]
    k = min(len(obj), max(1, round(n * len(obj) / len(train_ids))), n - 1)   # the rest of the n are style models
    return sorted(rng.sample(obj, k) + rng.sample(sty, n - k))


def row(label: str, r: dict, m: str) -> str:
    """One table row: method m's metrics in evaluate's result r, by kind, and the 95 % intervals of its mAP and
    Recall@10 over the scored models (benchmark.model_intervals)."""
    ci = " / ".join(f"{r['ci95'][m][k][0]:.2f}-{r['ci95'][m][k][1]:.2f}" for k in ("map", "recall@10"))
    return (f"| {label} | {' | '.join(f'{r[m][k]:.3f}' for k in ('map', 'recall@5', 'recall@10', 'recall@100'))} | "
            + " | ".join(f"{r['by_kind'][kind][m]['map']:.3f} / {r['by_kind'][kind][m]['recall@10']:.3f}"
                         if kind in r["by_kind"] else "nan / nan" for kind in ("object", "style"))
            + f" | {ci} |")


def shows_by_model(out: Path, ids, cons) -> dict[int, list[bool]]:
    """Per model j, whether each of its queries shows its exemplars' held-out value (benchmark.shows_concept)."""
    from difflab.attribute.benchmark import shows_concept
    from difflab.core.data import load_folder_images
    from difflab.models import load_oracle
    oracle = load_oracle()
    return {j: shows_concept(load_folder_images(out / "models" / f"{j:02d}" / "synth"), cons[j], oracle) for j in ids}


def fidelity_table(shows: dict[int, list[bool]], rows, cons) -> str:
    """Recall@10 of the scored queries split by whether each shows its exemplars' held-out value (`shows`, from
    shows_by_model): what the feature makes of the queries that carry the concept, and of those in which the
    customized model did not copy it. rows: (label, evaluate's result, method) per table row."""
    lines = ["| method | " + " | ".join(f"{kind}, {'shows' if s else 'does not show'} the concept"
                                        for kind in ("object", "style") for s in (True, False)) + " |",
             "|---|---|---|---|---|"]
    for label, r, m in rows:
        cells = []
        for kind in ("object", "style"):
            for s in (True, False):
                v = [q["recall@10"] for q in r["rows"][m] if cons[q["model"]]["kind"] == kind
                     and shows[q["model"]][q["query"]] == s]
                cells.append(f"{sum(v) / len(v):.3f} ({len(v)})" if v else "- (0)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_line(shows: dict[int, list[bool]], cons) -> str:
    """How often the models' queries show their exemplars' held-out value (benchmark.fidelity), by kind: the mean
    over the models of each one's share."""
    by = {}
    for j, s in shows.items():
        by.setdefault(cons[j]["kind"], []).append(sum(s) / len(s))
    return ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(by.items()))


def model_list(spec: str) -> list[int]:
    """'86-89,95' -> [86, 87, 88, 89, 95]."""
    out = []
    for v in spec.split(","):
        lo, _, hi = v.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--val", type=int, default=8, help="the last N built training models are the validation set")
    ap.add_argument("--val-models", default=None,
                    help="training models to validate on instead: comma-separated, ranges allowed (86-133)")
    ap.add_argument("--fit-models", default=None,
                    help="with --val-models: fit the heads on these models (same syntax) instead of the other "
                         "training models")
    ap.add_argument("--grid", nargs="*", default=[], help="TuneConfig settings to compare on validation")
    ap.add_argument("--cv", type=int, default=0, metavar="K", help="with --grid: validate by K-fold cross-validation "
                    "over all the training models (benchmark.cross_validate) instead of the last --val ones")
    ap.add_argument("--test", default=None, help="TuneConfig settings to fit on all training models and test")
    ap.add_argument("--feature", default="encoder", choices=["encoder", "oracle", "oracle-backbone"],
                    help="oracle: its factor readings; oracle-backbone: the 256-d features its factor heads read")
    ap.add_argument("--by-fidelity", action="store_true", help="Recall@10 of the scored queries that show their "
                    "exemplars' held-out value and of those that do not, by kind")
    ap.add_argument("--encoder", default=None, help="score another encoder's features than the folder's (e.g. "
                                                     "shapes-dreamsim)")
    ap.add_argument("--per-kind", action="store_true", help="one pair of heads per family (AbC's object-only and "
                                                             "style-only heads), each scoring its own family's queries")
    ap.add_argument("--split", default=None, metavar="MODELS,EXTRA",
                    help="re-split the built models: the first MODELS/2 and the EXTRA after MODELS train, models "
                         "MODELS/2..MODELS-1 test (model j is the same whatever the split); default: the folder's")
    ap.add_argument("--probe", action="store_true", help="print how well a linear probe reads each factor from the "
                                                          "features (fit on 8,000 distractors, scored on the rest and "
                                                          "on the queries as the oracle reads them)")
    ap.add_argument("--curve", default=None, metavar="N1,N2,...",
                    help="with --test: also fit the heads on N randomly drawn training models (a learning curve)")
    ap.add_argument("--reps", type=int, default=3, help="draws of the training models per --curve size")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.curve and a.test is None:
        ap.error("--curve fits the --test heads on fewer training models: pass --test too")
    if a.fit_models and not a.val_models:
        ap.error("--fit-models says what the heads are fitted on beside --val-models: pass --val-models too")
    if a.by_fidelity and a.test is None and not a.grid:
        ap.error("--by-fidelity splits the scored queries (--test's or --grid's): pass --test or --grid too")
    torch.set_num_threads(a.threads)
    from difflab.attribute.benchmark import _split, benchmark_features, concepts, folder_config
    cfg = folder_config(a.out)
    if a.encoder:
        cfg.encoder = a.encoder
    if a.split:
        cfg.models, cfg.extra_train_models = (int(v) for v in a.split.split(","))
    base = dataclasses.replace(cfg.tune, progress=False)
    cons = concepts(cfg)
    # a folder still being built: its built models only
    built = [j for j in range(len(cons)) if (a.out / "models" / f"{j:02d}" / "synth" / "metadata.jsonl").exists()]
    ex, syn, dis, dis_factors = benchmark_features(a.out, cfg, built)
    if a.feature != "encoder":
        ex, syn, dis = oracle_bank(a.out, built, readout=a.feature == "oracle")
    train_ids, test_ids = ([j for j in ids if j in built] for ids in _split(cfg))

    feature = cfg.encoder if a.feature == "encoder" else a.feature
    kinds = ", heads per family" if a.per_kind else ""
    if a.probe:
        from difflab.core.data import load_folder_images
        from difflab.models import load_oracle
        oracle = load_oracle()
        queries = torch.cat([syn[j] for j in built])
        read = [json.dumps(p, sort_keys=True) for j in built
                for p in oracle.predict(load_folder_images(a.out / "models" / f"{j:02d}" / "synth"))]
        print(f"linear probe accuracy per factor ({feature} features of held-out distractors): "
              f"{probe_line(dis, dis_factors, queries, read)}\n")
    if a.grid:
        fit, val = train_ids[:-a.val], train_ids[-a.val:]
        if a.val_models:
            val = model_list(a.val_models)
            fit = [j for j in train_ids if j not in val]
        if a.fit_models:
            fit = model_list(a.fit_models)
            if set(fit) & set(val):
                ap.error("--fit-models and --val-models overlap: the heads would be scored on models they saw")
        if a.cv:
            fit, val = [], train_ids
        shows = shows_by_model(a.out, val, cons)
        how = (f"{a.cv}-fold cross-validation over the {len(val)} training models (each scored by heads fitted on the "
               "other folds)") if a.cv else f"fitted on {len(fit)} training models, scored on models {val}"
        print(f"validation: {how} ({feature} features{kinds}; fidelity {fidelity_line(shows, cons)})\n")
        print(HEADER.format("heads", "val mAP"))
        fidelity_rows = []
        for i, spec in enumerate(a.grid):
            r = evaluate(fit, val, parse(spec, base), cons, ex, syn, dis, dis_factors, a.per_kind, a.cv)
            if i == 0:
                print(row("untuned", r, "features"))
                fidelity_rows.append(("untuned", r, "features"))
            if parse(spec, base).whiten:
                print(row(f"whitening {parse(spec, base).whiten} only", r, "whitened"))
            print(row(spec or "folder settings", r, "tuned"), flush=True)
            fidelity_rows.append((spec or "folder settings", r, "tuned"))
        if a.by_fidelity:
            print(f"\nRecall@10 (queries) by whether the query shows its exemplars' held-out value\n\n"
                  f"{fidelity_table(shows, fidelity_rows, cons)}")
    if a.test is not None:
        r = evaluate(train_ids, test_ids, parse(a.test, base), cons, ex, syn, dis, dis_factors, a.per_kind)
        shows = shows_by_model(a.out, test_ids, cons)
        print(f"\ntest split: models {test_ids}, heads {a.test or 'folder settings'} fitted on {len(train_ids)} "
              f"training models ({feature} features{kinds}; fidelity {fidelity_line(shows, cons)})\n")
        print(HEADER.format("method", "mAP"))
        methods = ("features", "whitened", "tuned") if parse(a.test, base).whiten else ("features", "tuned")
        for m in methods:
            print(row(m, r, m))
        if a.by_fidelity:
            print(f"\nRecall@10 (queries) by whether the query shows its exemplars' held-out value\n\n"
                  f"{fidelity_table(shows, [(m, r, m) for m in methods], cons)}")
        lo, hi = r["ci95"]["tuned - features"]["map"]
        print(f"\ntuned - untuned mAP: {r['tuned']['map'] - r['features']['map']:+.3f} (95 % interval over the test "
              f"models {lo:+.3f} to {hi:+.3f})")
        if a.curve:
            print(f"\nlearning curve: heads {a.test or 'folder settings'} fitted on N of the {len(train_ids)} training "
                  f"models ({a.reps} seeded draws each), the same test split\n")
            print("| training models | tuned mAP | tuned R@10 | object R@10 | style R@10 |\n|---|---|---|---|---|")
            for n in (int(v) for v in a.curve.split(",")):
                # all of them: the heads fitted above (the same seeds, so the same heads), not fitted again
                rs = [evaluate(curve_draw(train_ids, cons, n, seed), test_ids, parse(a.test, base), cons, ex, syn, dis,
                               dis_factors, a.per_kind) for seed in range(a.reps)] if n < len(train_ids) else [r]
                cell = lambda get: " / ".join(f"{get(r):.3f}" for r in rs)
                size = n if n < len(train_ids) else f"{len(train_ids)} (all)"
                print(f"| {size} | {cell(lambda r: r['tuned']['map'])} | "
                      f"{cell(lambda r: r['tuned']['recall@10'])} | "
                      f"{cell(lambda r: r['by_kind']['object']['tuned']['recall@10'])} | "
                      f"{cell(lambda r: r['by_kind']['style']['tuned']['recall@10'])} |", flush=True)


if __name__ == "__main__":
    main()
