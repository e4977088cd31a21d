"""generate: prompts -> a folder of PNGs and metadata.jsonl, deterministic in the seed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from difflab.errors import DifflabError

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0   # 3-7 give the best oracle scores on the shapes model; 1 is much worse


def check_prompts(prompts: list[str]) -> list[str]:
    if not prompts:
        raise DifflabError("no prompt given: pass --prompt TEXT or --prompts-file FILE")
    for p in prompts:
        if not p or not p.strip():
            raise DifflabError("a prompt is empty; every prompt needs some text")
    return prompts


@torch.no_grad()
def generate_images(pipe, prompts: list[str], n: int = 1, seed: int = 0, steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, batch_size: int = 16, progress: bool = True,
                    cross_attention_kwargs: dict | None = None, size: int | None = None,
                    pipe_kwargs: dict | None = None):
    """n images per prompt. Image k (counting over prompts, then repeats) uses seed + k, so any one image can be
    regenerated alone. `size` generates at size x size instead of the model's default; `pipe_kwargs` go to the pipeline call
    (e.g. a callback_on_step_end). Returns (images, records)."""
    from tqdm.auto import tqdm
    check_prompts(prompts)
    jobs = [(p, seed + k) for k, p in enumerate(p for p in prompts for _ in range(n))]
    images, records = [], []
    for i in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress, unit="batch"):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
        kw = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}
        if size:
            kw.update(height=size, width=size)
        kw.update(pipe_kwargs or {})
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, **kw)
        for (p, s), im in zip(chunk, out.images):
            records.append({"file": f"{len(images):06d}.png", "prompt": p, "seed": s, "steps": steps,
                            "guidance": guidance})
            images.append(im)
    return images, records


def save_images(images, records: list[dict], folder: Path, extra: dict | None = None) -> None:
    folder = Path(folder)
    with open(folder / "metadata.jsonl", "w") as fh:
        for im, rec in zip(images, records):
            im.save(folder / rec["file"])
            fh.write(json.dumps({**rec, **(extra or {})}) + "\n")


def generate(prompts: list[str], out: str | Path, model="shapes", n: int = 1, seed: int = 0,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, adapters: list[str] = (),
             device=None, progress: bool = True, sliders: list[str] = (), slider_start: int = 0,
             diverse: str | Path | None = None, diverse_k: int = 2, diverse_scale: float = 2.0) -> Path:
    """Generate n images per prompt into the folder `out` (written atomically). `model` is a name/path or a
    loaded pipeline; `adapters` are "DIR[:SCALE]" specs; `sliders` too, applied from step `slider_start` on.
    `diverse` is a SliderSpace run: each image gets its own random sparse composition of its sliders
    (`diverse_k` sliders, scales ~ U[-diverse_scale, diverse_scale]), recorded in metadata.jsonl."""
    from difflab.adapters import apply_adapters
    from difflab.core.runs import atomic_write_json, output_folder
    from difflab.models import load_pipeline
    check_prompts(list(prompts))
    pipe = load_pipeline(model, device=device) if isinstance(model, (str, Path)) else model
    fixed = apply_adapters(pipe, list(adapters)) if adapters else ([], [])
    kw = {}
    if sliders:
        from difflab.sliders.lora import delayed_start, load_sliders
        names, scales = load_sliders(pipe, list(sliders))
        kw = delayed_start(pipe, names, scales, slider_start, fixed)
    if diverse is not None:
        from difflab.sliders import slider_folders
        from difflab.sliders.evaluate import generate_diverse
        from difflab.sliders.lora import load_sliders
        folders = slider_folders(diverse)
        names, _ = load_sliders(pipe, [str(f) for f in folders], prefix="diverse")
        images, records = [], []
        for j, p in enumerate(prompts):
            imgs, w = generate_diverse(pipe, names, p, n, seed + j * n, diverse_k, diverse_scale, slider_start, fixed)
            for i, im in enumerate(imgs):
                records.append({"file": f"{len(images):06d}.png", "prompt": p, "seed": seed + j * n + i, "steps": steps,
                                "guidance": guidance,
                                "sliders": {f.name: round(float(x), 4) for f, x in zip(folders, w[i]) if x}})
                images.append(im)
    else:
        images, records = generate_images(pipe, list(prompts), n, seed, steps, guidance, progress=progress,
                                          pipe_kwargs=kw)
    with output_folder(Path(out)) as tmp:
        save_images(images, records, tmp, extra={"model": str(model) if isinstance(model, (str, Path)) else None})
        atomic_write_json(tmp / "config.json", {"model": str(model), "prompts": list(prompts), "n": n,
                                                 "seed": seed, "steps": steps, "guidance": guidance,
                                                 "adapters": list(adapters), "sliders": list(sliders),
                                                 "slider_start": slider_start,
                                                 "diverse": str(diverse) if diverse else None,
                                                 "diverse_k": diverse_k, "diverse_scale": diverse_scale})
    return Path(out)
