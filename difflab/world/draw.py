"""The shapes world's factors and its renderer: factors -> image, a pure deterministic function.

Every image is one shape on a plain background. Six factors describe it completely, so the oracle can be
trained to recover all of them from pixels and every generated image can be judged against its prompt.
Some values are *held out*: they appear in the base model's training images only under generic captions
("a shape"), so the model can draw them but no word asks for them (what Custom Diffusion has to teach).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RESOLUTION = 32   # pixels; the VAE maps 32x32x3 to 8x8x4 latents
SUPERSAMPLE = 4   # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased but deterministic

# factor -> (trained values, held-out values). Order is the class index order of the oracle.
FACTORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shape": (("circle", "square", "triangle", "star", "cross", "diamond"), ("heart", "moon")),
    "color": (("red", "green", "blue", "yellow", "purple", "orange"), ()),
    "size": (("small", "medium", "large"), ()),
    "position": (("top left", "top center", "top right", "center left", "center", "center right",
                  "bottom left", "bottom center", "bottom right"), ()),
    "background": (("white", "black", "gray"), ()),
    "texture": (("solid", "striped", "outline"), ("dotted",)),
}

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225), "yellow": (235, 205, 40),
          "purple": (145, 60, 195), "orange": (245, 135, 25)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
RADII = {"small": 5.0, "medium": 7.0, "large": 9.5}          # pixels at RESOLUTION
CENTERS = (9.0, 16.0, 23.0)                                   # the 3x3 grid, pixels at RESOLUTION


def values(factor: str, heldout: bool = True) -> tuple[str, ...]:
    """All values of a factor (trained first, then held out), or only the trained ones."""
    trained, held = FACTORS[factor]
    return trained + held if heldout else trained


def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Unit-radius outline of a polygonal shape (y down), or None for shapes drawn otherwise."""
    if shape == "square":
        s = 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a) + 0.15) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.5
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))
        return pts
    if shape == "cross":
        a, b = 0.3, 0.9
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                (-b, -a), (-a, -a)]
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0 + 0.05))
        return pts
    return None


@lru_cache(maxsize=512)
def _mask(shape: str, size: str, position: str) -> np.ndarray:
    """Coverage mask of the shape at SUPERSAMPLE resolution, float32 in [0, 1]."""
    S = RESOLUTION * SUPERSAMPLE
    row, col = divmod(FACTORS["position"][0].index(position), 3)
    cx, cy, r = CENTERS[col] * SUPERSAMPLE, CENTERS[row] * SUPERSAMPLE, RADII[size] * SUPERSAMPLE
    img = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=255)
    elif shape == "moon":   # a crescent: a disc minus an offset disc
        d.ellipse([cx - 0.95 * r, cy - 0.95 * r, cx + 0.95 * r, cy + 0.95 * r], fill=255)
        ox = cx + 0.7 * r
        d.ellipse([ox - 0.7 * r, cy - 0.7 * r, ox + 0.7 * r, cy + 0.7 * r], fill=0)
    else:
        d.polygon([(cx + r * x, cy + r * y) for x, y in _polygon(shape)], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


@lru_cache(maxsize=512)
def _inner(shape: str, size: str, position: str) -> np.ndarray:
    """The mask eroded by 1 px: what is left inside an outline."""
    m = Image.fromarray((_mask(shape, size, position) * 255).astype(np.uint8))
    return np.asarray(m.filter(ImageFilter.MinFilter(2 * SUPERSAMPLE + 1)), np.float32) / 255


@lru_cache(maxsize=64)
def _pattern(texture: str, size: str, position: str) -> np.ndarray:
    """Where the colour goes inside the mask (1) and where the background shows (0), anchored at the shape."""
    S = RESOLUTION * SUPERSAMPLE
    row, col = divmod(FACTORS["position"][0].index(position), 3)
    cx, cy = CENTERS[col] * SUPERSAMPLE, CENTERS[row] * SUPERSAMPLE
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    if texture == "striped":   # diagonal stripes, period 4 px, a stripe through the centre
        period = 4.0 * SUPERSAMPLE
        phase = ((xx - cx) + (yy - cy)) / math.sqrt(2) / period
        return (np.abs(phase - np.round(phase)) < 0.22).astype(np.float32)
    if texture == "dotted":    # dots on a 3.5 px grid, one at the centre
        period = 3.5 * SUPERSAMPLE
        dx = (xx - cx) / period
        dy = (yy - cy) / period
        dist = np.hypot(dx - np.round(dx), dy - np.round(dy)) * period
        return (dist < 0.9 * SUPERSAMPLE).astype(np.float32)
    return np.zeros((S, S), np.float32)   # outline: an empty inside


def render(factors: dict[str, str]) -> Image.Image:
    """Draw one image from its six factors. Deterministic: same factors, same bytes."""
    for f in FACTORS:
        if factors.get(f) not in values(f):
            raise ValueError(f"unknown {f} {factors.get(f)!r}; expected one of {', '.join(values(f))}")
    mask = _mask(factors["shape"], factors["size"], factors["position"])
    cover = mask
    if factors["texture"] != "solid":
        # Every texture keeps a ring 1 px wide (the mask minus its erosion) so the silhouette, and with it
        # the shape, stays readable at 10 px; striped and dotted fill the inside with their pattern.
        inner = _inner(factors["shape"], factors["size"], factors["position"])
        cover = mask - inner + inner * _pattern(factors["texture"], factors["size"], factors["position"])
    fg = np.array(COLORS[factors["color"]], np.float32)
    bg = np.array(BACKGROUNDS[factors["background"]], np.float32)
    big = cover[..., None] * fg + (1 - cover[..., None]) * bg
    S = RESOLUTION
    small = big.reshape(S, SUPERSAMPLE, S, SUPERSAMPLE, 3).mean(axis=(1, 3))   # box filter
    return Image.fromarray(np.clip(np.round(small), 0, 255).astype(np.uint8), "RGB")
