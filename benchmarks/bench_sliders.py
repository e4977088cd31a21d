"""difflab.sliders on the shapes model, judged by the oracle on seeds no training used.

    python benchmarks/bench_sliders.py [--threads 2] [--out bench-sliders] [--steps 600] [--text-steps 500]
        [--feature-point final|x0] [--skip-discover] [--skip-text] [--skip-text-training] [--text-eta 2]
        [--text-attributes red,green,...] [--text-nouns circle,square,...] [--text-slider FOLDER]
        [--starts 0,3,4,5,6] [--select-n 64] [--confirm-n 128]

1. SliderSpace: 8 sliders for "a shape" (wall-clock time and per-step cost); for each slider the factor whose
   oracle distribution moves most between scale -2 and +2, and the share of 32 seeds where it changes.
2. Diverse generation: 64 images of "a shape" from the base model and with random sparse slider compositions
   (2 sliders per image, scales ~ U[-2, 2]), same seeds: diversity of oracle factor vectors (mean pairwise
   Hamming distance) and of shapes-CLIP embeddings (mean pairwise cosine distance), and the share of images
   whose shape the oracle recognises (softmax > 0.5).
3. Concept Slider "a small shape" -> "a large shape": the oracle's size level per scale -2..2, on "a shape" and
   on 8 prompts that name a shape and a colour (NAMED_PROMPTS), with the slider applied from each denoising step
   of --starts on seeds 20,000 (--select-n images, each its own seed); the start whose weaker bar figure is
   highest (ties: the larger sum, then the earlier start) is then measured once on seeds 30,000 (--confirm-n).
Prints markdown tables; writes OUT/results.json.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from difflab.metrics import clip_embeddings, diversity
from difflab.models import load_oracle, load_pipeline
from difflab.sliders import DiscoverConfig, TextSliderConfig, discover, load_sliders, slider_folders, train_text_slider
from difflab.sliders.evaluate import factor_diversity, generate_at, generate_diverse, shape_confidence


def diverse_vs_base(run: Path, n: int = 64, seed: int = 30_000, k: int = 2, scale: float = 2.0) -> dict:
    oracle = load_oracle()
    pipe = load_pipeline("shapes")
    names, _ = load_sliders(pipe, [str(f) for f in slider_folders(run)])
    base = generate_at(pipe, names, [0.0] * len(names), "a shape", n, seed)
    div, _ = generate_diverse(pipe, names, "a shape", n, seed, k=k, max_scale=scale)
    out = {}
    for name, imgs in (("base", base), ("diverse", div)):
        emb, _ = clip_embeddings(imgs, ["a shape"] * len(imgs))
        out[name] = {"factor_diversity": factor_diversity(oracle.predict(imgs)), "clip_diversity": diversity(emb),
                     "recognised": float((shape_confidence(oracle, imgs) > 0.5).mean())}
    out["factor_ratio"] = out["diverse"]["factor_diversity"] / out["base"]["factor_diversity"]
    out["clip_ratio"] = out["diverse"]["clip_diversity"] / out["base"]["clip_diversity"]
    return out


def text_slider_starts(folder: Path, starts: list[int], select_n: int = 64, confirm_n: int = 128) -> dict:
    """The size slider on NAMED_PROMPTS from each start step on the selection seeds; the chosen start on fresh ones."""
    from difflab.sliders.text import NAMED_PROMPTS, measure_ordinal
    pipe, oracle = load_pipeline("shapes"), load_oracle()
    names, _ = load_sliders(pipe, [str(folder)])
    measure = lambda seed, n, st: measure_ordinal(pipe, names[0], NAMED_PROMPTS, seed=seed, n=n, oracle=oracle, start=st)
    select = {st: measure(20_000, select_n, st) for st in starts}
    score = lambda st: (min(select[st]["size_top_gt_bottom"], select[st]["shape_color_unchanged"]),
                        select[st]["size_top_gt_bottom"] + select[st]["shape_color_unchanged"], -st)
    chosen = max(starts, key=score)
    return {"select": select, "confirm": {chosen: measure(30_000, confirm_n, chosen)}}


def discover_tables(res: dict, feature_point: str) -> None:
    m = res["discover"]
    print(f"SliderSpace, {m['num_sliders']} sliders, feature point {feature_point}: "
          f"{m['seconds_total']:.0f} s in all (sampling + PCA {m['seconds_sampling_pca']:.0f} s, training "
          f"{m['seconds_training']:.0f} s = {m['seconds_per_step']:.2f} s/step), final alignment cos "
          f"{m['final_alignment_cos']:.3f}")
    print("\n| slider | explained variance | dominant factor | changed (of 32 seeds) | TV by factor |\n|---|---|---|---|---|")
    for i, (name, s) in enumerate(m["sliders"].items()):
        tv = ", ".join(f"{f} {v:.2f}" for f, v in sorted(s["tv"].items(), key=lambda x: -x[1])[:3])
        print(f"| {name} | {m['explained_variance_ratio'][i]:.3f} | {s['dominant_factor']} | {s['changed']:.2f} | {tv} |")
    print(f"\ndistinct dominant factors: {m['distinct_dominant_factors']}; lowest changed share: {m['min_changed']:.2f}")
    d = res["diverse"]
    print("\n| 64 x \"a shape\" | factor diversity | CLIP diversity | recognised |\n|---|---|---|---|")
    for k in ("base", "diverse"):
        print(f"| {k} | {d[k]['factor_diversity']:.3f} | {d[k]['clip_diversity']:.4f} | {d[k]['recognised']:.3f} |")
    print(f"| ratio | {d['factor_ratio']:.2f}x | {d['clip_ratio']:.2f}x | |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-sliders"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--text-steps", type=int, default=500)
    ap.add_argument("--feature-point", default="final")
    ap.add_argument("--skip-discover", action="store_true")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-text-training", action="store_true", help="measure OUT/size as it is")
    ap.add_argument("--text-eta", type=float, default=TextSliderConfig.eta)
    ap.add_argument("--text-attributes", default="", help="the text slider's preservation set (comma-separated)")
    ap.add_argument("--text-nouns", default="", help="its preservation set along the subject (comma-separated)")
    ap.add_argument("--text-slider", type=Path, default=None, help="measure this slider folder (default: OUT/size)")
    ap.add_argument("--starts", default="0,3,4,5,6", help="slider start steps (of 25) to measure the text slider at")
    ap.add_argument("--select-n", type=int, default=64, help="images on the selection seeds, per start")
    ap.add_argument("--confirm-n", type=int, default=128, help="images on the fresh seeds, at the chosen start")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    run = a.out / f"space-{a.feature_point}"
    res = {}
    if not a.skip_discover:
        t = time.time()
        discover("shapes", "a shape", run, DiscoverConfig(steps=a.steps, feature_point=a.feature_point, progress=False))
        res["discover_wall_seconds"] = time.time() - t
    if (run / "metrics.json").exists():   # (with --skip-discover, an earlier run's)
        res["discover"] = json.loads((run / "metrics.json").read_text())
        res["diverse"] = diverse_vs_base(run)
    if not a.skip_text:
        split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())
        if not a.skip_text_training:
            res["text"] = train_text_slider("shapes", "a shape", "a large shape", "a small shape", a.out / "size",
                                            cfg=TextSliderConfig(steps=a.text_steps, eta=a.text_eta, progress=False,
                                                                 attributes=split(a.text_attributes),
                                                                 nouns=split(a.text_nouns)))
        res["text_starts"] = text_slider_starts(a.text_slider or a.out / "size", [int(x) for x in a.starts.split(",")],
                                                a.select_n, a.confirm_n)
    (a.out / "results.json").write_text(json.dumps(res, indent=2))

    if "discover" in res:
        discover_tables(res, a.feature_point)
    if "text_starts" in res:
        print("\n| text slider on named prompts | start | size by scale -2..+2 | monotone | +2 larger than -2 | "
              "shape and color as at 0, every scale | per scale | as prompted, per scale |\n|---|---|---|---|---|---|---|---|")
        for split, rows in res["text_starts"].items():
            for st, r in rows.items():
                print(f"| {split} ({r['n']}) | {st} | {list(r['size_mean_by_scale'].values())} | {r['size_monotone']} | "
                      f"{r['size_top_gt_bottom']:.3f} | {r['shape_color_unchanged']:.3f} | "
                      f"{list(r['shape_color_unchanged_by_scale'].values())} | "
                      f"{list(r['shape_color_as_prompted_by_scale'].values())} |")
    if "text" in res:
        t = res["text"]
        print(f"\ntext slider small -> large ({t['seconds_training']:.0f} s): size level by scale {t['size_mean_by_scale']}, "
              f"monotone {t['size_monotone']}, +2 larger than -2 for {t['size_top_gt_bottom']:.2f} of seeds, "
              f"shape and color unchanged at every scale for {t['shape_color_unchanged']:.2f}")


if __name__ == "__main__":
    main()
