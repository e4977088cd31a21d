"""Install trained shapes models into the package and write their model card with measured scores."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from difflab.core.runs import atomic_write_json
from difflab.models import WEIGHTS


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, 1 thread per training process"


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def install_and_card(work: Path, command: str, n: int = 8, dest: Path = WEIGHTS) -> dict:
    """Assemble the pipeline from `work` into `dest`, judge it and write MODEL_CARD.md + scores.json."""
    from difflab.models import load_oracle, load_pipeline
    from difflab.world.evaluate import BARS, evaluate, headline
    from difflab.world.train import assemble
    work = Path(work)
    assemble(work, dest)
    pipe = load_pipeline("shapes")
    res = evaluate(pipe, load_oracle(), n=n, progress=True)
    res.pop("_images")
    head = headline(res)
    report = json.loads((work / "train_report.json").read_text())
    scores = {"headline": head, "by_set": res, "train": report, "size_mb": round(folder_size_mb(dest), 1),
              "evaluated_with": f"{n} images per prompt, DDIM 25 steps, guidance 5, seeds 10000+"}
    atomic_write_json(dest / "scores.json", scores)
    rows = "\n".join(f"| {k} | {head[k]:.3f} | {op} {bar} |" for k, (op, bar) in BARS.items())
    stages = "\n".join(f"| {s} | {r['steps']} | {r['seconds'] / 60:.1f} min |" for s, r in report.items())
    mins = {s: r["seconds"] / 60 for s, r in report.items()}
    total = sum(mins.values())
    critical = max(mins.get("vae", 0), mins.get("oracle", 0) + mins.get("clip", 0)) + mins.get("unet", 0)
    def accuracies(stage: str) -> str:   # "shape 1.0000, color ..." from the stage's <stage>_acc_<factor> entries
        prefix = f"{stage}_acc_"
        return ", ".join(f"{k.removeprefix(prefix)} {v:.4f}" for k, v in report.get(stage, {}).items()
                         if k.startswith(prefix))
    oracle_acc, tagger_acc = accuracies("oracle"), accuracies("tagger")
    card = f"""# The shapes world models

Trained from scratch by difflab's own code on the shapes world's fixed training set
(`difflab.world.training_set()`: 60,000 images, seed 0). Everything here is reproducible from the command.

- **Command:** `{command}`
- **Seeds:** training set 0, VAE 0, oracle 1, CLIP 2, UNet 3, decoder 4, tagger 5 (`difflab/world/train.py`)
- **Hardware:** {_hardware()}
- **Written:** {time.strftime('%Y-%m-%d')}; {scores['size_mb']} MB in all

| stage | steps | time |
|---|---|---|
{stages}

Stages ran two at a time, one core each, beside development work on the same machine (so the times are upper
bounds). One core alone needs the sum of the rows, {total:.0f} min; two cores scheduled as vae beside oracle then
clip, then unet beside the decoder fine-tune, need max(vae, oracle + clip) + unet = {critical:.0f} min.

## Parts
- `pipeline/`: a `diffusers.StableDiffusionPipeline`: AutoencoderKL (32x32x3 <-> 8x8x4),
  UNet2DConditionModel (32, 64, 64), the text tower of the shapes CLIP below as a frozen CLIPTextModel
  (3 layers, hidden 64; as Stable Diffusion conditions on a frozen CLIP), a CLIP BPE tokenizer with a small
  vocabulary, DDIM (cosine schedule, leading spacing). VAE PSNR on 1,000 fresh images
  (held-out values included): {report.get('vae', {}).get('vae_psnr_db', float('nan')):.1f} dB after VAE training,
  {report.get('decoder', {}).get('vae_psnr_db_after_decoder', float('nan')):.1f} dB after the decoder fine-tune.
- `oracle/`: a CNN reading all six factors. Accuracy on 5,000 fresh procedural images: {oracle_acc}.
- `clip/`: a tiny `transformers.CLIPModel` (ViT 4x4 patches, 4 layers; text 3 layers) trained contrastively on
  the training set, the offline feature extractor of later methods.
- `tagger/`: the oracle's network trained on the training set's captions only (a factor counts where the caption
  names it; held-out values have no class): an attribution encoder ("shapes-tagger"). Accuracy on the trained
  values of 5,000 fresh images: {tagger_acc}.

## Oracle-judged quality ({scores['evaluated_with']})

| measure | value | bar |
|---|---|---|
{rows}

`heldout.shape` is how often the model draws a held-out shape (heart, moon) when a prompt names it: the model
can draw them (they are in its training images under generic captions) but no word asks for them.
"""
    (dest / "MODEL_CARD.md").write_text(card)
    return {"headline": head, "size_mb": scores["size_mb"], "train_minutes_one_core": round(total, 1),
            "train_minutes_two_cores": round(critical, 1)}
