"""Evaluation metrics every capability reports with. Plain functions on tensors/arrays; formulas in docstrings.

Feature extractors are the caller's choice (the shapes CLIP offline, any transformers CLIP/DINO for real use),
so Frechet distance and KID here are "FD/KID on features F", never tied to Inception.
"""
from __future__ import annotations

import numpy as np
import torch


def _np64(x) -> np.ndarray:
    return (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)).astype(np.float64)


def frechet_distance(feats_a, feats_b) -> float:
    """FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) between Gaussians fitted to two feature sets
    (Heusel et al. 2017, eq. 6). The matrix square root is scipy's; its tiny imaginary part is dropped."""
    a, b = _np64(feats_a), _np64(feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return gaussian_frechet(mu_a, s_a, mu_b, s_b)


def gaussian_frechet(mu_a, s_a, mu_b, s_b) -> float:
    """The Frechet (2-Wasserstein squared) distance between N(mu_a, s_a) and N(mu_b, s_b)."""
    from scipy import linalg
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():   # near-singular product: regularise as pytorch-fid does
        eps = 1e-6 * np.eye(s_a.shape[0])
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance on any features (Binkowski et al. 2018): the unbiased estimate of MMD^2 with
    the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Returns (mean, std)."""
    a, b = _np64(feats_a), _np64(feats_b)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        # unbiased: drop the diagonals of k(x, x) and k(y, y)
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b), row by row."""
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """CLIPScore as torchmetrics reports it: mean over pairs of 100 * max(cos(E_I, E_T), 0)
    (Hessel et al. 2021 use w = 2.5 instead of 100; the ranking is the same)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return float((100 * cos.clamp_min(0)).mean())


def two_afc(d0, d1, p1) -> float:
    """2AFC score (DreamSim/LPIPS): share of triplets where the metric agrees with the judges. d0, d1 are the
    distances of img0 and img1 to the reference; p1 is the fraction of judges who said img1 is closer. With
    soft votes this is LPIPS's expected agreement p1 [d1 < d0] + (1 - p1) [d0 < d1] (ties count half)."""
    d0, d1, p1 = _np64(d0), _np64(d1), _np64(p1)
    pick1 = (d1 < d0).astype(np.float64) + 0.5 * (d1 == d0)
    return float(np.mean(p1 * pick1 + (1 - p1) * (1 - pick1)))


def average_precision(scores, relevant) -> float:
    """AP of one ranking: mean over relevant items of precision at their rank (higher score = earlier)."""
    s, r = _np64(scores), _np64(relevant).astype(bool)
    if not r.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    hits = r[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def auc(scores, labels) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counting half
    (the Mann-Whitney U statistic divided by n_pos * n_neg)."""
    from scipy.stats import rankdata
    s, y = _np64(scores), _np64(labels).astype(bool)
    n_pos, n_neg = y.sum(), (~y).sum()
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(s)   # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(scores, labels, threshold: float) -> tuple[float, float, float]:
    """(accuracy, accuracy on negatives, accuracy on positives) of the rule "positive iff score > threshold";
    accuracy is the mean of the two, which equals plain accuracy when the classes are the same size (as in
    UniversalFakeDetect's evaluation) and does not reward predicting the larger class when they are not."""
    s, y = _np64(scores), _np64(labels).astype(bool)
    pred = s > threshold
    neg, pos = float((~pred[~y]).mean()), float(pred[y].mean())
    return (neg + pos) / 2, neg, pos


def best_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, balanced accuracy) maximising balanced accuracy over every cut between sorted scores;
    UniversalFakeDetect's "oracle accuracy" when chosen on the test set, a calibration when chosen on val."""
    s, y = _np64(scores), _np64(labels).astype(bool)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # cut after position k: the first k are called negative
    tn = np.concatenate([[0], np.cumsum(~y)])
    fn = np.concatenate([[0], np.cumsum(y)])
    acc = (tn / max(1, (~y).sum()) + (y.sum() - fn) / max(1, y.sum())) / 2
    distinct = np.concatenate([[True], s[1:] != s[:-1], [True]])   # cut only between different scores
    acc = np.where(distinct, acc, -1)
    k = int(np.argmax(acc))
    lo = s[k - 1] if k > 0 else s[0] - 1.0
    hi = s[k] if k < len(s) else s[-1] + 1.0
    return float((lo + hi) / 2), float(acc[k])


def iou(pred_mask, true_mask) -> float:
    """Intersection over union of two boolean masks, pooled over all pixels given (1 when both are empty)."""
    p, t = _np64(pred_mask).astype(bool), _np64(true_mask).astype(bool)
    union = (p | t).sum()
    return float((p & t).sum() / union) if union else 1.0


def recall_at_k(scores, relevant, k: int) -> float:
    """Recall@K of one ranking: the share of the relevant items that are among the K highest scores."""
    s, r = _np64(scores), _np64(relevant).astype(bool)
    top = np.argsort(-s, kind="stable")[:k]
    return float(r[top].sum() / max(1, r.sum()))


def retrieval_metrics(scores, relevant, ks=(5, 10, 100)) -> dict[str, float]:
    """mAP and mean Recall@K over queries; scores and relevant are (Q, N)."""
    s, r = _np64(scores), _np64(relevant)
    out = {"map": float(np.nanmean([average_precision(a, b) for a, b in zip(s, r)]))}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([recall_at_k(a, b, k) for a, b in zip(s, r)]))
    return out


def cluster_bootstrap_ci(values, clusters, level: float = 0.95, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` when they come in correlated `clusters` (the queries
    of one benchmark model, say): whole clusters are drawn with replacement, so the interval reflects how many
    independent clusters there are, not how many values (Efron & Tibshirani 1993, ch. 13; the cluster bootstrap of
    Field & Welsh 2007). Each draw's statistic is the plain mean of the values of the drawn clusters. With few
    clusters the percentile interval runs narrow: a nominal 90 % covered the true mean 85 % of the time with 20
    clusters (tests/test_metrics.py), so read it as a lower bound on the uncertainty."""
    v = _np64(values)
    _, c = np.unique(np.asarray(clusters), return_inverse=True)
    sums, counts = np.bincount(c, weights=v), np.bincount(c)
    pick = np.random.default_rng(seed).integers(0, len(sums), (draws, len(sums)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def diversity(feats: torch.Tensor, distance=cosine_distance) -> float:
    """Mean pairwise distance between all distinct pairs of a set (under any row-wise distance)."""
    n = len(feats)
    if n < 2:
        raise ValueError("diversity needs at least two items")
    i, j = torch.triu_indices(n, n, offset=1)
    return float(distance(feats[i], feats[j]).mean())


# --- feature extractors and folder scoring ------------------------------------------------------------------
def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (the projection in pooler_output), 4 a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_clip(name_or_path: str = "shapes-clip"):
    """(CLIPModel, tokenizer, image_size, mean, std): the shipped shapes CLIP or a transformers CLIP."""
    from transformers import AutoTokenizer, CLIPModel

    from difflab.errors import DifflabError
    from difflab.similarity import clip_source
    path, mean, std = clip_source(name_or_path)
    try:
        model, tok = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DifflabError(f"could not load CLIP {name_or_path!r}: {str(e).splitlines()[0][:200]}") from e
    return model, tok, model.config.vision_config.image_size, mean, std


@torch.no_grad()
def clip_embeddings(images, texts, clip: str = "shapes-clip", batch_size: int = 256):
    """CLIP image and text embeddings (projected) of PIL images and their texts."""
    from difflab.similarity import make_preprocess
    model, tok, size, mean, std = load_clip(clip)
    pre = make_preprocess(size)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    img, txt = [], []
    for i in range(0, len(images), batch_size):
        x = (torch.cat([pre(im) for im in images[i:i + batch_size]]) - m) / s
        img.append(_features(model.get_image_features(pixel_values=x)))
        ids = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt")
        txt.append(_features(model.get_text_features(**ids)))
    return torch.cat(img), torch.cat(txt)


@torch.no_grad()
def image_features(images, backbone: str = "shapes-clip", batch_size: int = 256) -> torch.Tensor:
    """CLS features of any DreamSim backbone (shapes CLIP, CLIP, DINO), for FD / KID / diversity."""
    from difflab.similarity import load_backbone, make_preprocess
    b = load_backbone(backbone).eval()
    pre = make_preprocess(b.image_size)
    return torch.cat([b(torch.cat([pre(im) for im in images[i:i + batch_size]]))
                      for i in range(0, len(images), batch_size)])


def score_folder(folder, metric: str, ref=None, backbone: str = "shapes-clip") -> dict:
    """One metric of an image folder: clip (against its prompts), fd / kid (against --ref), diversity.
    Writes FOLDER/score-<metric>.json and returns it."""
    from pathlib import Path

    from difflab.core.data import load_folder_images, read_metadata, text_of
    from difflab.core.runs import atomic_write_json
    from difflab.errors import DifflabError
    folder = Path(folder)
    recs = read_metadata(folder)
    images = load_folder_images(folder, recs)
    if metric == "clip":
        ie, te = clip_embeddings(images, [text_of(r) for r in recs], backbone)
        res = {"clip_score": clip_score(ie, te)}
    elif metric in ("fd", "kid"):
        if ref is None:
            raise DifflabError(f"--metric {metric} compares two folders: pass --ref DIR")
        a = image_features(images, backbone)
        b = image_features(load_folder_images(ref), backbone)
        if metric == "fd":
            res = {"fd": frechet_distance(a, b)}
        else:
            mean, std = kid(a, b, subset_size=min(1000, len(a), len(b)))
            res = {"kid": mean, "kid_std": std}
    elif metric == "diversity":
        res = {"diversity": diversity(image_features(images, backbone))}
    else:
        raise DifflabError(f"unknown metric {metric!r}: use clip, fd, kid or diversity")
    res.update({"n": len(images), "backbone": backbone, **({"ref": str(ref)} if ref else {})})
    atomic_write_json(folder / f"score-{metric}.json", res)
    return res
