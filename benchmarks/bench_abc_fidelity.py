"""How often an AbC-style benchmark model's queries show its exemplars (`fidelity`), for chosen models and settings.

    python benchmarks/bench_abc_fidelity.py --params xattn_kv --models 9,11,13,15 --out fid-kv
    python benchmarks/bench_abc_fidelity.py --params xattn --models 9,11,13,15 --out fid-xattn

Each model j is trained as `difflab attribute benchmark --style combination --recipe` trains it (the
single-concept recipe, seed j, the benchmark's exemplars and synthesis prompts), with the Custom Diffusion
parameters given, then its 16 queries are generated and read by the oracle. One difference from a full build: the
class images are generated once per OUT with the first listed model's seed (a build uses model 0's), so the
figures compare settings with each other, not with a build's to the last digit.
"""
import argparse
import json
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="xattn_kv", choices=["xattn_kv", "xattn"])
    ap.add_argument("--models", default="9,11,13,15", help="model indices (odd: style, even: object)")
    ap.add_argument("--style", default="combination")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from difflab.attribute.benchmark import BenchmarkConfig, _write_exemplars, concepts, fidelity
    from difflab.customize import Concept, shapes_recipe, train_concepts
    from difflab.generate import generate_images
    from difflab.models import load_oracle, load_pipeline
    ids = [int(v) for v in a.models.split(",")]
    cfg = BenchmarkConfig(style=a.style, models=16, extra_train_models=40)
    cons, oracle, rows = concepts(cfg), load_oracle(), []
    print("| model | kind | params | fidelity | train + generate s |\n|---|---|---|---|---|")
    for j in ids:
        c, d = cons[j], a.out / f"{j:02d}"
        named = c["kind"] == "style" and a.style != "texture"
        _write_exemplars(d / "exemplars", c["exemplars"], named)
        pipe = load_pipeline("shapes")
        t = time.time()
        train_concepts(pipe, [Concept(str(d / "exemplars"), captions=named)],
                       shapes_recipe(progress=False, seed=cfg.seed + j, params=a.params), work=a.out)
        pipe.set_progress_bar_config(disable=True)
        images, _ = generate_images(pipe, c["prompts"], seed=cfg.concept_seed + 1000 * j, progress=False)
        rows.append({"model": j, "kind": c["kind"], "params": a.params, "fidelity": fidelity(images, c, oracle),
                     "seconds": time.time() - t})
        print(f"| {j} | {c['kind']} | {a.params} | {rows[-1]['fidelity']:.3f} | {rows[-1]['seconds']:.0f} |", flush=True)
    (a.out / "fidelity.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
