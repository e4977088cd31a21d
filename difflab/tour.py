"""`difflab tour`: the main job. Samples the world, generates a prompt grid, judges it, writes report.html.

Each capability adds its section to the report as it lands.
"""
from __future__ import annotations

import time
from pathlib import Path

from difflab import report
from difflab.core.runs import atomic_write_json, output_folder, write_metrics
from difflab.generate import save_images
from difflab.models import load_oracle, load_pipeline
from difflab.world import sample_folder
from difflab.world.dataset import parse_prompt
from difflab.world.evaluate import BARS, evaluate, headline, prompt_sets


def run_tour(out: Path, model: str = "shapes", n: int = 4, seed: int = 1000) -> dict:
    out = Path(out)
    t0 = time.time()
    pipe = load_pipeline(model)
    oracle = load_oracle()
    with output_folder(out) as tmp:
        world_dir = sample_folder(tmp / "world", n=24, seed=seed)
        from difflab.core.data import load_folder_images, read_metadata
        recs = read_metadata(world_dir)
        world_imgs = load_folder_images(world_dir, recs)
        world_pred = oracle.predict(world_imgs)
        world_acc = sum(p == r["factors"] for p, r in zip(world_pred, recs)) / len(recs)

        res = evaluate(pipe, oracle, n=n, seed=seed, progress=True, sets=prompt_sets(seed))
        sections = [("The shapes world", f"<p>24 procedural images with their captions. The oracle reads all six "
                     f"factors of {world_acc:.0%} of them correctly.</p>"
                     + report.grid(world_imgs, [r["caption"] for r in recs]))]
        head = headline(res)
        rows = [[k, head[k], f"{op} {bar}", "pass" if (head[k] >= bar if op == ">=" else head[k] <= bar) else "FAIL"]
                for k, (op, bar) in BARS.items()]
        sections.append(("Scores (oracle-judged)", "<p>Each prompt set is generated with "
                         f"{n} images per prompt (DDIM 25 steps, guidance 5, seeds from {seed}).</p>"
                         + report.table(["measure", "value", "bar", ""], rows)))
        for name, (images, records, preds) in res.pop("_images").items():
            d = tmp / "generated" / name
            d.mkdir(parents=True)
            save_images(images, records, d)
            marks = []
            for r, p in zip(records, preds):
                want = parse_prompt(r["prompt"])
                marks.append(all(p[f] == v for f, v in want.items()) if want else None)
            atomic_write_json(d / "judge.json", res[name])
            sections.append((f"Generated: {name}", report.grid(images[::max(1, n)][:48],
                                                               [r["prompt"] for r in records][::max(1, n)][:48],
                                                               marks[::max(1, n)][:48])))
        report.write_report(tmp / "report.html", "difflab tour", sections,
                            subtitle=f"model {model}; {time.strftime('%Y-%m-%d %H:%M')}")
        metrics = {**{k: round(v, 4) for k, v in head.items()}, "world_oracle_all_factors": world_acc,
                   "seconds": round(time.time() - t0, 1)}
        write_metrics(tmp, metrics)
    return metrics
