"""Does AbU find an AbC benchmark's exemplars by their images or by the token in their captions?

The AbC-style benchmark scores AbU with the exemplars conditioned on "a <new1> shape" (as the AbU paper's AbC runs
do) and the distractors on their own captions, so the exemplars are the only candidates whose caption holds the
token. This re-runs AbU on the benchmark's AbU subset (the first 2 queries of each test model, the first 2,000
distractors, the same models, Fisher and settings) with each exemplar captioned without the token ("a <new1> star"
-> "a star") and prints both rankings' metrics side by side. Needs a built folder with its AbU scores
(`difflab attribute benchmark --out DIR ...` with --unlearn-queries 2):

    python benchmarks/bench_abu_captions.py DIR --threads 1   # ~1 min per query at 1 thread
"""
import argparse
import json
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="A built benchmark folder.")
    ap.add_argument("--style", default=None, help="The style the folder was built with (default: its config.json's).")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from safetensors.torch import load_file

    from difflab.attribute.benchmark import (_mean, _split, abu_candidates, concepts, folder_config,
                                             kept_distractors, rank_metrics)
    from difflab.attribute.unlearn import (TrainingData, attribute_by_unlearning, cached_fisher, query_tensors,
                                           sweep_losses, training_data)
    from difflab.core.data import read_metadata
    from difflab.customize import apply_weights
    from difflab.models import load_pipeline
    cfg = folder_config(a.out)
    cfg.style = a.style or cfg.style
    ucfg = cfg.unlearn
    cons = concepts(cfg)
    base = load_pipeline("shapes")
    full = training_data(base, a.out / "distractors")
    n = min(cfg.unlearn_distractors, len(full))
    dis = TrainingData(full.z[:n], full.c[:n], full.files[:n], a.out / "distractors")
    fisher = cached_fisher(base.unet, base.scheduler, dis, ucfg, progress=False)
    dis_factors = [json.dumps(r["factors"], sort_keys=True) for r in read_metadata(a.out / "distractors")][:n]
    rows = {"token in the exemplars' captions (the benchmark)": [], "no token": []}
    for j in _split(cfg)[1]:
        pipe = load_pipeline("shapes")
        apply_weights(pipe, a.out / "models" / f"{j:02d}" / "weights")
        data = abu_candidates(pipe, a.out / "models" / f"{j:02d}" / "exemplars", dis,
                              kept_distractors(cons[j], dis_factors), token=False)
        n_ex = len(cons[j]["exemplars"])
        before = sweep_losses(pipe.unet, pipe.scheduler, data, ucfg, False)
        recs = read_metadata(a.out / "models" / f"{j:02d}" / "synth")
        for q in range(min(cfg.unlearn_queries, len(recs))):
            zq, cq = query_tensors(pipe, a.out / "models" / f"{j:02d}" / "synth" / recs[q]["file"], recs[q]["prompt"])
            tau = attribute_by_unlearning(pipe, data, zq, cq, ucfg, fisher, before, progress=False)
            with_token = load_file(a.out / "unlearn" / f"{j:02d}-{q:02d}.safetensors")["tau"]
            for name, t in zip(rows, (with_token, tau)):
                rows[name].append(rank_metrics(t, n_ex))
            print(f"model {j} query {q}: mAP with token {rows[next(iter(rows))][-1]['map']:.3f}, "
                  f"without {rows['no token'][-1]['map']:.3f}", flush=True)
    print(f"\n| AbU, {len(rows['no token'])} queries, {n} distractors | mAP | Recall@5 | Recall@10 | Recall@100 |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        m = _mean(r)
        print(f"| {name} | {m['map']:.3f} | {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['recall@100']:.3f} |")


if __name__ == "__main__":
    main()
