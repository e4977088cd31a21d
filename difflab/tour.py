"""`difflab tour`: the main job. Samples the world, generates a prompt grid, judges it, writes report.html.

Each capability adds its section to the report as it lands.
"""
from __future__ import annotations

import html
import time
from pathlib import Path

from difflab import report
from difflab.core.runs import atomic_write_json, output_folder, write_metrics
from difflab.generate import save_images
from difflab.models import load_oracle, load_pipeline
from difflab.world import sample_folder
from difflab.world.dataset import parse_prompt
from difflab.world.evaluate import BARS, evaluate, headline, prompt_sets


def run_tour(out: Path, model: str = "shapes", n: int = 4, seed: int = 1000, train_steps: int = 400,
             detect_images: int = 300) -> dict:
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
        published = {}
        if model == "shapes":   # the model card's figures, from 8 images per prompt
            import json

            from difflab.models import WEIGHTS
            published = json.loads((WEIGHTS / "scores.json").read_text())["headline"]
        rows = [[k, head[k], published.get(k, "-"), f"{op} {bar}"] for k, (op, bar) in BARS.items()]
        sections.append(("Scores (oracle-judged)", "<p>Each prompt set is generated here with "
                         f"{n} images per prompt (DDIM 25 steps, guidance 5, seeds from {seed}); small samples are "
                         "noisy, so the model card's figures (8 images per prompt) stand beside them.</p>"
                         + report.table(["measure", "this tour", "model card", "bar"], rows)))
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
        sim_section, sim_metrics = similarity_section(tmp / "similarity", seed=seed)
        sections.append(("Similarity (DreamSim)", sim_section))
        edit_metrics = {}
        if model == "shapes" and train_steps:
            edit_section, edit_metrics = customize_erase_section(tmp / "edit", train_steps, pipe, seed=seed)
            sections.append(("Customize and erase", edit_section))
        sl_metrics = {}
        if model == "shapes" and train_steps:
            sl_section, sl_metrics = sliders_section(tmp / "sliders", train_steps, pipe, seed=seed)
            sections.append(("Sliders", sl_section))
        det_metrics = {}
        if model == "shapes" and train_steps and detect_images:
            det_section, det_metrics = detection_section(tmp / "detect", train_steps, pipe, detect_images, seed=seed)
            sections.append(("Detection", det_section))
        attr_section, attr_metrics = attribution_section(tmp / "attribute", pipe, oracle, seed=seed,
                                                         unlearn=bool(model == "shapes" and train_steps))
        sections.append(("Attribution", attr_section))
        report.write_report(tmp / "report.html", "difflab tour", sections,
                            subtitle=f"model {model}; {time.strftime('%Y-%m-%d %H:%M')}")
        metrics = {**{k: round(v, 4) for k, v in head.items()}, "world_oracle_all_factors": world_acc, **sim_metrics, **edit_metrics, **sl_metrics, **det_metrics, **attr_metrics,
                   "seconds": round(time.time() - t0, 1)}
        write_metrics(tmp, metrics)
    return metrics


