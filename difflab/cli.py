"""`difflab <command>`: argument parsing and printing only. Every command is one call into the Python API."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The CLI prints what matters itself; library chatter (torchvision fallbacks, hub retries) buries it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import click

from difflab.errors import DifflabError


class _Group(click.Group):
    """Turns a DifflabError anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DifflabError as e:
            click.echo(f"difflab: error: {e}", err=True)
            ctx.exit(2)


def _lines(path: Path | None, option: str) -> list[str]:
    """The non-empty lines of a text file given to `option` (none without a file); unreadable: one clear line."""
    if not path:
        return []
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DifflabError(f"cannot read {option} {path}: {e.strerror}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="difflab")
def main():
    """difflab: research methods for text-to-image diffusion models.

    Every command works offline on the built-in shapes world (a procedural dataset, a tiny Stable Diffusion
    model and an oracle that knows the truth of every image) and on real Stable Diffusion checkpoints
    (hub id or local diffusers folder). Start with `difflab tour --out tour`.
    """
    from difflab.models import quiet_loading
    quiet_loading()   # per-component "Loading weights" bars would bury the one line (or JSON) a command prints


# --- world --------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def world():
    """The shapes world: sample captioned images, describe its factors, train its models."""


@world.command("sample")
@click.option("--n", "n", type=click.IntRange(1), required=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder (PNGs + metadata.jsonl).")
@click.option("--include-heldout", is_flag=True, help="Draw held-out values too and name them in captions.")
@click.option("--where", multiple=True, metavar="FACTOR=VALUE", help="Fix a factor, e.g. --where shape=heart.")
def world_sample(n, seed, out, include_heldout, where):
    """Write N procedural images with captions at varied detail and their true factors."""
    from difflab.world import sample_folder
    sample_folder(out, n=n, seed=seed, include_heldout=include_heldout, where=list(where))
    click.echo(f"wrote {n} images and metadata.jsonl to {out}")


@world.command("captions")
@click.option("--n", "n", type=click.IntRange(1), required=True, help="Number of distinct captions.")
@click.option("--seed", type=int, default=0, show_default=True)
def world_captions(n, seed):
    """Print N distinct captions of the base training kind, one per line (e.g. for customize --reg-prompts)."""
    from difflab.world.dataset import captions
    click.echo("\n".join(captions(n, seed)))


@world.command("info")
def world_info():
    """Print the world's factors (trained and held-out values) and resolution as JSON."""
    from difflab.world import info
    click.echo(json.dumps(info(), indent=2))


@world.command("train")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Work folder (checkpoints, logs).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["vae", "oracle", "clip", "unet", "decoder", "tagger"]),
              help="Run only these stages (default: all, in order). vae||oracle, unet||clip and unet||decoder "
                   "(once the unet stage has cached its latents) can run side by side.")
