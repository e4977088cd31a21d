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


def diversity(feats: torch.Tensor, distance=cosine_distance) -> float:
    """Mean pairwise distance between all distinct pairs of a set (under any row-wise distance)."""
    n = len(feats)
    if n < 2:
        raise ValueError("diversity needs at least two items")
    i, j = torch.triu_indices(n, n, offset=1)
    return float(distance(feats[i], feats[j]).mean())
