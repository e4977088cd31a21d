"""Feature-based attribution (AbC's untuned baseline): embed the training set once, rank it against a query by
cosine similarity, exactly.

    score(q, x_i) = cos(f(q), f(x_i)),   ranking = argsort_i(-score)

Features are cached as safetensors beside the images (`.difflab-cache/features-<encoder>.safetensors`, with the
encoder's name and the file list inside), so the training set is embedded once per encoder; a cache made with
another encoder, or for other files, is refused rather than silently mixed. The search is an exact chunked
matrix product in torch (AbC evaluates by brute force too): no index to build, the same answer as a full sort.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError


DREAMSIM = "shapes-dreamsim"   # the tuned shapes DreamSim shipped with difflab, as an attribution encoder
TAGGER = "shapes-tagger"       # the shipped tagger (difflab.world.train.train_tagger): factor readings
# The power applied to the tagger's probabilities before the cosine (power normalisation, as Perronnin et al.
# 2010 apply to Fisher vectors): it flattens confident readings, so two images are alike by how many factors they
# share rather than by one confident factor. Chosen on the AbC benchmark's validation models (session 17:
# 0.25 against 1, 0.5, 2, 0.1 and log-probabilities).
TAGGER_POWER = 0.25


def _is_tagger(encoder: str) -> bool:
    cfg = Path(encoder) / "config.json"
    return encoder == TAGGER or (cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "Oracle")


@torch.no_grad()
def tagger_features(images, encoder: str = TAGGER, power: float = TAGGER_POWER, batch_size: int = 500) -> torch.Tensor:
    """A tagger's readings of PIL images (any size or mode: RGB, resized to its input): per factor, the softmax
    over the values it was trained on, raised to `power`, concatenated and L2-normalised. `encoder`: "shapes-tagger"
    or a folder saved by `train_tagger` (an oracle-class model)."""
    from PIL import Image

    from difflab.models import shapes_dir
    from difflab.world.oracle import Oracle, to_tensor
    model = Oracle.from_pretrained(shapes_dir("tagger") if encoder == TAGGER else encoder).eval()
    r = model.config.resolution
    images = [im.convert("RGB") if im.size == (r, r) else im.convert("RGB").resize((r, r), Image.BICUBIC)
              for im in images]
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model.readings(to_tensor(images[i:i + batch_size])).pow(power))
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def embed_images(images, encoder: str = "shapes-clip", batch_size: int = 256) -> torch.Tensor:
    """L2-normalised features of PIL images: the CLS features of any `difflab.similarity.load_backbone` encoder,
    a DreamSim embedding ("shapes-dreamsim", shipped, or a folder saved by `difflab similarity train`), or a
    tagger's factor readings ("shapes-tagger", shipped, or a folder saved by `train_tagger`; `tagger_features`).
    "A+B" (names that are not folders) concatenates the encoders' features, each L2-normalised, at equal weight."""
    if "+" in encoder and not Path(encoder).exists():
        parts = encoder.split("+")
        return F.normalize(torch.cat([embed_images(images, e, batch_size) for e in parts], -1), dim=-1)
    if _is_tagger(encoder):
        return tagger_features(images, encoder)
    if encoder == DREAMSIM or (Path(encoder) / "dreamsim_config.json").is_file():
        from difflab.similarity import dreamsim
        model, pre = dreamsim(model_dir=None if encoder == DREAMSIM else encoder)
        return F.normalize(torch.cat([model.embed(torch.cat([pre(im) for im in images[i:i + batch_size]]))
                                      for i in range(0, len(images), batch_size)]), dim=-1)
    from difflab.metrics import image_features
    return F.normalize(image_features(images, encoder, batch_size).float(), dim=-1)


def cached_features(folder: str | Path, encoder: str = "shapes-clip") -> tuple[torch.Tensor, list[str]]:
    """(features (N, D), files) of an image folder with metadata.jsonl, computed once per encoder and cached."""
    from safetensors import safe_open

    from difflab.core.data import load_folder_images, read_metadata, save_tensors
    folder = Path(folder)
    records = read_metadata(folder)
    files = [r["file"] for r in records]
    tag = encoder.replace("/", "--").replace("\\", "--").strip(".-") or "encoder"
    cache = folder / ".difflab-cache" / f"features-{tag}.safetensors"
    if cache.exists():
        with safe_open(str(cache), "pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("encoder") != encoder:
                raise DifflabError(f"{cache} holds features of encoder {meta.get('encoder')!r}, not {encoder!r}; "
                                   "delete it or pass that encoder")
            if json.loads(meta.get("files", "[]")) != files:
                raise DifflabError(f"{cache} was made for other files than {folder}/metadata.jsonl lists; delete it")
            return fh.get_tensor("features"), files
    feats = embed_images(load_folder_images(folder, records), encoder).contiguous()
    save_tensors(cache, {"features": feats}, {"encoder": encoder, "files": json.dumps(files)})
    return feats, files


def faiss_index(bank: torch.Tensor, kind: str = "flat"):
    """A faiss inner-product index over the bank (`pip install difflab[faiss]`). "flat" (IndexFlatIP) is exact:
    the same top-k as `top_k`; "hnsw" (IndexHNSWFlat, inner product) is approximate and scales past ~10M."""
    try:
        import faiss
    except ImportError as e:
        raise DifflabError("faiss is not installed: pip install 'difflab[faiss]' (or use the exact torch search)") from e
    x = bank.float().contiguous().numpy()
    if kind == "flat":
        index = faiss.IndexFlatIP(x.shape[1])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise DifflabError(f"unknown faiss index {kind!r}; use flat or hnsw")
    index.add(x)
    return index


@torch.no_grad()
def top_k(query: torch.Tensor, bank: torch.Tensor, k: int = 100, chunk: int = 262_144,
          index=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product (cosine for normalised features): (scores (Q, k), indices (Q, k)), best
    first. The bank is scanned in chunks, keeping a running top-k, so memory stays at Q x chunk. With a faiss
    `index` built on the bank (`faiss_index`), faiss searches instead."""
    if query.ndim == 1:
        query = query[None]
    if query.shape[-1] != bank.shape[-1]:
        raise DifflabError(f"query features are {query.shape[-1]}-d, the bank's {bank.shape[-1]}-d: another encoder?")
    k = min(k, len(bank))
    if index is not None:
        s, i = index.search(query.float().contiguous().numpy(), k)
        return torch.from_numpy(s).to(query.dtype), torch.from_numpy(i).long()
    best_s = torch.full((len(query), 0), float("-inf"), dtype=query.dtype)
    best_i = torch.zeros((len(query), 0), dtype=torch.long)
    for start in range(0, len(bank), chunk):
        s = query @ bank[start:start + chunk].T
        s_k, i_k = s.topk(min(k, s.shape[1]), dim=1)
        cat_s, cat_i = torch.cat([best_s, s_k], 1), torch.cat([best_i, i_k + start], 1)
        order = cat_s.topk(min(k, cat_s.shape[1]), dim=1).indices
        best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
    return best_s, best_i
