"""How many operator calls one forward and backward of the shapes UNet makes (customize's step: batch 8, K/V
gradients and the gradient into the text embeddings): on a GPU most are one small kernel launch each, which is
why a step there is bound by the CPU and why CUDA graphs (difflab/core/graphs.py) pay.

    python benchmarks/bench_unet_ops.py          # session 11: 5,219 ATen calls, 2,934 of them leaves
"""
import torch
from torch.profiler import ProfilerActivity, profile


def main():
    from difflab.core.params import freeze_all_but, select
    from difflab.models import load_pipeline
    torch.set_num_threads(1)
    u = load_pipeline("shapes").unet.train()
    u.requires_grad_(False)
    freeze_all_but(u, select(u, "xattn_kv"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    c = torch.randn(8, 77, u.config.cross_attention_dim, generator=g, requires_grad=True)
    u(x, t, c).sample.pow(2).mean().backward()   # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        u(x, t, c).sample.pow(2).mean().backward()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e for e in aten if not any(ch.name.startswith("aten::") for ch in e.cpu_children)]
    print(f"ATen calls: {len(aten)}, leaves (no ATen call inside): {len(leaves)}")


if __name__ == "__main__":
    main()