def similarity_section(folder: Path, seed: int = 0, n: int = 200, show: int = 6) -> tuple[str, dict]:
    """Shapes 2AFC triplets judged by pixel L2, the untuned embedding and DreamSim, beside the ground truth."""
    from difflab.core.data import load_image
    from difflab.similarity import dreamsim, evaluate_2afc, make_2afc, pixel_l2, read_2afc
    make_2afc(folder, n, seed=seed, splits=(("test", 1.0),))
    trip = read_2afc(folder)
    from difflab.models import WEIGHTS
    from difflab.similarity import WEIGHTS_FILE, load_triplets
    untuned, _ = dreamsim(pretrained=False)
    dists = [("pixel_l2", pixel_l2), ("shapes_clip_untuned", untuned)]
    if (WEIGHTS / "dreamsim" / WEIGHTS_FILE).exists():   # the tuned shapes DreamSim (docs/BENCHMARKS.md)
        dists.append(("dreamsim_tuned", dreamsim()[0]))
    metrics = {f"similarity_2afc_{name}": evaluate_2afc(fn, trip, 32)["2afc"] for name, fn in dists}
    ref, x0, x1, p1 = load_triplets(trip[:show], 32)
    verdicts = {name: (fn(ref, x1) < fn(ref, x0)).tolist() for name, fn in dists}
    rows, images, caps = [], [], []
    for i, t in enumerate(trip[:show]):
        truth = "img1" if t["p1"] > 0.5 else "img0"
        rows.append([f"triplet {i}", truth] + [("img1" if verdicts[k][i] else "img0") for k in verdicts])
        for key in ("ref", "img0", "img1"):
            images.append(load_image(t[key]))
            caps.append(f"{i}: {key}")
    body = (f"<p>{n} triplets; which image is closer to ref under the ground-truth rule (shape weighs most, "
            "background least), and what each distance says. 2AFC on all of them:</p>"
            + report.table(["distance", "2AFC"], [[k.removeprefix("similarity_2afc_"), v] for k, v in metrics.items()])
            + report.table(["", "truth", *verdicts], rows) + report.grid(images, caps))
    return body, metrics


