"""DreamSim on the shapes world: 2AFC of every variant on a test split no training saw, and throughput.

    python benchmarks/bench_similarity.py [--n 3000] [--steps 1500] [--threads 2] [--out bench-sim]
        [--full-steps 3000 --world 20000 --full-lr 3e-4 --full-batch 32 --schedule constant]
        [--model DIR ...]

Makes a shapes 2AFC set (NIGHTS layout), trains the LoRA and MLP variants on its train split (and, with
--full-steps, every backbone weight on the train split plus --world fresh world triplets), evaluates any
--model folders (e.g. the shipped difflab/world/weights/dreamsim), and prints a markdown table: pixel L2, the
untuned shapes-CLIP embedding, each variant, with the 2AFC on 1,000 fresh world triplets beside the test split
(the training distribution: a gap between the two would be over-fitting); plus embedding images/s.
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
    ap.add_argument("--full-lr", type=float, default=3e-4)
    ap.add_argument("--full-batch", type=int, default=32)
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    ap.add_argument("--model", type=Path, action="append", default=[], help="a trained DreamSim folder to score")
    ap.add_argument("--skip-small", action="store_true", help="skip the MLP and LoRA trainings")
    ap.add_argument("--heldout-seed", type=int, default=None,
                    help="also score 3,000 triplets of this seed, all one split (docs: 12345)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    trip = a.out / "triplets"
    if not (trip / "data.csv").exists():
        make_2afc(trip, a.n, seed=0)
    fresh = a.out / "fresh"   # 1,000 world triplets from another seed, all in one split
    if not (fresh / "data.csv").exists():
        make_2afc(fresh, 1000, seed=777, splits=(("test", 1.0),))
    test, fresh_t = read_2afc(trip, "test"), read_2afc(fresh, "test")
    held = []
    if a.heldout_seed is not None:
        if not (a.out / "heldout" / "data.csv").exists():
            make_2afc(a.out / "heldout", 3000, seed=a.heldout_seed, splits=(("test", 1.0),))
        held = read_2afc(a.out / "heldout", "test")

    def row(name, fn, took="-"):
        h = f"{evaluate_2afc(fn, held, 32)['2afc']:.3f}" if held else "-"
        return (name, evaluate_2afc(fn, test, 32)["2afc"], evaluate_2afc(fn, fresh_t, 32)["2afc"], h, took)
    rows = [row("pixel L2", pixel_l2)]
    untuned = DreamSim([load_backbone("shapes-clip")]).eval()
    rows.append(row("shapes CLIP, untuned", untuned))
    for mode in () if a.skip_small else ("mlp", "lora"):
        t = time.time()
        train_and_save(trip, a.out / mode, mode=mode, steps=a.steps, progress=False)
        rows.append(row(f"DreamSim {mode}", DreamSim.from_pretrained(a.out / mode), f"{time.time() - t:.0f} s"))
    if a.full_steps:
        t = time.time()
        train_and_save(trip, a.out / "full", mode="full", steps=a.full_steps, batch_size=a.full_batch, lr=a.full_lr,
                       world=a.world, lr_schedule=a.schedule, progress=False)
        rows.append(row(f"DreamSim full, +{a.world} world triplets", DreamSim.from_pretrained(a.out / "full"),
                        f"{time.time() - t:.0f} s"))
    for m in a.model:
        rows.append(row(f"{m}", DreamSim.from_pretrained(m)))
    model = untuned
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
    print("| distance | test 2AFC | fresh world 2AFC | held-out 3,000 | training time |\n|---|---|---|---|---|")
    for name, s, f, h, tt in rows:
        print(f"| {name} | {s:.3f} | {f:.3f} | {h} | {tt} |")
    print(f"\nembedding throughput (shapes CLIP tower, batch 256, median of 5): {ips:.0f} images/s")
    (a.out / "results.json").write_text(json.dumps({"rows": rows, "images_per_s": ips}, indent=2))


if __name__ == "__main__":
    main()
