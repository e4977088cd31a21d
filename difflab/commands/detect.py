"""`difflab detect`: argument parsing and printing only; every command is one call into `difflab.detect`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from difflab.cli import _Group, main


# --- detect --------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def detect():
    """Detect generated images: image-level, online as generators arrive, and pixel-level (inpainted regions).

    Any folder of images works (png, jpg, webp, ...; searched recursively). Grayscale, palette and RGBA images
    become RGB (alpha on white); every image is resized so its shorter side is the run's load size and
    centre-cropped square. A folder without images or a file that does not decode stops the command.
    Each folder is split by file name: 70 % train, 10 % val (threshold calibration), 20 % test (every figure).
    """


@detect.command("train")
@click.option("--real", "real", multiple=True, required=True, type=click.Path(path_type=Path), help="Real images (repeatable).")
@click.option("--fake", "fake", multiple=True, required=True, type=click.Path(path_type=Path), help="Generated images, one folder per generator (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--backbone", default="cnn", show_default=True,
              help='"cnn" (built-in, trained end to end), or a frozen backbone with a linear probe: "shapes-clip", '
                   "a transformers CLIP/DINO folder or hub id (UniversalFakeDetect).")
@click.option("--tune", type=click.Choice(["probe", "full"]), default="probe", show_default=True,
              help="For a named backbone: frozen + linear probe, or every weight trained (CNNDetection).")
@click.option("--steps", type=click.IntRange(1), default=600, show_default=True)
@click.option("--batch-size", type=click.IntRange(2), default=64, show_default=True, help="Half real, half fake.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--blur-prob", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Gaussian blur probability (sigma ~ U[0, 3] at 256 px, scaled to the image).")
@click.option("--jpeg-prob", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="JPEG probability (quality ~ U{30..100}).")
@click.option("--crop-size", type=click.IntRange(8), default=None, help="Model input (default: the backbone's; 32 for cnn).")
@click.option("--load-size", type=click.IntRange(8), default=None, help="Resize to this before the crop (default: 256/224 of the crop, or the crop for small images).")
@click.option("--seed", type=int, default=0, show_default=True)
def detect_train(real, fake, out, backbone, tune, steps, batch_size, lr, blur_prob, jpeg_prob, crop_size, load_size, seed):
    """Train an image-level detector. OUT gets the detector, config.json and metrics.json
    ({"ap", "acc", "acc_best", "acc_calibrated", "per_fake": {FOLDER: {"ap", ...}}} on the test split)."""
    from difflab.detect import AugmentConfig, DetectConfig, train_detector
    cfg = DetectConfig(backbone=backbone, tune=tune, steps=steps, batch_size=batch_size, lr=lr, seed=seed, crop_size=crop_size,
                       load_size=load_size, augment=AugmentConfig(blur_prob=blur_prob, jpeg_prob=jpeg_prob))
    click.echo(json.dumps(train_detector(list(real), list(fake), out, cfg), indent=2))


@detect.command("update")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--fake", "fake", multiple=True, required=True, type=click.Path(path_type=Path), help="The new generator's images.")
@click.option("--real", "real", multiple=True, type=click.Path(path_type=Path), help="More real images (optional).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Default: the run's training steps.")
@click.option("--no-replay", is_flag=True, help="Train on the new folders only (forgets; for comparison).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: replace RUN (atomically).")
def detect_update(run, fake, real, steps, no_replay, out):
    """Continue RUN on a new generator, replaying the folders it was trained on (half of each fake batch new,
    half replay). Writes metrics.json on every folder's test split."""
    from difflab.detect import update_detector
    click.echo(json.dumps(update_detector(run, list(fake), out, list(real), steps, replay=not no_replay), indent=2))


@detect.command("score")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def detect_score(run, images):
    """Print one JSON line per image (folders are expanded): {"file", "p_fake", "fake"} at the run's
    calibrated threshold."""
    from difflab.detect import score_images
    for r in score_images(run, list(images)):
        click.echo(json.dumps(r))


@detect.command("stream")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True,
              help="JSON: real, generators in release order, train settings (see difflab.detect.stream).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def detect_stream(config, out):
    """The online protocol: train on generator 1, update on each next one, test on all after each step.
    Writes ap_matrix.json {"generators", "ap"}, ap_matrix.png and metrics.json."""
    from difflab.detect import run_stream
    click.echo(json.dumps(run_stream(config, out), indent=2))


@detect.command("inpaint")
@click.option("--model", default="shapes", show_default=True, help='"shapes", a diffusers folder, or a hub id.')
@click.option("--real", type=click.Path(path_type=Path), required=True, help="Images to inpaint (captions from metadata.jsonl).")
@click.option("--n", "n", type=click.IntRange(1), default=None, help="Only the first N images.")
@click.option("--steps", type=click.IntRange(1), default=25, show_default=True)
@click.option("--guidance", type=float, default=5.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def detect_inpaint(model, real, n, steps, guidance, seed, out):
    """Make pixel-level training data: a random 15-35 % stroke/box mask per image, inpainted, original pixels
    pasted back outside it. OUT gets N.png, N.mask.png and metadata.jsonl."""
    from difflab.detect.pixel import make_inpainted
    make_inpainted(model, real, out, n=n, seed=seed, steps=steps, guidance=guidance)
    click.echo(f"wrote inpainted images and masks to {out}")


@detect.command("train-pixel")
@click.option("--inpainted", multiple=True, type=click.Path(path_type=Path), help="Folders from `detect inpaint`.")
@click.option("--real", multiple=True, type=click.Path(path_type=Path), help="Whole real images (empty masks; CutMix source).")
@click.option("--cutmix-fake", multiple=True, type=click.Path(path_type=Path), help="Whole generated images for CutMix.")
@click.option("--steps", type=click.IntRange(1), default=3000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def detect_train_pixel(inpainted, real, cutmix_fake, steps, batch_size, lr, seed, out):
    """Train the pixel-level detector (FCN, weighted Dice loss). metrics.json: {"pixel_ap", "iou"} on the
    inpainted folders' test split."""
    from difflab.detect.pixel import PixelConfig, train_pixel_detector
    cfg = PixelConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    click.echo(json.dumps(train_pixel_detector(list(inpainted), out, cfg, list(real), list(cutmix_fake)), indent=2))


@detect.command("localize")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: IMAGE.overlay.png.")
def detect_localize(run, image, out):
    """Write the predicted inpainted region of IMAGE as an overlay (tinted red, beside the probability map)."""
    from difflab.detect.pixel import localize
    click.echo(json.dumps(localize(run, image, out)))
