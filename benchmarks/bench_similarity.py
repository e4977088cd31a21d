"""DreamSim on the shapes world: 2AFC of every variant on a test split no training saw, and throughput.

    python benchmarks/bench_similarity.py [--n 3000] [--steps 1500] [--threads 2] [--out bench-sim]
        [--full-steps 3000 --world 20000]

Makes a shapes 2AFC set (NIGHTS layout), trains the LoRA and MLP variants on its train split (and, with
--full-steps, every backbone weight on the train split plus --world fresh in-memory triplets), and prints a
markdown table: pixel L2, the untuned shapes-CLIP embedding, each tuned variant; plus embedding images/s.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from difflab.similarity import (DreamSim, evaluate_2afc, load_backbone, make_2afc, pixel_l2, read_2afc,
                                train_and_save)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-sim"))
    ap.add_argument("--full-steps", type=int, default=0)
    ap.add_argument("--world", type=int, default=20000)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    trip = a.out / "triplets"
    if not (trip / "data.csv").exists():
        make_2afc(trip, a.n, seed=0)
    test = read_2afc(trip, "test")
    rows = [("pixel L2", evaluate_2afc(pixel_l2, test, 32)["2afc"], "-")]
    untuned = DreamSim([load_backbone("shapes-clip")]).eval()
    rows.append(("shapes CLIP, untuned", evaluate_2afc(untuned, test, 32)["2afc"], "-"))
    for mode in ("mlp", "lora"):
        t = time.time()
        res = train_and_save(trip, a.out / mode, mode=mode, steps=a.steps, progress=False)
        rows.append((f"DreamSim {mode}", res["test_2afc"], f"{time.time() - t:.0f} s"))
    if a.full_steps:
        t = time.time()
        res = train_and_save(trip, a.out / "full", mode="full", steps=a.full_steps, batch_size=32, lr=3e-4,
                             world=a.world, progress=False)
        rows.append((f"DreamSim full, +{a.world} world triplets", res["test_2afc"], f"{time.time() - t:.0f} s"))
    model = DreamSim.from_pretrained(a.out / "lora")
    x = torch.rand(256, 3, 32, 32)
    with torch.no_grad():
        model.embed(x)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            model.embed(x)
            ts.append(time.perf_counter() - t)
    ips = 256 / statistics.median(ts)
    print(f"shapes 2AFC: {a.n} triplets, test split n={len(test)}; torch {torch.__version__}, {a.threads} threads\n")
    print("| distance | test 2AFC | training time |\n|---|---|---|")
    for name, s, tt in rows:
        print(f"| {name} | {s:.3f} | {tt} |")
    print(f"\nembedding throughput (LoRA model, batch 256, median of 5): {ips:.0f} images/s")
    (a.out / "results.json").write_text(json.dumps({"rows": rows, "images_per_s": ips}, indent=2))


if __name__ == "__main__":
    main()
