"""Exact feature ranking speed: one query against N cached D-d features (issue bar: 1,000,000 x 512 in <= 0.5 s).

    python benchmarks/bench_attribute.py [--n 1000000] [--dim 512] [--k 100] [--threads 2]
Prints the median of 5 runs of `difflab.attribute.features.top_k` (float32, normalised random features).
"""
import argparse
import statistics
import time

import torch

from difflab.attribute.features import top_k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(a.n, a.dim, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(1, a.dim, generator=g), dim=-1)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        top_k(q, bank, a.k)
        times.append(time.perf_counter() - t)
    print(f"| features | dim | top-k | threads | median seconds (5 runs after a warm-up) |\n|---|---|---|---|---|\n"
          f"| {a.n:,} | {a.dim} | {a.k} | {a.threads} | {statistics.median(times[1:]):.3f} |")


if __name__ == "__main__":
    main()
