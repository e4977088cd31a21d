"""A text slider on the named prompts, applied in windows of denoising steps and over ranges of scale.

    python benchmarks/bench_slider_window.py SLIDER --windows 0-25,0-8,0-12,2-12,3-15,2-25 --seed 20000 --n 64
    python benchmarks/bench_slider_window.py SLIDER --windows 3-25 --ranges 0.2,0.5,2 --seed 30000 --n 128

Per (window, range): the oracle's size by scale (-r, -r/2, 0, r/2, r), the share of seeds whose image at +r is larger
than at -r, and the share whose shape and colour are the same at every scale as at 0 (the text slider's bars, at
r = 2). A window a-b turns the slider on after step a and off after step b of 25 (b = 25: on to the end). Small
ranges measure how fragile the seeds are: the share that flips under a push too small to change the size.
"""
import argparse
import json
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slider", type=Path)
    ap.add_argument("--windows", default="0-25")
    ap.add_argument("--ranges", default="2", help="comma-separated r: scales -r, -r/2, 0, r/2, r")
    ap.add_argument("--seed", type=int, default=20_000)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from difflab.models import load_oracle, load_pipeline
    from difflab.sliders import load_sliders
    from difflab.sliders.text import NAMED_PROMPTS, measure_ordinal
    pipe, oracle = load_pipeline("shapes"), load_oracle()
    names, _ = load_sliders(pipe, [str(a.slider)])
    rows = []
    print("| window | range | size by scale | +r larger than -r | shape and colour kept, every scale |\n|---|---|---|---|---|")
    for w in a.windows.split(","):
        start, end = (int(v) for v in w.split("-"))
        for r in (float(v) for v in a.ranges.split(",")):
            m = measure_ordinal(pipe, names[0], NAMED_PROMPTS, seed=a.seed, n=a.n, oracle=oracle, start=start,
                                end=None if end >= 25 else end, scales=(-r, -r / 2, 0.0, r / 2, r))
            rows.append({"window": w, "range": r, **m})
            sizes = " / ".join(f"{v:.2f}" for v in m["size_mean_by_scale"].values())
            print(f"| {w} | ±{r:g} | {sizes} | {m['size_top_gt_bottom']:.3f} | {m['shape_color_unchanged']:.3f} |",
                  flush=True)
    out = a.slider.parent / f"{a.slider.name}-window-{a.seed}.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
