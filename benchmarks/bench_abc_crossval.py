"""How much a benchmark's fixed test split can say: the cross-validated scores of a built AbC-style benchmark by
fold, and the spread of test splits of the same size drawn from them.

    difflab attribute benchmark --out OUT ... --folds 7      # writes OUT/per_query_crossval.json
    python benchmarks/bench_abc_crossval.py OUT [--draws 5000]

Every built model was scored once by heads fitted without it (benchmark.cross_validate). A test split of a few
models averages queries that succeed or fail together, so its figure depends on which models it drew; this prints
each fold's figures, the folder's own test split as cross-validation scored it, and the 5th/50th/95th percentiles
of the Recall@10 of random test splits with as many models of each family as the folder's (seeded draws of the
per-model scores), with the share of draws at or below the test split's. Methods: features (untuned), tuned, and
oracle (the oracle's factor readings, untuned: the benchmark's reference). Prints markdown; seconds.
"""
import argparse
import json
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--draws", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from difflab.attribute.benchmark import _split, concepts, crossval_folds, folder_config
    cfg = folder_config(a.out)
    cons = concepts(cfg)
    metrics = json.loads((a.out / "metrics.json").read_text())
    if "crossval" not in metrics:
        raise SystemExit(f"{a.out}/metrics.json has no cross-validation: run the benchmark with --folds K")
    per = json.loads((a.out / "per_query_crossval.json").read_text())
    methods = [m for m in ("features", "tuned", "oracle") if m in per]
    by_model = {m: {} for m in methods}   # method -> model -> its queries' rows
    for m in methods:
        for r in per[m]:
            by_model[m].setdefault(r["model"], []).append(r)
    ids = sorted(by_model["tuned"])
    mean = lambda m, models, key: float(np.mean([r[key] for j in models for r in by_model[m][j]]))
    cell = lambda models: " | ".join(f"{mean(m, models, 'map'):.3f} / {mean(m, models, 'recall@10'):.3f}"
                                     for m in methods)

    cv = metrics["crossval"]
    print(f"{a.out}: {cv['folds']}-fold cross-validation over {len(ids)} models ({cv['queries']} queries; encoder "
          f"{cfg.encoder}, heads {'per family' if cfg.heads_per_kind else 'one pair'})\n")
    print(f"| fold: models | {' | '.join(f'{m} mAP / R@10' for m in methods)} |\n|---|" + "---|" * len(methods))
    for i, fold in enumerate(crossval_folds(ids, cons, cv["folds"])):
        print(f"| {i}: {','.join(map(str, fold))} | {cell(fold)} |")
    print(f"| all {len(ids)} | {cell(ids)} |")
    test = [j for j in _split(cfg)[1] if j in by_model["tuned"]]
    print(f"| the test split ({','.join(map(str, test))}), as cross-validation scored it | {cell(test)} |")

    rng = np.random.default_rng(a.seed)
    pools = {kind: [j for j in ids if cons[j]["kind"] == kind] for kind in ("object", "style")}
    take = {kind: sum(cons[j]["kind"] == kind for j in test) for kind in pools}
    draws = np.array([mean("tuned", [j for kind in pools for j in rng.choice(pools[kind], take[kind], replace=False)],
                           "recall@10") for _ in range(a.draws)])
    fixed = metrics["tuned"]["recall@10"]
    lo, mid, hi = np.percentile(draws, [5, 50, 95])
    print(f"\ntuned Recall@10 of {a.draws} random test splits of {take['object']} object + {take['style']} style "
          f"models (seed {a.seed}): 5th / 50th / 95th percentile {lo:.3f} / {mid:.3f} / {hi:.3f}; the folder's test "
          f"split reads {fixed:.3f} (metrics.json, heads fitted on its training split): "
          f"{np.mean(draws <= fixed):.1%} of draws at or below it")


if __name__ == "__main__":
    main()
