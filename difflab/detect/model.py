"""Detectors: a backbone and a head, saved as a folder of safetensors plus a JSON config.

- "cnn": a small residual CNN trained end to end (the CNNDetection recipe, sized for the shapes world's 32 px;
  at full resolution for its first layers, because a generator's fingerprint is in the high frequencies that
  early striding would average away). It runs at any input size.
- any `difflab.similarity.load_backbone` name ("shapes-clip", a transformers CLIP / DINO / ResNet folder or hub
  id) with a linear head: frozen (tune "probe", UniversalFakeDetect's recipe on CLIP) or trained end to end
  (tune "full", CNNDetection's recipe on an ImageNet ResNet-50, e.g. microsoft/resnet-50).
- `PixelDetector`: a fully convolutional network with one output channel per pixel (fake = 1), for inpainted
  regions (the online-detection paper's pixel-level head; FCN-style, dilated instead of downsampled).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflab.errors import DifflabError

CONFIG_FILE = "detector_config.json"
WEIGHTS_FILE = "detector.safetensors"
BUILTIN = "cnn"


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.GroupNorm(8, cout), nn.SiLU())


class _Residual(nn.Module):
    def __init__(self, c: int, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(_conv(c, c, dilation=dilation), _conv(c, c, dilation=dilation))

    def forward(self, x):
        return x + self.body(x)


def high_pass(x: torch.Tensor, gain: float = 16.0) -> torch.Tensor:
    """x minus its 3x3 local mean, amplified: the noise residual image forensics works on (cf. the SRM filters of
    steganalysis). A generator's fingerprint is a few grey levels of texture where a camera (here: the
    procedural renderer) leaves flat colour; in the raw image it is 1/255 of the signal."""
    return gain * (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1))


class SmallCNN(nn.Module):
    """x in [-1, 1] -> (N, 4 * width) features: the image and its high-pass residual, a full-resolution stem and
    residual block, then two stride-2 stages, global average pooling."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(_conv(6, w), _Residual(w), _conv(w, 2 * w, 2), _Residual(2 * w),
                                 _conv(2 * w, 4 * w, 2), _Residual(4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = 4 * w

    def forward(self, x):
        return self.net(torch.cat([x, high_pass(x)], dim=1))


class Detector(nn.Module):
    """Image-level detector: images in [0, 1] (N, 3, H, W) -> logits (N,), fake = positive."""

    def __init__(self, backbone: str = BUILTIN, width: int = 32, tune: str = "probe"):
        super().__init__()
        if tune not in ("probe", "full"):
            raise DifflabError(f"tune {tune!r}: probe (frozen backbone, UniversalFakeDetect) or full (CNNDetection)")
        self.backbone_name, self.width, self.tune = backbone, width, tune
        if backbone == BUILTIN:
            self.features = SmallCNN(width)
            dim = self.features.dim
        else:
            from difflab.similarity import load_backbone
            self.features = load_backbone(backbone)
            self.features.requires_grad_(tune == "full")
            dim = self.features.dim
        self.head = nn.Linear(dim, 1)
        nn.init.normal_(self.head.weight, 0.0, 0.02)   # CNNDetection's fc initialisation
        nn.init.zeros_(self.head.bias)

    @property
    def frozen(self) -> bool:
        return self.backbone_name != BUILTIN and self.tune == "probe"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone_name == BUILTIN:
            f = self.features(x * 2 - 1)
        elif self.frozen:
            with torch.no_grad():
                f = self.features(x)   # the backbone resizes and normalises itself
        else:
            f = self.features(x)
        return self.head(f).squeeze(-1)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the head alone for a frozen backbone (named in the config, not copied);
        otherwise every tensor, buffers included (BatchNorm running statistics change in training)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad} if self.frozen else self.state_dict()

    def config(self) -> dict:
        return {"kind": "image", "backbone": self.backbone_name, "width": self.width, "tune": self.tune}


class PixelDetector(nn.Module):
    """Pixel-level detector: images in [0, 1] (N, 3, H, W) -> per-pixel logits (N, H, W), fake = positive.

    Fully convolutional at full resolution; dilations 1, 2, 4, 8 widen the receptive field to the whole
    32-pixel image without striding, so the mask keeps pixel precision."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.net = nn.Sequential(_conv(6, width), *[_Residual(width, d) for d in (1, 2, 4, 8)],
                                 nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        return self.net(torch.cat([x, high_pass(x)], dim=1)).squeeze(1)

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def weights(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def config(self) -> dict:
        return {"kind": "pixel", "backbone": "fcn", "width": self.width}


def save_detector(model: nn.Module, folder: str | Path, extra: dict | None = None) -> None:
    """detector_config.json (architecture + preprocessing + calibration) and detector.safetensors (only what
    trained: a frozen backbone is named, not copied)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({**model.config(), **(extra or {})}, indent=2) + "\n")
    save_file({n: p.detach().contiguous() for n, p in model.weights().items()}, folder / WEIGHTS_FILE)


def read_detector_config(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DifflabError(f"{folder} is not a detector run (no readable {CONFIG_FILE})") from e


def load_detector(folder: str | Path, kind: str | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, its config). `kind` ("image" or "pixel") refuses the other kind of run; weights that
    do not fit the configured backbone (a checkpoint from another backbone) are an error, not a partial load."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(folder)
    cfg = read_detector_config(folder)
    if kind is not None and cfg.get("kind") != kind:
        want = {"image": "an image-level run (detect train)", "pixel": "a pixel-level run (detect train-pixel)"}
        raise DifflabError(f"{folder} is a {cfg.get('kind')}-level detector; this command needs {want[kind]}")
    model = PixelDetector(cfg["width"]) if cfg["kind"] == "pixel" else \
        Detector(cfg["backbone"], cfg["width"], cfg.get("tune", "probe"))
    try:
        state = load_file(folder / WEIGHTS_FILE)
    except (OSError, SafetensorError) as e:
        raise DifflabError(f"cannot read {folder / WEIGHTS_FILE}: {e}") from e
    own = model.weights()
    bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape) + sorted(set(state) - set(own))
    if bad:
        raise DifflabError(f"{folder / WEIGHTS_FILE} does not fit backbone {cfg['backbone']!r} "
                           f"(first mismatch: {bad[0]}); was it trained with another backbone?")
    model.load_state_dict(state, strict=False)
    return model.eval(), cfg
