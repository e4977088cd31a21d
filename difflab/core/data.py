"""Image folders: `*.png` + `metadata.jsonl`, read with clear errors, and cached latents / text embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difflab.errors import DifflabError


def read_metadata(folder: str | Path) -> list[dict]:
    """The records of `folder/metadata.jsonl`; each has a "file" that exists and a "prompt" or "caption"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DifflabError(f"{folder} is not a folder")
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise DifflabError(f"{folder} has no metadata.jsonl (one JSON object a line: file, prompt or caption)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DifflabError(f"{path}:{n} is not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or "file" not in rec:
            raise DifflabError(f"{path}:{n} has no \"file\" field")
        records.append(rec)
    if not records:
        raise DifflabError(f"{path} is empty")
    return records


def text_of(rec: dict) -> str:
    """The text of a record: "prompt" (generated images) or "caption" (sampled ones)."""
    return rec.get("prompt", rec.get("caption", ""))


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """An RGB image, optionally resized (bicubic) to size x size; an unreadable file is a DifflabError."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DifflabError(f"cannot read image {path}: {e}") from e
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return im


def load_folder_images(folder: str | Path, records: list[dict] | None = None, size: int | None = None):
    folder = Path(folder)
    records = records if records is not None else read_metadata(folder)
    return [load_image(folder / r["file"], size) for r in records]


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1], as the VAE expects."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 64, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE latents times the scaling factor (the UNet's input space); the posterior mean unless `sample`."""
    out = []
    for i in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist
        out.append(dist.sample(generator) if sample else dist.mean)
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for prompts (SD 1.x/2.x and the shapes model), one row per prompt."""
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def fingerprint(module, params: dict[str, torch.Tensor] | None = None) -> str:
    """A short hash of a model's config and weights: caches made with another model are not reused. By default
    a sample of the weights (every 7th tensor's first values: fast on a 3 GB UNet); with `params`, all of
    those tensors (what a cache computed for them, such as a Fisher, depends on)."""
    import hashlib
    cfg = getattr(module, "config", {})
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    if params is not None:
        for name in sorted(params):
            h.update(name.encode())
            h.update(params[name].detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]
    for i, p in enumerate(module.parameters()):
        if i % 7 == 0:
            h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (a temp file renamed into place): a cache is whole or absent."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    tmp.replace(path)


class ImageFolder:
    """An image folder (PNG + metadata.jsonl) whose VAE latents and text embeddings are computed once and
    cached in `folder/.difflab-cache/` as safetensors, keyed by a fingerprint of the encoder."""

    def __init__(self, folder: str | Path, size: int | None = None):
        self.folder = Path(folder)
        self.records = read_metadata(self.folder)
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [text_of(r) for r in self.records]

    def images(self) -> list[Image.Image]:
        return load_folder_images(self.folder, self.records, self.size)

    def _cached(self, kind: str, model, compute) -> torch.Tensor:
        from safetensors.torch import load_file
        cache = self.folder / ".difflab-cache" / f"{kind}-{fingerprint(model)}.safetensors"
        if cache.exists():
            return load_file(cache)["x"]
        x = compute().detach().cpu().contiguous()
        save_tensors(cache, {"x": x})
        return x

    def latents(self, vae, flip: bool = False) -> torch.Tensor:
        """VAE latents of the images (or of their horizontal mirror images, for attribution's flips)."""
        if flip:
            return self._cached("latents-flip", vae, lambda: encode_latents(vae, to_pixels(self.images()).flip(-1)))
        return self._cached("latents", vae, lambda: encode_latents(vae, to_pixels(self.images())))

    def text_embeddings(self, pipe) -> torch.Tensor:
        return self._cached("text", pipe.text_encoder, lambda: encode_prompts(pipe, self.texts))
