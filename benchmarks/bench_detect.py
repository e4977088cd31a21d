"""difflab.detect on the shapes world: in-distribution AP, the online stream, pixel-level IoU, throughput.

    python benchmarks/bench_detect.py [--threads 2] [--out bench-detect] [--pixel-n 2000] [--pixel-steps 3000]

1. The stream of benchmarks/detect_stream.json (1000 procedural reals; five generators in "release" order:
   DDIM 25 steps, Euler 8 steps, guidance 1, VAE reconstructions of the reals, generation at 64 px shown at
   32 px): train on the first, update on each next one (replaying the earlier ones), test all after each step.
   Row 0, column 0 is the in-distribution figure (shapes model vs procedural reals).
2. The same first step with UniversalFakeDetect's recipe (frozen shapes CLIP + linear probe), for comparison.
3. Pixel level: inpaint --pixel-n fresh reals (random 15-35 % masks), train the FCN, IoU on the test split.
4. Scoring throughput (images/s; batch 256, median of 5).
Prints markdown tables and writes OUT/results.json.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from difflab.detect import DetectConfig, load_detector, run_stream, train_detector
from difflab.detect.image import predict
from difflab.detect.pixel import PixelConfig, make_inpainted, train_pixel_detector
from difflab.world import sample_folder

HERE = Path(__file__).parent


def throughput(run: Path, threads: int) -> float:
    model, cfg = load_detector(run)
    x = np.random.default_rng(0).integers(0, 256, (256, cfg["load_size"], cfg["load_size"], 3), dtype=np.uint8)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        predict(model, x, cfg["crop_size"])
        times.append(time.perf_counter() - t)
    return 256 / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-detect"))
    ap.add_argument("--pixel-n", type=int, default=2000)
    ap.add_argument("--pixel-steps", type=int, default=3000)
    ap.add_argument("--skip-stream", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    res = {}
    stream = a.out / "stream"
    if not a.skip_stream:
        t = time.time()
        run_stream(HERE / "detect_stream.json", stream, progress=False)
        res["stream_seconds"] = time.time() - t
    m = json.loads((stream / "metrics.json").read_text())
    res["stream"] = m
    first = json.loads((stream / "steps" / "0-ddim25" / "metrics.json").read_text())
    res["in_distribution_cnn"] = {k: first[k] for k in ("ap", "acc", "acc_best", "acc_calibrated", "auc")}
    t = time.time()
    probe = train_detector([stream / "data" / "real"], [stream / "data" / "ddim25"], a.out / "probe",
                           DetectConfig(backbone="shapes-clip", steps=600, progress=False))
    res["in_distribution_probe"] = {k: probe[k] for k in ("ap", "acc", "acc_best", "acc_calibrated", "auc")}
    res["probe_seconds"] = time.time() - t
    res["throughput"] = {"cnn": throughput(stream / "steps" / "0-ddim25", a.threads),
                         "shapes-clip probe": throughput(a.out / "probe", a.threads)}

    real = a.out / "pixel-real"
    if not real.exists():
        sample_folder(real, n=a.pixel_n, seed=8000)
    if not (a.out / "inpainted").exists():
        t = time.time()
        make_inpainted("shapes", real, a.out / "inpainted", progress=False)
        res["inpaint_seconds"] = time.time() - t
    t = time.time()
    res["pixel"] = train_pixel_detector([a.out / "inpainted"], a.out / "pixel",
                                        PixelConfig(steps=a.pixel_steps, progress=False))
    res["pixel_seconds"] = time.time() - t
    (a.out / "results.json").write_text(json.dumps(res, indent=2))

    names = m["generators"]
    print("| trained through \\ tested on | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n, row in zip(names, m["ap"]):
        print(f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print("\n| update on | its AP lift | largest drop on earlier |\n|---|---|---|")
    for n in names[1:]:
        print(f"| {n} | {m['update_lift'][n]:+.3f} | {m['update_max_drop_on_earlier'][n]:+.3f} |")
    print("\n| detector (DDIM-25 vs reals) | AP | acc@0.5 | acc best | acc calibrated | images/s |\n|---|---|---|---|---|---|")
    for k, name in (("in_distribution_cnn", "cnn"), ("in_distribution_probe", "shapes-clip probe")):
        r = res[k]
        print(f"| {name} | {r['ap']:.4f} | {r['acc']:.3f} | {r['acc_best']:.3f} | {r['acc_calibrated']:.3f} | "
              f"{res['throughput'][name]:.0f} |")
    p = res["pixel"]
    print(f"\npixel level: pixel AP {p['pixel_ap']:.3f}, IoU {p['iou']:.3f} (per image {p['iou_per_image']:.3f}), "
          f"n={p['n']}, {res['pixel_seconds']:.0f} s training")


if __name__ == "__main__":
    main()