@click.option("--steps", multiple=True, metavar="STAGE=N", help="Override a stage's steps, e.g. --steps unet=9000.")
@click.option("--install", is_flag=True, help="Copy the result into difflab's shipped weights and judge it.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
def world_train(out, stages, steps, install, threads):
    """Train the shapes world's models from scratch (resumes from the last checkpoint in --out).

    Stages already finished in --out are skipped, so `--install` after stages run side by side only installs:
    it assembles the pipeline into difflab's shipped weights, judges it and writes the model card.
    """
    import torch

    from difflab.world import train as T
    if threads:
        torch.set_num_threads(threads)
    try:
        overrides = {k: int(v) for k, v in (s.split("=", 1) for s in steps)}
    except ValueError:
        raise DifflabError("--steps expects STAGE=N, e.g. --steps unet=9000")
    report = T.run(out, stages or T.STAGES, overrides)
    click.echo(json.dumps(report, indent=2))
    if install:
        from difflab.world.card import install_and_card
        click.echo(json.dumps(install_and_card(out, command=" ".join(["difflab"] + sys.argv[1:])), indent=2))


# --- judge ---------------------------------------------------------------------------------------------------
@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--alias", multiple=True, metavar="TOKEN=VALUE", help='Map a token to a world value, e.g. "<new1>=heart".')
def judge(folder, alias):
    """Judge FOLDER's images with the oracle against the factors their prompts name.

    Writes FOLDER/judge.json (accuracy per factor, joint accuracy, rate of each value) and FOLDER/judge.jsonl
    (each image's predicted factors), and prints judge.json.
    """
    from difflab.world.oracle import judge_folder, parse_aliases
    click.echo(json.dumps(judge_folder(folder, aliases=parse_aliases(list(alias))), indent=2))


# --- generate ------------------------------------------------------------------------------------------------
@main.command()
@click.option("--model", default="shapes", show_default=True, help='"shapes", a diffusers folder, or a hub id.')
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts-file", type=click.Path(path_type=Path), help="A text file, one prompt a line.")
@click.option("--n", "n", type=click.IntRange(1), default=1, show_default=True, help="Images per prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image k uses seed + k.")
@click.option("--steps", type=click.IntRange(1), default=25, show_default=True, help="Denoising steps.")
@click.option("--guidance", type=float, default=5.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--adapter", "adapters", multiple=True, metavar="DIR[:SCALE]", help="An adapter folder (repeatable).")
@click.option("--slider", "sliders", multiple=True, metavar="DIR[:SCALE]",
              help="A slider folder at a scale, e.g. RUN/slider_3:1.5 (repeatable; scales add).")
@click.option("--slider-start", type=click.IntRange(0), default=0, show_default=True,
              help="Apply the sliders from this denoising step on (earlier steps keep the base layout).")
@click.option("--sliders", "diverse_run", type=click.Path(path_type=Path), default=None,
              help="A `sliders discover` run, for --diverse.")
@click.option("--diverse", is_flag=True, help="Each image gets a random sparse composition of the run's sliders.")
@click.option("--diverse-k", type=click.IntRange(1), default=2, show_default=True, help="Sliders per image.")
@click.option("--diverse-scale", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Scales are drawn from U[-s, s].")
@click.option("--device", default=None, help="torch device (default: cpu).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
def generate(model, prompts, prompts_file, n, seed, steps, guidance, adapters, sliders, slider_start, diverse_run,
             diverse, diverse_k, diverse_scale, device, out):
    """Generate images: OUT gets PNGs and metadata.jsonl (file, prompt, seed, settings)."""
    from difflab.generate import generate as api_generate
    prompts = list(prompts) + _lines(prompts_file, "--prompts-file")
    if diverse != (diverse_run is not None):
        raise DifflabError("--diverse and --sliders RUN go together")
    api_generate(prompts, out, model=model, n=n, seed=seed, steps=steps, guidance=guidance,
                 adapters=list(adapters), device=device, sliders=list(sliders), slider_start=slider_start,
                 diverse=diverse_run, diverse_k=diverse_k, diverse_scale=diverse_scale)
    click.echo(f"wrote {len(prompts) * n} images to {out}")


# --- customize / merge / erase -------------------------------------------------------------------------------
@main.command()
@click.option("--model", default="shapes", show_default=True, help='"shapes", a diffusers folder, or a hub id.')
@click.option("--images", "images", multiple=True, help="A folder of concept images (repeat for joint training).")
@click.option("--token", "tokens", multiple=True, help="Its modifier token, e.g. <new1> (one per --images).")
@click.option("--class-prompt", "class_prompts", multiple=True, help='Its class prompt, e.g. "a shape".')
@click.option("--concepts", "concepts_file", type=click.Path(path_type=Path),
              help='JSON list of {"images", "token", "class_prompt"[, "instance_prompt", "captions"]} instead.')
@click.option("--captions", is_flag=True,
              help="Each image's own caption from its folder's metadata.jsonl as its prompt (each must hold the "
                   "token); default: one prompt, the class prompt with the token.")
@click.option("--steps", type=click.IntRange(1), default=250, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--params", type=click.Choice(["xattn_kv", "xattn"]), default="xattn_kv", show_default=True,
              help="Cross-attention K/V (the paper's default) or all of cross-attention.")
@click.option("--num-class-images", type=click.IntRange(1), default=64, show_default=True)
@click.option("--no-augment", is_flag=True, help="Turn off the random-rescale augmentation.")
@click.option("--token-lr", type=float, default=None,
              help="The modifier token rows' own learning rate (default: --lr, as the paper).")
@click.option("--reg-prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A text file of captions (one per line): half of the class images are made from them, in turn, "
                   "the other half from the class prompt (e.g. `difflab world captions --n 64`).")
@click.option("--feature-reg", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Weight of a penalty on how much K/V change what cross-attention reads from captions without "
                   "a new token (the merge's objective, eq. 4, during training). 0: off, as the paper.")
@click.option("--feature-reg-prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Captions (one per line) for --feature-reg (default: 200 shapes-world captions).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-cuda-graphs", is_flag=True,
              help="On a GPU, run the UNet eagerly instead of replaying its forward and backward as CUDA graphs.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def customize(model, images, tokens, class_prompts, concepts_file, captions, steps, lr, batch_size, params,
              num_class_images, no_augment, token_lr, reg_prompts, feature_reg, feature_reg_prompts, seed,
              no_cuda_graphs, out):
    """Custom Diffusion: teach the model new concepts from a few images (K/V + a modifier token each).

    OUT gets the weights in diffusers' Custom Diffusion format, config.json and metrics.json (on the shapes
    model: the concept's oracle-judged rate, the base model's, and drift). Use it with `difflab generate
    --adapter OUT`.
    """
    from difflab.customize import Concept, CustomizeConfig, customize as run
    if concepts_file:
        try:
            concepts = [Concept(**c) for c in json.loads(Path(concepts_file).read_text())]
        except (OSError, ValueError, TypeError) as e:
            raise DifflabError(f"cannot read --concepts {concepts_file}: {e}")
    else:
        if not images:
            raise DifflabError("give --images DIR (with --token and --class-prompt) or --concepts FILE")
        tokens = list(tokens) or [f"<new{i + 1}>" for i in range(len(images))]
        class_prompts = list(class_prompts) or ["a shape"] * len(images)
        if not len(images) == len(tokens) == len(class_prompts):
            raise DifflabError("give one --token and one --class-prompt per --images")
        concepts = [Concept(str(i), t, c, captions=captions) for i, t, c in zip(images, tokens, class_prompts)]
    reg = _lines(reg_prompts, "--reg-prompts")
    cfg = CustomizeConfig(steps=steps, lr=lr, batch_size=batch_size, params=params, num_class_images=num_class_images,
                          augment=not no_augment, seed=seed, token_lr=token_lr, reg_prompts=reg,
                          feature_reg=feature_reg, cuda_graphs=not no_cuda_graphs,
                          feature_reg_prompts=_lines(feature_reg_prompts, "--feature-reg-prompts"))
    click.echo(json.dumps(run(model, concepts, out, cfg), indent=2))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", default="shapes", show_default=True, help="The base the runs were trained on.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--qo-from", type=click.IntRange(min=1), default=None,
              help="Whose query/output projections to keep when runs trained all of cross-attention (1 = the "
                   "first run; default: the run that changed them most).")
def merge(runs, model, out, qo_from):
    """Merge Custom Diffusion runs trained separately, in closed form (tokens become <new1>, <new2>, ...).

    K/V are solved by the paper's eq. 4. Runs that trained all of cross-attention (--params xattn) merge too: one
    run's q/out are kept (--qo-from) and the other runs' K/V targets are carried into that frame first (in closed
    form, then fitted so that each concept's cross-attention output, on the features its run sees while drawing it,
    stays what its run made of it). Only the changed weights are saved."""
    from difflab.merge import merge_runs
    if len(runs) < 2:
        raise DifflabError("merge needs at least two runs")
    if qo_from is not None and qo_from > len(runs):
        raise DifflabError(f"--qo-from {qo_from}: there are only {len(runs)} runs")
    click.echo(json.dumps(merge_runs(model, list(runs), out,
                                     qo_from=None if qo_from is None else qo_from - 1), indent=2))


@main.command()
@click.option("--model", default="shapes", show_default=True)
@click.option("--target", required=True, help='The concept to remove, e.g. "a star".')
@click.option("--anchor", required=True, help='What it should become, e.g. "a shape".')
@click.option("--anchor-prompts", type=click.Path(path_type=Path), help="A text file of anchor prompts, one a line.")
@click.option("--method", type=click.Choice(["model", "noise"]), default="model", show_default=True)
@click.option("--params", type=click.Choice(["kv", "embedding", "full"]), default="kv", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=200, show_default=True)
@click.option("--lr", type=float, default=2e-5, show_default=True)
@click.option("--reg-weight", type=float, default=0.0, show_default=True, help="Anchor regulariser weight.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def erase(model, target, anchor, anchor_prompts, method, params, steps, lr, reg_weight, seed, out):
    """Concept Ablation: make prompts naming TARGET behave like ANCHOR prompts. OUT loads with --adapter."""
    from difflab.erase import EraseConfig, erase_run
    prompts = _lines(anchor_prompts, "--anchor-prompts") or None
    cfg = EraseConfig(method=method, params=params, steps=steps, lr=lr, reg_weight=reg_weight, seed=seed)
    click.echo(json.dumps(erase_run(model, target, anchor, out, cfg, prompts), indent=2))


# --- sliders -------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def sliders():
    """SliderSpace (discover a prompt's directions of variation) and Concept Sliders (from text), as LoRAs.

    Every slider is a folder that `difflab generate --slider DIR:SCALE` and diffusers' `pipe.load_lora_weights`
    both load.
    """


@sliders.command("discover")
@click.option("--model", default="shapes", show_default=True, help='"shapes", a diffusers folder, or a hub id.')
@click.option("--prompt", "prompts", multiple=True, help="The concept prompt (repeat for prompt variants).")
@click.option("--prompts-file", type=click.Path(path_type=Path), help="More prompt variants, one a line.")
@click.option("--num", "num", type=click.IntRange(1), default=8, show_default=True, help="Sliders (principal directions).")
@click.option("--samples", type=click.IntRange(2), default=512, show_default=True, help="Images for the PCA.")
@click.option("--feature-point", type=click.Choice(["final", "x0"]), default="final", show_default=True,
              help="PCA on final images (official code) or on one-step x0 predictions (paper).")
@click.option("--steps", type=click.IntRange(1), default=600, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--rank", type=click.IntRange(1), default=1, show_default=True)
@click.option("--targets", type=click.Choice(["xattn_kv", "xattn", "noxattn", "attn"]), default="xattn_kv", show_default=True)
@click.option("--init", type=click.Choice(["ortho", "zero"]), default="ortho", show_default=True,
              help="ortho: frozen random B, trained A (official); zero: standard LoRA.")
@click.option("--sliders-per-step", type=click.IntRange(1), default=3, show_default=True)
@click.option("--clip", default="shapes-clip", show_default=True, help="The CLIP image tower (shapes-clip or a transformers CLIP).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def sliders_discover(model, prompts, prompts_file, num, samples, feature_point, steps, lr, rank, targets, init,
                     sliders_per_step, clip, seed, out):
    """Discover NUM sliders for a prompt: OUT/slider_0 .. slider_{NUM-1} (LoRA folders with strip.png),
    contact_sheet.png, pca.safetensors, metrics.json (on the shapes model: what each slider moves)."""
    from difflab.sliders import DiscoverConfig, discover
    prompts = list(prompts) + _lines(prompts_file, "--prompts-file")
    if not prompts:
        raise DifflabError("give --prompt TEXT (or --prompts-file FILE)")
    cfg = DiscoverConfig(num_sliders=num, num_samples=samples, feature_point=feature_point, steps=steps, lr=lr,
                         rank=rank, alpha=float(rank), targets=targets, init=init, sliders_per_step=sliders_per_step,
                         clip=clip, seed=seed)
    click.echo(json.dumps(discover(model, prompts, out, cfg), indent=2))


@sliders.command("text")
@click.option("--model", default="shapes", show_default=True)
@click.option("--target", required=True, help='The prompt the slider acts on, e.g. "a shape".')
@click.option("--positive", required=True, help='Towards this at positive scales, e.g. "a large shape".')
@click.option("--negative", required=True, help='Towards this at negative scales, e.g. "a small shape".')
@click.option("--neutral", default=None, help="Neutral prompt (default: the target).")
@click.option("--eta", type=float, default=2.0, show_default=True, help="Guidance scale of the edit.")
@click.option("--action", type=click.Choice(["enhance", "erase"]), default="enhance", show_default=True)
@click.option("--attributes", default="", help='Preservation set, comma-separated, e.g. "red,green,blue" (inserted '
                                              "before each prompt's last word).")
@click.option("--nouns", default="", help='Preservation set along the subject, comma-separated, e.g. "circle,square" '
                                          "(each replaces the prompts' last word).")
@click.option("--steps", type=click.IntRange(1), default=500, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--rank", type=click.IntRange(1), default=4, show_default=True)
@click.option("--targets", type=click.Choice(["xattn_kv", "xattn", "noxattn", "attn"]), default="noxattn", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def sliders_text(model, target, positive, negative, neutral, eta, action, attributes, nouns, steps, lr, rank, targets,
                 seed, out):
    """Concept Slider from text: OUT is a slider folder (use --slider OUT:SCALE), with strip.png and
    metrics.json (on the shapes model: how the oracle's size follows the scale)."""
    from difflab.sliders import TextSliderConfig, train_text_slider
    cfg = TextSliderConfig(eta=eta, action=action, steps=steps, lr=lr, rank=rank, targets=targets, seed=seed,
                           attributes=tuple(a for a in attributes.split(",") if a.strip()),
                           nouns=tuple(a for a in nouns.split(",") if a.strip()))
    click.echo(json.dumps(train_text_slider(model, target, positive, negative, out, neutral, cfg), indent=2))


@sliders.command("import")
@click.argument("pt_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--model", default="shapes", show_default=True, help="The base model the slider was trained on.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def sliders_import(pt_file, model, out):
    """Convert an official kohya-style slider .pt (lora_down / lora_up / alpha) into a slider folder."""
    from difflab.sliders import import_kohya
    import_kohya(pt_file, out, model)
    click.echo(f"wrote {out}")


# --- score / similarity ------------------------------------------------------------------------------------
@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--metric", type=click.Choice(["clip", "fd", "kid", "diversity"]), required=True)
@click.option("--ref", type=click.Path(path_type=Path), help="Reference folder (fd, kid).")
@click.option("--backbone", default="shapes-clip", show_default=True,
              help="Feature extractor: shapes-clip, or a transformers CLIP/DINO folder or hub id.")
def score(folder, metric, ref, backbone):
    """Score an image folder: CLIP score against its prompts, Frechet distance or KID against --ref on any
    features, or diversity (mean pairwise cosine distance). Prints and writes FOLDER/score-METRIC.json."""
    from difflab.metrics import score_folder
    click.echo(json.dumps(score_folder(folder, metric, ref, backbone), indent=2))


@main.group(cls=_Group)
def similarity():
    """DreamSim: a perceptual distance tuned on 2AFC triplets (NIGHTS layout or the shapes world's)."""


@similarity.command("make-2afc")
@click.option("--n", "n", type=click.IntRange(1), required=True, help="Number of triplets.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--min-gap", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Weighted distances closer than this count as ties and are redrawn.")
def similarity_make_2afc(n, seed, out, min_gap):
    """Write shapes-world triplets (ref, img0, img1) with ground-truth votes in the NIGHTS layout."""
    from difflab.similarity import make_2afc
    make_2afc(out, n, seed, min_gap=min_gap)
    click.echo(f"wrote {n} triplets to {out}")


@similarity.command("score")
@click.argument("img1", type=click.Path(path_type=Path))
@click.argument("img2", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="A tuned DreamSim folder.")
def similarity_score(img1, img2, model_dir):
    """Print the DreamSim distance between two images (0 = same; higher = more different)."""
    from difflab.core.data import load_image
    from difflab.similarity import dreamsim
    model, pre = dreamsim(model_dir=model_dir)
    d = model(pre(load_image(img1)), pre(load_image(img2))).item()
    click.echo(json.dumps({"distance": d}))


@similarity.command("train")
@click.option("--triplets", type=click.Path(path_type=Path), required=True, help="NIGHTS-layout folder.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--backbone", "backbones", multiple=True, default=["shapes-clip"], show_default=True,
              help="Backbones of the ensemble (repeatable).")
@click.option("--mode", type=click.Choice(["lora", "mlp", "full"]), default="lora", show_default=True,
              help="LoRA on the backbones (DreamSim), an MLP head on frozen features, or every backbone weight.")
@click.option("--steps", type=click.IntRange(1), default=1500, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=float, default=8, show_default=True)
@click.option("--lora-dropout", type=float, default=0.3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--world", type=click.IntRange(0), default=0, show_default=True,
              help="Add this many fresh shapes-world triplets (drawn from every world image) to the train split.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--init", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Continue from a full-mode model folder (with --mode full).")
@click.option("--checkpoints", type=click.Path(path_type=Path),
              help="Folder for checkpoints every 500 steps; a rerun with the same folder resumes.")
def similarity_train(triplets, out, backbones, mode, steps, batch_size, lr, lora_r, lora_alpha, lora_dropout, seed,
                     world, lr_schedule, init, checkpoints):
    """Fine-tune DreamSim on the train split (hinge loss, margin 0.05) and report 2AFC on val and test."""
    from difflab.similarity import train_and_save
    res = train_and_save(triplets, out, list(backbones), mode, steps, batch_size, lr,
                         {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout}, seed, world=world,
                         lr_schedule=lr_schedule, init=init, checkpoints=checkpoints)
    click.echo(json.dumps(res, indent=2))


@similarity.command("eval")
@click.option("--triplets", type=click.Path(path_type=Path), required=True)
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="A tuned DreamSim folder.")
@click.option("--baseline", type=click.Choice(["dreamsim", "untuned", "pixel-l2"]), default="dreamsim",
              show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Folder for metrics.json (default: beside --model).")
def similarity_eval(triplets, model_dir, baseline, split, out):
    """2AFC score of a model on a split; prints {"2afc", "n"} and writes metrics.json."""
    from difflab.similarity import eval_and_save
    click.echo(json.dumps(eval_and_save(triplets, model_dir, baseline, split, out), indent=2))


# --- tour ----------------------------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("difflab-tour"), show_default=True)
@click.option("--model", default="shapes", show_default=True)
@click.option("--n", "n", type=click.IntRange(1), default=4, show_default=True, help="Images per prompt.")
@click.option("--seed", type=int, default=1000, show_default=True)
@click.option("--train-steps", type=click.IntRange(0), default=400, show_default=True,
              help="Steps of the customize, erase and detection demos (0 skips them; shapes model only).")
@click.option("--detect-images", type=click.IntRange(0), default=300, show_default=True,
              help="Real images in the detection demo (0 skips it).")
def tour(out, model, n, seed, train_steps, detect_images):
    """The main job: sample the world, generate a prompt grid, judge it, write OUT/report.html."""
    from difflab.tour import run_tour
    metrics = run_tour(out, model=model, n=n, seed=seed, train_steps=train_steps, detect_images=detect_images)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"open {out / 'report.html'}")


# the larger command groups live in difflab/commands/ and register themselves on `main` when imported
from difflab.commands import attribute as _attribute, detect as _detect  # noqa: E402,F401

if __name__ == "__main__":   # python -m difflab.cli: run the imported module's `main`, where the groups registered
    from difflab.cli import main as _entry
    _entry()
