"""Image folders for detection: any images in, fixed-size RGB arrays out; splits; blur/JPEG augmentation.

Input handling, as documented in `difflab detect --help`: every file with an image extension under a folder
(recursively, sorted; `*.mask.png` files are masks, not images) is read; grayscale, palette and RGBA images become RGB (alpha composited on white);
images of any size are resized so the shorter side is `load_size` (bicubic) and centre-cropped to a square.
A folder with no images or a file that does not decode is an error, never a silent skip.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from difflab.errors import DifflabError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SPLITS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}   # fractions of each folder, by file name


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DifflabError(f"{folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and ".difflab-cache" not in p.parts and not p.name.endswith(".mask.png"))
    if not files:
        raise DifflabError(f"{folder} has no images ({', '.join(sorted(IMAGE_EXTS))})")
    return files


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (an RGBA fake must not become a black-background one)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def resize_square(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the centre square."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return im.crop((left, top, left + size, top + size))


def read_image(path: str | Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8; an unreadable file is a DifflabError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(resize_square(to_rgb(im), size), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DifflabError(f"cannot read image {path}: {e}") from e


def read_folder(folder: str | Path, size: int) -> tuple[np.ndarray, list[str]]:
    """All images of a folder as (N, size, size, 3) uint8 and their paths."""
    files = list_images(folder)
    return np.stack([read_image(f, size) for f in files]), [str(f) for f in files]


def split_of(path: str | Path, seed: int = 0) -> str:
    """A file's split, from a hash of its name: stable when files are added, the same in every run."""
    h = int(hashlib.sha256(f"{seed}:{Path(path).name}".encode()).hexdigest()[:8], 16) / 16 ** 8
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= h < hi)


def split_mask(paths: list[str], split: str | None, seed: int = 0) -> np.ndarray:
    if split is None:
        return np.ones(len(paths), bool)
    return np.array([split_of(p, seed) == split for p in paths])


@dataclass
class AugmentConfig:
    """CNNDetection's `data_augment` (blur, then JPEG), applied after the resize and before the crop.

    The blur's sigma range is stated for 256-pixel images, as in the paper (U[0, 3] at 256 px), and scaled with
    the image's width: at the shapes world's 32 pixels sigma 3 would erase the whole image. The 0.1 presets
    are CNNDetection's `blur_jpg_prob0.1` model, which the authors find best in distribution.
    """
    blur_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = 0.1
    jpeg_quality: tuple[int, int] = (30, 100)
    sigma_ref_size: int = 256
    flip: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def blur(im: Image.Image, sigma: float, ref_size: int = 256) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(sigma * im.width / ref_size)) if sigma > 0 else im


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def augment(arr: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """One (H, W, 3) uint8 image through blur (p, sigma ~ U) then JPEG (p, quality ~ U{lo..hi})."""
    if cfg.blur_prob <= 0 and cfg.jpeg_prob <= 0:
        return arr
    im = Image.fromarray(arr)
    if rng.random() < cfg.blur_prob:
        im = blur(im, rng.uniform(*cfg.blur_sigma), cfg.sigma_ref_size)
    if rng.random() < cfg.jpeg_prob:
        im = jpeg(im, rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    return np.asarray(im)


def crop(arr: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A random (training, rng given) or centre (evaluation) size x size crop."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    return arr[top:top + size, left:left + size]
