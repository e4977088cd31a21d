"""Would torch.compile make customize's step faster? The shapes UNet's forward + backward as customize runs it
(cross-attention K/V trainable, everything else frozen), eager and compiled, timed alternately in one process.

    python benchmarks/bench_unet_compile.py [--threads 1] [--batch 8] [--steps 30] [--rounds 3]

Prints the compile time, the largest output difference, and per round the median ms per step of each.
"""
import argparse
import time

import torch

from difflab.models import load_pipeline


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="instance + class images per step (customize: 4 + 4)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline("shapes")
    unet = pipe.unet.train().requires_grad_(False)
    for name, m in unet.named_modules():
        if name.endswith("attn2"):   # what customize trains (xattn_kv)
            m.to_k.weight.requires_grad_(True)
            m.to_v.weight.requires_grad_(True)
    c = unet.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(a.batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = torch.randn(a.batch, pipe.tokenizer.model_max_length, c.cross_attention_dim, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g)

    def step(f):
        f(z, t, cond).sample.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    def median_ms(f):
        for _ in range(5):
            step(f)
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step(f)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    t0 = time.perf_counter()
    compiled = torch.compile(unet)
    step(compiled)
    print(f"compile + first step: {time.perf_counter() - t0:.1f} s")
    with torch.no_grad():
        print(f"max |eager - compiled| output: {(unet(z, t, cond).sample - compiled(z, t, cond).sample).abs().max():.2e}")
    print("\n| round | eager ms/step | compiled ms/step | ratio |\n|---|---|---|---|")
    for r in range(a.rounds):
        e, k = median_ms(unet), median_ms(compiled)
        print(f"| {r} | {e:.1f} | {k:.1f} | {k / e:.2f} |")


if __name__ == "__main__":
    main()
