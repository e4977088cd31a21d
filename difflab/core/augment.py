"""Custom Diffusion's augmentation (Kumari et al. 2023, sec. 3; shared with Concept Ablation).

Target images are randomly rescaled: small ones are pasted on a black canvas and the loss is masked to where
the image is (the prompt gains "a far away " / "very small "); large ones are cropped ("zoomed in " /
"close up "). Regularisation images are not augmented.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FAR = ("a far away ", "very small ")
NEAR = ("zoomed in ", "close up ")


def rescale_augment(x: torch.Tensor, rng: np.random.Generator, latent_factor: int):
    """x: (3, H, W) in [-1, 1]. Returns (image, mask (1, H/f, W/f), prompt prefix).

    Scale s ~ U[H/3, H] with probability 2/3, else U[1.2 H, 1.4 H). s < 0.6 H: paste at a random place on a
    black canvas, mask = the pasted box shrunk by one latent pixel, "far" prefix. s > H: random crop, full
    mask, "near" prefix. Otherwise the image is resized and pasted likewise, without a prefix.
    """
    if rng.random() < 0.5:
        x = x.flip(-1)
    size = x.shape[-1]
    h = size // latent_factor
    s = int(rng.uniform(size / 3, size)) if rng.random() < 2 / 3 else int(rng.uniform(1.2 * size, 1.4 * size))
    s = max(s, latent_factor * 3)
    img = F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
    mask = torch.ones(1, h, h)
    if s > size:
        top, left = rng.integers(0, s - size + 1, size=2)
        return img[:, top:top + size, left:left + size], mask, str(rng.choice(NEAR))
    canvas = torch.full_like(x, -1.0)
    top, left = rng.integers(0, size - s + 1, size=2)
    canvas[:, top:top + s, left:left + s] = img
    mask.zero_()
    t0, l0 = top // latent_factor + 1, left // latent_factor + 1
    t1, l1 = (top + s) // latent_factor - 1, (left + s) // latent_factor - 1
    mask[:, t0:max(t1, t0 + 1), l0:max(l1, l0 + 1)] = 1
    return canvas, mask, (str(rng.choice(FAR)) if s < 0.6 * size else "")
