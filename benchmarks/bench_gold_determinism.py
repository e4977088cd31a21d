"""Do two identical retrainings of the gold standard's small UNet come out the same, and how far apart are they
next to a retraining without a few images? Meant for a GPU, where CUDA's default kernels are not deterministic.

    python benchmarks/bench_gold_determinism.py --steps 4            # session 11, H100: see docs/BENCHMARKS.md

Prints, with CUDA's default kernels (`GoldConfig(deterministic=False)`) and with deterministic ones (the default),
the largest per-weight difference and the L2 distance between two retrainings, and between a retraining and one
without the first `--removed` images. On the CPU both rows read 0 for two retrainings.
"""
import argparse
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--removed", type=int, default=5)
    a = ap.parse_args()
    from difflab.attribute.gold import GoldConfig, make_world, train_small
    from difflab.attribute.unlearn import training_data
    from difflab.core.data import encode_prompts
    from difflab.models import load_pipeline
    pipe = load_pipeline("shapes")
    empty = encode_prompts(pipe, [""])[0]

    def dist(x, y):
        d = max((p - q).abs().max().item() for p, q in zip(x.parameters(), y.parameters()))
        return d, sum((p - q).pow(2).sum().item() for p, q in zip(x.parameters(), y.parameters())) ** 0.5

    with TemporaryDirectory() as tmp:
        cfg = GoldConfig(steps=a.steps)
        make_world(Path(tmp), cfg)
        data = training_data(pipe, Path(tmp) / "train")
        for det in (False, True):
            c = replace(cfg, deterministic=det)
            x, y = (train_small(data, empty, pipe.scheduler, c) for _ in range(2))
            r = train_small(data, empty, pipe.scheduler, c, removed=list(range(a.removed)))
            same, rm = dist(x, y), dist(x, r)
            print(f"{'deterministic' if det else 'default'} kernels: two retrainings max {same[0]:.3g} L2 {same[1]:.3g}"
                  f" | without {a.removed} images max {rm[0]:.3g} L2 {rm[1]:.3g}", flush=True)


if __name__ == "__main__":
    main()
