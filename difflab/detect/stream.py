"""The online protocol (Epstein et al. 2023): generators arrive in release order; after each one the detector is
updated on it (replaying everything before) and tested on every generator, seen and unseen.

    ap[i][j] = AP on generator j's test split of the detector trained through generator i

Below the diagonal: memory (generators already seen); above it: generalisation to generators not yet
released. The config is JSON:

    {"real": "DIR" | {"world": {"n": 1000, "seed": 7000}},
     "generators": [{"name": "ddim25", "folder": "DIR"},
                    {"name": "euler8", "make": {"model": "shapes", "scheduler": "euler", "steps": 8}},
                    {"name": "vae", "make": {"reconstruct": true}}, ...],
     "train": {"steps": 600, ...}, "update_steps": 300}

A "make" generator is built from the real images' captions (metadata.jsonl), one image per real image, so real
and fake differ in the generator and not in the content (CNNDetection #14: reals must match the fakes'
distribution). Keys of "make": model (default "shapes"), scheduler (ddim, euler, euler_a, dpm, pndm, ddpm,
heun), steps, guidance, adapter (list of "DIR[:SCALE]"), size (generate at this size, then resize to the
reals'), seed, reconstruct (VAE encode/decode of the reals instead of sampling).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from difflab.errors import DifflabError

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "dpm": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
              "heun": "HeunDiscreteScheduler"}


def _captions(real: Path) -> list[str]:
    from difflab.core.data import read_metadata, text_of
    try:
        return [text_of(r) for r in read_metadata(real)]
    except DifflabError as e:
        raise DifflabError(f"a \"make\" generator takes its prompts from the reals' metadata.jsonl: {e}") from e


def make_generator(spec: dict, real: Path, out: Path, progress: bool = True) -> Path:
    """Build one generator's images into `out` (atomically) from the spec's "make" keys (module docstring)."""
    import diffusers
    import torch

    from difflab.core.data import load_folder_images, read_metadata
    from difflab.core.runs import output_folder
    from difflab.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_images, save_images
    from difflab.models import load_pipeline
    unknown = set(spec) - {"model", "scheduler", "steps", "guidance", "adapter", "size", "seed", "reconstruct", "n"}
    if unknown:
        raise DifflabError(f"unknown \"make\" key(s) {sorted(unknown)}")
    pipe = load_pipeline(spec.get("model", "shapes"))
    recs = read_metadata(real)[:spec.get("n")]
    with output_folder(out) as tmp:
        if spec.get("reconstruct"):
            from difflab.core.data import encode_latents, to_pixels
            imgs = load_folder_images(real, recs)
            z = encode_latents(pipe.vae, to_pixels(imgs)) / pipe.vae.config.scaling_factor
            with torch.no_grad():
                x = pipe.vae.decode(z).sample
            images = pipe.image_processor.postprocess(x, output_type="pil")
            records = [{"file": f"{i:06d}.png", "prompt": r.get("caption", ""), "source": r["file"]}
                       for i, r in enumerate(recs)]
        else:
            if "scheduler" in spec:
                if spec["scheduler"] not in SCHEDULERS:
                    raise DifflabError(f"unknown scheduler {spec['scheduler']!r}; one of {', '.join(SCHEDULERS)}")
                cls = getattr(diffusers, SCHEDULERS[spec["scheduler"]])
                pipe.scheduler = cls.from_config(pipe.scheduler.config)
            if spec.get("adapter"):
                from difflab.adapters import apply_adapters
                apply_adapters(pipe, list(spec["adapter"]))
            prompts = [r.get("caption", r.get("prompt", "")) or "a shape" for r in recs]
            images, records = generate_images(pipe, prompts, 1, spec.get("seed", 0), spec.get("steps", DEFAULT_STEPS),
                                              spec.get("guidance", DEFAULT_GUIDANCE), progress=progress,
                                              size=spec.get("size"))
        size = load_folder_images(real, recs[:1])[0].size
        images = [im.resize(size, 3) if im.size != size else im for im in images]   # 3 = bicubic
        save_images(images, records, tmp, extra={"generator": spec})
    return out


def read_stream_config(path: str | Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DifflabError(f"cannot read stream config {path}: {e}") from e
    gens = cfg.get("generators")
    if not isinstance(gens, list) or len(gens) < 2:
        raise DifflabError(f"{path}: \"generators\" must list at least two generators in release order")
    for g in gens:
        if not isinstance(g, dict) or "name" not in g or ("folder" in g) == ("make" in g):
            raise DifflabError(f"{path}: each generator needs a \"name\" and either \"folder\" or \"make\": {g}")
    names = [g["name"] for g in gens]
    if len(set(names)) != len(names):
        raise DifflabError(f"{path}: generator names repeat: {names}")
    if "real" not in cfg:
        raise DifflabError(f"{path}: no \"real\" (a folder, or {{\"world\": {{\"n\": N, \"seed\": S}}}})")
    return cfg


def heatmap(ap: list[list[float]], rows: list[str], cols: list[str], path: Path, title: str = "AP") -> Path:
    """The AP matrix as a PNG: one cell per (trained through row, tested on column), value printed, colour from
    red (the matrix's lowest value rounded down to 0.05, at most 0.5 = chance) to green (1.0); diagonal outlined."""
    from PIL import Image, ImageDraw
    finite = [v for row in ap for v in row if v == v]
    lo = max(0.5, np.floor(min(finite, default=0.5) * 20) / 20)
    lo = min(lo, 0.95)
    cell, left, top = 56, 110, 70
    w, h = left + cell * len(cols) + 10, top + cell * len(rows) + 10
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.text((left, 8), f"{title}: rows trained through, columns tested on", fill="black")
    d.text((left, 24), f"colour: red {lo:.2f} -> green 1.00", fill="black")
    for j, c in enumerate(cols):
        d.text((left + j * cell + 4, top - 22), c[:9], fill="black")
    for i, r in enumerate(rows):
        d.text((6, top + i * cell + cell // 2 - 6), r[:16], fill="black")
        for j in range(len(cols)):
            v = ap[i][j]
            t = float(np.clip((v - lo) / (1 - lo), 0, 1)) if v == v else 0.0
            color = (int(230 - 180 * t), int(70 + 150 * t), 80)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=color,
                        outline="black" if i == j else None, width=2)
            d.text((x0 + 12, y0 + cell // 2 - 6), f"{v:.3f}", fill="black")
    im.save(path)
    return path


def run_stream(config: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Train on generator 1, then update on each next one in order; after each step test on all of them.
    Writes OUT/ap_matrix.json ({"generators", "ap"}), OUT/ap_matrix.png, OUT/metrics.json, the generated data
    (OUT/data/<name>) and the detector after each step (OUT/steps/<i>-<name>)."""
    from difflab.core.runs import atomic_write_json, output_folder, write_metrics
    from difflab.detect.image import DetectConfig, evaluate, load_sources, train_detector, update_detector
    from difflab.detect.model import load_detector
    cfg = read_stream_config(config)
    base = Path(config).resolve().parent
    gens = cfg["generators"]
    dcfg = DetectConfig.from_dict({**cfg.get("train", {}), "progress": progress})
    with output_folder(Path(out)) as tmp:
        real = cfg["real"]
        if isinstance(real, dict):
            from difflab.world import sample_folder
            w = real.get("world", {})
            real = sample_folder(tmp / "data" / "real", n=w.get("n", 1000), seed=w.get("seed", 7000))
        else:
            real = (base / real).resolve()
        folders = []
        for g in gens:
            if "folder" in g:
                folders.append((base / g["folder"]).resolve())
            else:
                folders.append(make_generator(g["make"], Path(real), tmp / "data" / g["name"], progress))
        ap, steps = [], []
        reals = None
        for i, (g, folder) in enumerate(zip(gens, folders)):
            step_dir = tmp / "steps" / f"{i}-{g['name']}"
            if i == 0:
                train_detector([real], [folder], step_dir, dcfg)
            else:
                update_detector(steps[-1], [folder], step_dir, steps=cfg.get("update_steps", dcfg.steps // 2),
                                    progress=progress)
            steps.append(step_dir)
            model, mc = load_detector(step_dir, kind="image")
            if reals is None:
                taken: set[str] = set()
                reals = load_sources([real], 0, mc["load_size"], taken)
                fakes = load_sources(folders, 1, mc["load_size"], taken)
            res = evaluate(model, reals, fakes, mc["crop_size"], "test")
            ap.append([res["per_fake"][s.name]["ap"] for s in fakes])
        names = [g["name"] for g in gens]
        atomic_write_json(tmp / "ap_matrix.json", {"generators": names, "ap": ap})
        heatmap(ap, names, names, tmp / "ap_matrix.png")
        n = len(names)
        lifts = [ap[i][i] - ap[i - 1][i] for i in range(1, n)]
        drops = [max(ap[i - 1][j] - ap[i][j] for j in range(i)) for i in range(1, n)]
        metrics = {"generators": names, "ap": ap,
                   "update_lift": dict(zip(names[1:], lifts)), "update_max_drop_on_earlier": dict(zip(names[1:], drops)),
                   "mean_ap_seen": float(np.mean([ap[i][j] for i in range(n) for j in range(i + 1)])),
                   "mean_ap_unseen": float(np.mean([ap[i][j] for i in range(n) for j in range(i + 1, n)]))}
        return write_metrics(tmp, metrics)
