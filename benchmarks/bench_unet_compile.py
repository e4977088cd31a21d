"""Would torch.compile make customize's step faster? The shapes UNet's forward + backward as customize runs it
(cross-attention K/V trainable, everything else frozen), eager and compiled, timed alternately in one process.

    python benchmarks/bench_unet_compile.py [--threads 1] [--batch 8] [--steps 30] [--rounds 3]

Prints the compile time, the largest output difference, and per round the median ms per step of each.
"""
import argparse
import time

import torch

from difflab.models import load_pipeline


def customize_unet(threads: int, batch: int):
    """The shapes UNet as customize trains it (cross-attention K/V trainable, everything else frozen) and one fixed
    batch (latents, timesteps, text features). Shared with bench_unet_kernels.py."""
    torch.set_num_threads(threads)
    pipe = load_pipeline("shapes")
    unet = pipe.unet.train().requires_grad_(False)
    for name, m in unet.named_modules():
        if name.endswith("attn2"):   # what customize trains (xattn_kv)
            m.to_k.weight.requires_grad_(True)
            m.to_v.weight.requires_grad_(True)
    c = unet.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = torch.randn(batch, pipe.tokenizer.model_max_length, c.cross_attention_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return unet, z, t, cond


def median_ms(f, z, t, cond, steps: int) -> float:
    """Median ms of one forward + backward of f (a UNet or its compiled form) after 5 warm-up steps."""
    def step():
        f(z, t, cond).sample.float().pow(2).mean().backward()
        for p in f.parameters():
            p.grad = None
    for _ in range(5):
        step()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def setup(doc: str, threads: int):
    """The UNet benchmarks' command line (--threads, --batch, --steps, --rounds) and their UNet and inputs."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--batch", type=int, default=8, help="instance + class images per step (customize: 4 + 4)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    return (a, *customize_unet(a.threads, a.batch))


def main():
    a, unet, z, t, cond = setup(__doc__, threads=1)

    def step(f):
        f(z, t, cond).sample.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    compiled = torch.compile(unet)
    step(compiled)
    print(f"compile + first step: {time.perf_counter() - t0:.1f} s")
    with torch.no_grad():
        print(f"max |eager - compiled| output: {(unet(z, t, cond).sample - compiled(z, t, cond).sample).abs().max():.2e}")
    print("\n| round | eager ms/step | compiled ms/step | ratio |\n|---|---|---|---|")
    for r in range(a.rounds):
        e, k = median_ms(unet, z, t, cond, a.steps), median_ms(compiled, z, t, cond, a.steps)
        print(f"| {r} | {e:.1f} | {k:.1f} | {k / e:.2f} |")


if __name__ == "__main__":
    main()
