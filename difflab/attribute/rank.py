"""`difflab attribute rank`: which images of a training folder made this image, by one method, as a run folder.

Methods: "features" (cosine of encoder features: AbC's untuned baseline), "tuned" (the same through heads from
`difflab attribute benchmark`, with calibrated probabilities), "unlearn" (AbU on the model the folder trained).
The query is any image file: converted to RGB and resized to the encoder's input (features) or to the model's
resolution with bicubic resampling (unlearn). Writes ranking.json (every training image's rank and score),
top.png (the query beside its top images), config.json and metrics.json.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from difflab.attribute.unlearn import UnlearnConfig
from difflab.errors import DifflabError

METHODS = ("features", "tuned", "unlearn")


def query_prompt(image: Path, prompt: str | None) -> str | None:
    """The prompt given, or the one metadata.jsonl beside the image records for it (difflab generate writes it)."""
    from difflab.core.data import read_metadata, text_of
    if prompt or not (Path(image).parent / "metadata.jsonl").is_file():
        return prompt
    return next((text_of(r) or None for r in read_metadata(Path(image).parent) if r["file"] == Path(image).name), None)


def scores_for(method: str, train: Path, query: Path, model: str = "shapes", prompt: str | None = None,
               encoder: str = "shapes-clip", heads: str | Path | None = None, unlearn: UnlearnConfig | None = None,
               fisher: str | Path | None = None, progress: bool = True) -> tuple[torch.Tensor, list[str], dict]:
    """(score per training image, the training files, extra results) for one query under one method."""
    from difflab.attribute.features import cached_features, embed_images
    from difflab.core.data import load_image
    if method not in METHODS:
        raise DifflabError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in ("features", "tuned"):
        feats, files = cached_features(train, encoder)
        q = embed_images([load_image(query)], encoder)
        if method == "features":
            return (q @ feats.T)[0], files, {}
        if heads is None:
            raise DifflabError("--method tuned needs --heads DIR (the heads/ folder `difflab attribute benchmark` writes)")
        from difflab.attribute.tuned import load_heads, soft_attribution
        h = load_heads(heads, encoder)
        with torch.no_grad():
            s = (h.synth(q) @ h.real(feats).T)[0]
        return s, files, {"probability": soft_attribution(s, float(h.inv_tau), float(h.bias))}
    from difflab.attribute.unlearn import (attribute_by_unlearning, cached_fisher, cached_losses, forgetting,
                                           query_tensors, training_data)
    from difflab.models import load_pipeline
    prompt = query_prompt(query, prompt)
    if not prompt:
        raise DifflabError(f"--method unlearn needs the query's prompt: pass --prompt, or keep the image in the "
                           f"folder `difflab generate` wrote (its metadata.jsonl names the prompt of {Path(query).name})")
    cfg = unlearn or UnlearnConfig()
    pipe = load_pipeline(model)
    data = training_data(pipe, train, flips=cfg.flips)
    zq, cq = query_tensors(pipe, query, prompt)
    f = cached_fisher(pipe.unet, pipe.scheduler, data, cfg, path=fisher, progress=progress)
    before = cached_losses(pipe.unet, pipe.scheduler, data, cfg, progress)
    tau = attribute_by_unlearning(pipe, data, zq, cq, cfg, f, before, progress=progress)
    return tau, data.files, {"prompt": prompt, "forgetting": forgetting(tau, before)}


def top_sheet(query: Path, train: Path, files: list[str], labels: list[str]):
    """One row: the query, then the top training images, each column labelled."""
    from difflab.core.data import load_image
    from difflab.report import sheet
    return sheet([[load_image(query)] + [load_image(Path(train) / f) for f in files]], [""], ["query"] + labels)


def rank(train: str | Path, query: str | Path, out: str | Path, method: str = "features", model: str = "shapes",
         prompt: str | None = None, k: int = 10, encoder: str = "shapes-clip", heads: str | Path | None = None,
         unlearn: UnlearnConfig | None = None, fisher: str | Path | None = None, progress: bool = True) -> dict:
    """Rank the training folder for one query and write the run folder `out`; returns the top-k as a dict."""
    from difflab.core.runs import atomic_write_json, output_folder, write_metrics
    train, query = Path(train), Path(query)
    if not query.is_file():
        raise DifflabError(f"query image {query} does not exist")
    scores, files, extra = scores_for(method, train, query, model, prompt, encoder, heads, unlearn, fisher, progress)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    top = [{"rank": r + 1, "file": files[i], "score": float(scores[i]),
            **({"probability": float(extra["probability"][i])} if "probability" in extra else {})}
           for r, i in enumerate(order[:k])]
    with output_folder(Path(out)) as tmp:
        atomic_write_json(tmp / "ranking.json", {"query": str(query), "method": method,
                                                 "files": [files[i] for i in order],
                                                 "scores": [float(scores[i]) for i in order]})
        atomic_write_json(tmp / "config.json", {"train": str(train), "query": str(query), "method": method,
                                                "model": model, "encoder": encoder, "heads": str(heads) if heads else None,
                                                "prompt": extra.get("prompt", prompt), "k": k,
                                                "unlearn": asdict(unlearn or UnlearnConfig()) if method == "unlearn" else None})
        top_sheet(query, train, [t["file"] for t in top], [f"{t['rank']}" for t in top]).save(tmp / "top.png")
        write_metrics(tmp, {"method": method, "n_train": len(files), "top": top,
                            **({"forgetting": extra["forgetting"]} if "forgetting" in extra else {})})
    return {"method": method, "top": top}
