"""Custom Diffusion training step: difflab against diffusers' example script, same model, data and settings.

    python benchmarks/bench_customize_peer.py --peer-python PEER_VENV/bin/python \
        --peer-script train_custom_diffusion.py [--threads 2] [--repeats 3] [--out bench-peer]

The peer is `examples/custom_diffusion/train_custom_diffusion.py` from diffusers' repository; it needs torchvision,
so it runs in a venv of its own (e.g. `pip install torch==2.14.1 torchvision==0.29.1 diffusers transformers
accelerate`). Run this script with that venv's python too (difflab installed there with `pip install --no-deps -e .`
plus peft/click/scipy/tqdm) so that both sides use the same torch build.

Both train the shipped shapes pipeline on the same 8 held-out-shape images and the same 64 class images, with
batch 4 instance + 4 class, K/V + one modifier token, prior preservation, augmentation on, fp32. Time per step is
the difference between a long and a short run divided by the extra steps (start-up cancels), median of repeats,
each pair measured back to back.

On a GPU (both trainers run on accelerate's device, cuda) difflab is timed twice: as it runs by default (the
UNet's forward and backward replayed as CUDA graphs, core/graphs.py) and eagerly (`cuda_graphs=False`), e.g.

    python benchmarks/bench_customize_peer.py --peer-python python3 --peer-script train_custom_diffusion.py \
        --threads 8 --repeats 2 --short 50 --long 350   # (the H100 figures in docs/BENCHMARKS.md)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def peer_seconds(a, steps: int, inst: Path, cls: Path, out: Path) -> float:
    from difflab.models import WEIGHTS
    cmd = [a.peer_python, a.peer_script, "--pretrained_model_name_or_path", str(WEIGHTS / "pipeline"),
           "--instance_data_dir", str(inst), "--class_data_dir", str(cls), "--with_prior_preservation",
           "--class_prompt", "a shape", "--instance_prompt", "a <new1> shape", "--num_class_images", "64",
           "--modifier_token", "<new1>", "--initializer_token", "ktn", "--resolution", "32",
           "--train_batch_size", "4", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
           "--max_train_steps", str(steps), "--checkpointing_steps", "100000", "--output_dir", str(out),
           "--seed", "0", "--dataloader_num_workers", "0", "--mixed_precision", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("peer failed:\n" + r.stderr[-3000:])
    return time.perf_counter() - t


def difflab_seconds(steps: int, inst: Path, work: Path, cuda_graphs: bool = True) -> float:
    from difflab.customize import Concept, CustomizeConfig, train_concepts
    from difflab.models import load_pipeline
    pipe = load_pipeline("shapes")
    cfg = CustomizeConfig(steps=steps, batch_size=4, num_class_images=64, progress=False, cuda_graphs=cuda_graphs)
    t = time.perf_counter()
    train_concepts(pipe, [Concept(str(inst))], cfg, work=work)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--peer-script", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-peer"))
    # the peer's start-up varies by seconds: the difference needs many steps
    ap.add_argument("--short", type=int, default=20, help="steps of the short run")
    ap.add_argument("--long", type=int, default=220, help="steps of the long run")
    a = ap.parse_args()
    SHORT, LONG = a.short, a.long
    import torch

    from difflab.customize import CustomizeConfig, class_latents
    from difflab.models import load_pipeline
    from difflab.world.dataset import sample, write_folder
    torch.set_num_threads(a.threads)
    inst, cls, work = a.out / "instance", a.out / "class", a.out / "work"
    if not inst.exists():
        inst.mkdir(parents=True)
        write_folder(sample(8, seed=123, include_heldout=True, where={"shape": "heart"}), inst)
        (inst / "metadata.jsonl").unlink()   # the peer opens every file of the folder as an image
    if not cls.exists():   # the same class images for both: what difflab would generate, as PNGs for the peer
        from difflab.generate import generate_images
        images, _ = generate_images(load_pipeline("shapes"), ["a shape"], n=64, seed=1_000_000, progress=False)
        cls.mkdir(parents=True)
        for i, im in enumerate(images):
            im.save(cls / f"{i:03d}.png")
    class_latents(load_pipeline("shapes"), ["a shape"], 64, CustomizeConfig(), work / "class" / "0.safetensors")
    gpu = torch.cuda.is_available()
    runs = {"peer": lambda s, tmp: peer_seconds(a, s, inst, cls, Path(tmp) / f"p{s}"),
            "difflab": lambda s, tmp: difflab_seconds(s, inst, work)}
    if gpu:
        runs["difflab, eager UNet"] = lambda s, tmp: difflab_seconds(s, inst, work, cuda_graphs=False)
    per = {k: [] for k in runs}
    for r in range(a.repeats):
        for k, fn in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                t = [fn(s, tmp) for s in (SHORT, LONG)]
            per[k].append((t[1] - t[0]) / (LONG - SHORT))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms/step" for k, v in per.items()), flush=True)
    med = {k: statistics.median(v) for k, v in per.items()}
    device = torch.cuda.get_device_name() if gpu else f"CPU, {a.threads} threads"
    print(f"\n{device}, torch {torch.__version__}, batch 4 + 4 class, 32 px, K/V + token, "
          f"{LONG} - {SHORT} steps, median of {a.repeats}\n")
    print("| trainer | ms / step | ratio |\n|---|---|---|")
    print(f"| diffusers train_custom_diffusion.py | {med['peer'] * 1e3:.1f} | 1.00 |")
    for k in runs:
        if k != "peer":
            print(f"| {k} | {med[k] * 1e3:.1f} | {med[k] / med['peer']:.2f} |")
    (a.out / "results.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                    "steps": [SHORT, LONG], "per_repeat_s": per, "median_s": med,
                                                    "ratio": {k: med[k] / med["peer"] for k in runs}}, indent=2))


if __name__ == "__main__":
    main()