def customize_erase_section(folder: Path, steps: int, base_pipe, seed: int = 0, n: int = 8) -> tuple[str, dict]:
    """Teach the held-out heart from 8 images (Custom Diffusion) and erase the star (Concept Ablation), each
    trained `steps` steps here; the oracle marks each generated image. Short runs: docs/BENCHMARKS.md has the
    full-length figures."""
    from difflab.customize import Concept, customize, shapes_recipe
    from difflab.erase import EraseConfig, erase_run
    from difflab.generate import generate_images
    folder.mkdir(parents=True)
    sample_folder(folder / "heart-images", n=8, seed=seed, include_heldout=True, where=["shape=heart"])
    cm = customize("shapes", [Concept(str(folder / "heart-images"))], folder / "customize",
                   shapes_recipe(steps=steps, progress=True))
    em = erase_run("shapes", "a star", "a shape", folder / "erase", EraseConfig(steps=steps, progress=True))
    oracle = load_oracle()
    body = ""
    for title, adapter, prompts, want in (
            ("Custom Diffusion: <new1> taught from the 8 images of a heart (a shape no caption ever named)",
             folder / "customize", ["a <new1> shape", "a red <new1> shape"], "heart"),
            ("Concept Ablation: star erased towards \"a shape\"", folder / "erase", ["a red star", "a blue star"], None)):
        rows = []
        for name, p in (("base", base_pipe), ("after", _with_adapter(adapter))):
            imgs, recs = generate_images(p, prompts, n=n // 2, seed=seed + 7, progress=False)
            preds = oracle.predict(imgs)
            ok = [(q["shape"] == want) if want else (q["shape"] != "star") for q in preds]
            rows.append((name, imgs, [f"{name}: {r['prompt']} -> {q['shape']}" for r, q in zip(recs, preds)], ok))
        body += f"<h3>{html.escape(title)}</h3>" + "".join(report.grid(i, c, m) for _, i, c, m in rows)
    keys = ("<new1>_rate", "base_<new1>_rate", "<new1>_color_accuracy", "drift_joint_before", "drift_joint_after",
            "target_rate_before", "target_rate_after", "other_shapes_accuracy_before", "other_shapes_accuracy_after")
    metrics = {f"edit_{k.replace('<new1>', 'new1')}": v for k, v in {**cm, **em}.items() if k in keys}
    body = (f"<p>Each trained {steps} steps in this tour. Oracle-judged rates:</p>"
            + report.table(["measure", "value"], [[k, v] for k, v in metrics.items()]) + body)
    return body, metrics


def _with_adapter(folder: Path):
    from difflab.adapters import apply_adapters
    pipe = load_pipeline("shapes")
    apply_adapters(pipe, [str(folder)])
    return pipe


def detection_section(folder: Path, steps: int, pipe, n_real: int, seed: int = 0) -> tuple[str, dict]:
    """A short online stream (three generators of the shapes model) as a heat-map, and a pixel-level detector's
    localisation of held-out inpainted images beside the true masks. Trained `steps` steps here; the
    full-length figures are in docs/BENCHMARKS.md."""
    import json

    import numpy as np
    from PIL import Image

    from difflab.detect import run_stream
    from difflab.detect.data import split_mask
    from difflab.detect.pixel import (PixelConfig, make_inpainted, pixel_metrics, predict_masks, read_masked_folder,
                                      train_pixel_detector)
    from difflab.detect.model import load_detector
    folder.mkdir(parents=True)
    cfg = {"real": {"world": {"n": n_real, "seed": seed}},
           "generators": [{"name": "ddim25", "make": {"model": "shapes", "steps": 25}},
                          {"name": "guidance1", "make": {"model": "shapes", "guidance": 1.0}},
                          {"name": "gen64-down", "make": {"model": "shapes", "size": 64}}],
           "train": {"steps": steps}, "update_steps": max(1, steps // 2)}
    (folder / "stream.json").write_text(json.dumps(cfg))
    sm = run_stream(folder / "stream.json", folder / "stream")
    make_inpainted(pipe, folder / "stream" / "data" / "real", folder / "inpainted", seed=seed)
    pm = train_pixel_detector([folder / "inpainted"], folder / "pixel", PixelConfig(steps=steps))
    x, m, files = read_masked_folder(folder / "inpainted", 32)
    test = split_mask(files, "test")
    x, m = x[test][:8], m[test][:8]
    model, _ = load_detector(folder / "pixel", kind="pixel")
    prob = predict_masks(model, x)
    images, caps = [], []
    for xi, mi, pi in zip(x, m, prob):
        images += [Image.fromarray(xi), Image.fromarray((mi * 255).astype(np.uint8)),
                   Image.fromarray((pi * 255).astype(np.uint8))]
        caps += ["inpainted image", "true mask", f"predicted (IoU {pixel_metrics(pi[None], mi[None])['iou']:.2f})"]
    names = sm["generators"]
    body = (f"<p>{n_real} procedural reals; each generator makes one image per real caption. The detector trains "
            f"on the first generator ({steps} steps), then is updated on each next one with replay "
            f"({max(1, steps // 2)} steps); after each step it is tested on every generator's held-out split. "
            "Rows: trained through; columns: tested on (AP).</p>"
            + report.table(["trained through", *names], [[n, *row] for n, row in zip(names, sm["ap"])])
            + f"<img style='width:auto;height:auto' src='{report.data_uri(Image.open(folder / 'stream' / 'ap_matrix.png'))}'>"
            + f"<p>Pixel level: random 15-35 % masks inpainted by the shapes model, original pixels pasted back; "
              f"held-out pixel AP {pm['pixel_ap']:.3f}, IoU {pm['iou']:.3f}.</p>" + report.grid(images, caps))
    metrics = {f"detect_ap_{names[i]}_after_{names[i]}": sm["ap"][i][i] for i in range(len(names))}
    metrics.update(detect_pixel_ap=pm["pixel_ap"], detect_iou=pm["iou"])
    return body, metrics


def sliders_section(folder: Path, steps: int, pipe, seed: int = 0, num: int = 6) -> tuple[str, dict]:
    """SliderSpace on "a shape" (contact sheet; what each slider moves, by the oracle) and the text slider
    small -> large (its strip and the oracle's size per scale). Trained `steps` steps each here."""
    from PIL import Image

    from difflab.sliders import DiscoverConfig, TextSliderConfig, discover, train_text_slider
    folder.mkdir(parents=True)
    dm = discover("shapes", "a shape", folder / "discover",
                  DiscoverConfig(num_sliders=num, num_samples=max(4 * num, min(512, 2 * steps)), steps=steps, seed=seed))
    tm = train_text_slider("shapes", "a shape", "a large shape", "a small shape", folder / "size",
                           cfg=TextSliderConfig(steps=steps, seed=seed))
    rows = [[name, s["dominant_factor"], s["changed"]] for name, s in dm["sliders"].items()]
    body = (f"<p>SliderSpace: {dm['num_sliders']} principal directions of the shapes CLIP features of "
            f"\"a shape\" images, one rank-1 LoRA each ({steps} steps). Each row of the sheet is one slider at "
            "scales -2..+2 (same seed); the table says which factor the oracle sees it move most between -2 and "
            "+2, and for what share of 32 seeds that factor changes.</p>"
            + f"<img style='width:auto;height:auto' src='{report.data_uri(Image.open(folder / 'discover' / 'contact_sheet.png'))}'>"
            + report.table(["slider", "dominant factor", "changed"], rows)
            + "<p>Concept Slider from text: \"a small shape\" -> \"a large shape\" on \"a shape\"; rows are seeds, "
              "columns scales -2..+2. The oracle's mean size level (0 small, 1 medium, 2 large) per scale: "
            + html.escape(str(tm["size_mean_by_scale"])) + "</p>"
            + f"<img style='width:auto;height:auto' src='{report.data_uri(Image.open(folder / 'size' / 'strip.png'))}'>")
    metrics = {"sliders_distinct_dominant_factors": dm["distinct_dominant_factors"],
               "sliders_min_changed": dm["min_changed"], "size_slider_top_gt_bottom": tm["size_top_gt_bottom"],
               "size_slider_shape_color_unchanged": tm["shape_color_unchanged"],
               "size_slider_named_shape_color_unchanged": tm["named_shape_color_unchanged"]}
    return body, metrics


def attribution_section(folder: Path, pipe, oracle, seed: int = 0, n_train: int = 500, k: int = 8,
                        unlearn: bool = True) -> tuple[str, dict]:
    """Three generated queries ranked against the first `n_train` images of the shapes training set by features
    (and the first by AbU), each top image marked by the world's truth: does it share the shape and colour the
    oracle reads in the query?"""
    from difflab.attribute import rank
    from difflab.core.data import load_image, read_metadata
    from difflab.generate import generate_images
    from difflab.world import dataset
    (folder / "train").mkdir(parents=True)
    dataset.write_folder(dataset.training_set(n_train), folder / "train")
    recs = {r["file"]: r for r in read_metadata(folder / "train")}
    prompts = ["a red star on a black background", "a large blue striped circle", "a green triangle at the top left"]
    images, records = generate_images(pipe, prompts, seed=seed, progress=False)
    (folder / "queries").mkdir()
    save_images(images, records, folder / "queries")
    wants = oracle.predict(images)
    body, hits = [], []
    runs = [(i, "features") for i in range(len(prompts))] + ([(0, "unlearn")] if unlearn else [])
    for i, method in runs:
        q = folder / "queries" / records[i]["file"]
        res = rank(folder / "train", q, folder / f"{method}-{i}", method=method, k=k, progress=False)
        want = wants[i]
        marks = [all(recs[t["file"]]["factors"][f] == want[f] for f in ("shape", "color")) for t in res["top"]]
        total = sum(all(r["factors"][f] == want[f] for f in ("shape", "color")) for r in recs.values())
        hits.append(sum(marks) / len(marks))
        body.append(f"<p><b>{html.escape(records[i]['prompt'])}</b> ({method}): {sum(marks)} of the top {k} are "
                    f"{want['color']} {want['shape']}s, as the oracle reads the query; {total} of the {n_train} "
                    "training images are.</p>"
                    + report.grid([images[i]] + [load_image(folder / "train" / t["file"]) for t in res["top"]],
                                  ["query"] + [f"#{t['rank']} {recs[t['file']]['caption']}" for t in res["top"]],
                                  [None] + marks))
    intro = (f"<p>Which of {n_train} training images of the shapes model look most like what it generated? "
             "Green marks: the training image has the query's shape and colour (the world knows every image's "
             "factors). The benchmark and the counterfactual gold standard are `difflab attribute benchmark` and "
             "`difflab attribute gold`.</p>")
    return intro + "".join(body), {"attribute_top_shape_color_match": round(sum(hits) / len(hits), 4)}
