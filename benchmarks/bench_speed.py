"""Speed of the foundation: generation on the shapes model and the oracle's judging.

    python benchmarks/bench_speed.py [--threads 2] [--repeats 5]

Prints a markdown table: median and spread over repeats (the machine is shared and noisy).
"""
import argparse
import statistics
import time

import torch

from difflab.models import load_oracle, load_pipeline
from difflab.world import sample
from difflab.world.dataset import render_array


def timed(fn, repeats):
    fn()   # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts), max(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("shapes")
    oracle = load_oracle()
    prompts = ["a red star at the top left"] * 16

    def gen():
        g = [torch.Generator().manual_seed(i) for i in range(16)]
        pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=g)

    imgs = render_array(sample(1000, 1))
    rows = [("generate 16 images, 25 DDIM steps, guidance 5", *timed(gen, a.repeats), "<= 10 s"),
            ("oracle judges 1,000 images", *timed(lambda: oracle.predict(imgs), a.repeats), "<= 5 s")]
    print(f"torch {torch.__version__}, {a.threads} threads, median of {a.repeats}\n")
    print("| task | median s | min s | max s | bar |\n|---|---|---|---|---|")
    for name, med, lo, hi, bar in rows:
        print(f"| {name} | {med:.2f} | {lo:.2f} | {hi:.2f} | {bar} |")


if __name__ == "__main__":
    main()
