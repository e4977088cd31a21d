"""Tuned features for attribution (AbC: Wang et al., ICCV 2023, section 4) and their soft attribution.

A frozen encoder f; two linear heads initialised to the identity, one for training images (`real`) and one for
synthesized queries (`synth`); similarity is the cosine of the mapped features:

    s(ẑ, z) = cos(W_s f(ẑ) + b_s, W_r f(z) + b_r)

difflab's extension (`TuneConfig.whiten`, on by default): f is first whitened with the training set's (the
distractors') mean μ and principal axes, shrunk toward the identity: f' = V^T (f - μ) / (σ/σ_1 + λ), V the axes
and σ their singular values, λ the shrinkage. The heads then act on f'; a scale per channel of f' (head
"channel") reweights the training set's directions of variation. Chosen on held-out training models of the shapes
benchmark (docs/BENCHMARKS.md, attribution, session 12), where it beat AbC's linear heads on the raw features.

They are trained contrastively (InfoNCE) on a benchmark's training split: each query's exemplars are positives,
the other queries' exemplars in the batch and sampled distractors are negatives. AbC's training code is not
released; the temperature (0.02), batch make-up and schedule here are difflab's choices (the reference lists them
as unknown). Soft attribution turns the scores of one query into probabilities with AbC's calibrator:

    p_i = trunc_i / Σ_j trunc_j,   trunc_i = ReLU(exp(inv_tau (s_i - max_j s_j)) + 0.001 bias)

with inv_tau and bias fitted by the exemplars' negative log-likelihood (Softplus(β=100) in place of the ReLU
while fitting, as the official Calibrator).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.core.trainer import TrainConfig, train
from difflab.errors import DifflabError

BIAS_GAIN = 0.001   # the official Calibrator's bias = 0.001 * parameter


@dataclass
class TuneConfig:
    # chosen on held-out *training* models of the shapes benchmark (the last 8 of its 48; docs/BENCHMARKS.md has
    # the sweeps of sessions 4, 9 and 12): the heads overfit the training concepts fast, so training is short;
    # whitening + a scale per channel at lr 3e-3 beat AbC's linear heads (lr 1e-4) on validation and test
    steps: int = 300
    batch: int = 64              # queries per step
    negatives: int = 4096        # distractors drawn per step
    temperature: float = 0.02
    in_batch_negatives: bool = True   # other queries' exemplars count as negatives (else: distractors only)
    hard_negatives: int = 0      # per query and step, also this many drawn from its `hard_pool` nearest distractors
    hard_pool: int = 200         # (by the untuned cosine; copies of its own exemplars left out): see hard_pools
    head: str = "channel"             # "channel" (a scale per channel: AbC's ablation) or "linear" (AbC's default, D x D)
    lr: float = 3e-3
    whiten: float = 0.1          # shrinkage λ of the whitening (module docstring); 0: the encoder's features as they are
    weight_decay: float = 0.0
    calibrate_steps: int = 300
    seed: int = 0
    progress: bool = True


class ChannelScale(torch.nn.Module):
    """AbC's "channel" head: one scale per feature channel, initialised to 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Heads(torch.nn.Module):
    """The two identity-initialised heads (linear, or a scale per channel), plus the calibrator's inv_tau and bias."""

    def __init__(self, dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.real_mapper, self.synth_mapper = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
            for m in (self.real_mapper, self.synth_mapper):
                torch.nn.init.eye_(m.weight)
                torch.nn.init.zeros_(m.bias)
        elif kind == "channel":
            self.real_mapper, self.synth_mapper = ChannelScale(dim), ChannelScale(dim)
        else:
            raise DifflabError(f"unknown head {kind!r}; use linear or channel")
        self.kind, self.dim = kind, dim
        self.inv_tau = torch.nn.Parameter(torch.ones(()))
        self.bias = torch.nn.Parameter(torch.zeros(()))
        # the whitening f' = (f - mean) @ proj; the identity until fit_whitening
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("proj", torch.eye(dim))

    @torch.no_grad()
    def fit_whitening(self, train_features: torch.Tensor, shrink: float) -> None:
        """mean and proj from the training set's features: its principal axes, each divided by (σ/σ_1 + shrink)."""
        x = train_features.float()
        self.mean.copy_(x.mean(0))
        _, sigma, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        proj = torch.zeros(self.dim, self.dim)
        top = sigma[0].clamp_min(1e-12)   # (identical features: no axis of variation, the projection stays finite)
        proj[:, :len(sigma)] = vh.T / (sigma / top + shrink)   # (fewer images than dims: the rest stays zero)
        self.proj.copy_(proj)

    @property
    def whitened(self) -> bool:
        return bool(self.mean.any()) or not torch.equal(self.proj, torch.eye(self.dim, device=self.proj.device))

    def _in(self, f: torch.Tensor) -> torch.Tensor:
        return (f.float() - self.mean) @ self.proj

    def real(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.real_mapper(self._in(f)), dim=-1)

    def synth(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.synth_mapper(self._in(f)), dim=-1)


def whitening_only(heads: Heads) -> Heads:
    """Heads with `heads`' whitening and scales of one: its features before any head was trained, for comparison."""
    white = Heads(heads.dim, "channel")
    white.mean.copy_(heads.mean)
    white.proj.copy_(heads.proj)
    return white.eval().requires_grad_(False)


def _trunc(scores: torch.Tensor, inv_tau, bias, smooth: bool) -> torch.Tensor:
    x = torch.exp(inv_tau * (scores - scores.max(-1, keepdim=True).values)) + BIAS_GAIN * bias
    return F.softplus(x, beta=100) if smooth else F.relu(x)


@torch.no_grad()
def soft_attribution(scores: torch.Tensor, inv_tau: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """Probabilities over the candidates from one query's (or each row's) similarity scores."""
    t = _trunc(scores, torch.as_tensor(inv_tau), torch.as_tensor(bias), smooth=False)
    return t / t.sum(-1, keepdim=True).clamp_min(1e-30)


def train_heads(synth: torch.Tensor, synth_group: torch.Tensor, exemplars: torch.Tensor, exemplar_group: torch.Tensor,
                distractors: torch.Tensor, cfg: TuneConfig | None = None) -> Heads:
    """Fit the heads on a training split: synth (Q, D) queries made by models synth_group (Q,); exemplars (E, D)
    with their model exemplar_group (E,); distractors (N, D). All features as the encoder gives them."""
    cfg = cfg or TuneConfig()
    if synth.shape[-1] != exemplars.shape[-1] or synth.shape[-1] != distractors.shape[-1]:
        raise DifflabError("queries, exemplars and distractors must come from the same encoder (feature sizes differ)")
    heads = Heads(synth.shape[-1], cfg.head)
    if cfg.whiten:
        heads.fit_whitening(distractors, cfg.whiten)
    by_group = {int(g): torch.nonzero(exemplar_group == g).flatten() for g in exemplar_group.unique()}
    missing = set(synth_group.unique().tolist()) - set(by_group)
    if missing:
        raise DifflabError(f"queries of model(s) {sorted(missing)} have no exemplars")

    pools = hard_pools(synth, synth_group, exemplars, exemplar_group, distractors, cfg.hard_pool) \
        if cfg.hard_negatives else None

    def batch_fn(i):
        rng = np.random.default_rng([cfg.seed, i])
        q = torch.from_numpy(rng.choice(len(synth), min(cfg.batch, len(synth)), replace=False))
        groups = synth_group[q]
        pos = torch.stack([by_group[int(g)][rng.integers(len(by_group[int(g)]))] for g in groups])
        neg = torch.from_numpy(rng.integers(0, len(distractors), cfg.negatives))
        if pools is None:
            hard = torch.zeros(len(q), 0, synth.shape[-1])
        else:   # (B, hard_negatives, D): each query's own draw from its pool
            pick = torch.from_numpy(rng.integers(0, pools.shape[1], (len(q), cfg.hard_negatives)))
            hard = distractors[torch.gather(pools[q], 1, pick)]
        return synth[q], groups, exemplars[pos], distractors[neg], hard

    def loss_fn(b):
        sq, groups, ex, dis, hard = b
        a = heads.synth(sq)
        cands = heads.real(torch.cat([ex, dis]))
        logits = a @ cands.T / cfg.temperature
        # every exemplar in the batch drawn from the query's own model is a positive (soft target)
        same = torch.cat([(groups[:, None] == groups[None, :]).float(), torch.zeros(len(sq), len(dis), device=sq.device)], 1)
        if not cfg.in_batch_negatives:   # mask out other models' exemplars: each query sees its own vs distractors
            logits = logits.masked_fill(torch.cat([same[:, :len(ex)] == 0, torch.zeros(len(sq), len(dis), dtype=torch.bool, device=sq.device)], 1), float("-inf"))
        if hard.shape[1]:   # each query's own hard negatives: one more column block, never a positive
            logits = torch.cat([logits, (heads.real(hard) * a[:, None]).sum(-1) / cfg.temperature], 1)
            same = torch.cat([same, torch.zeros(hard.shape[:2], device=sq.device)], 1)
        loss = -(same / same.sum(1, keepdim=True) * logits.log_softmax(-1).clamp_min(-1e4)).sum(1).mean()
        return loss, {}

    params = {f"real.{k}": v for k, v in heads.real_mapper.named_parameters()}
    params.update({f"synth.{k}": v for k, v in heads.synth_mapper.named_parameters()})
    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, desc="tune heads",
                     progress=cfg.progress, log_every=max(1, cfg.steps // 10), max_grad_norm=None)
    history = train(params, loss_fn, batch_fn, tc, modules=[heads])
    heads.history = history
    calibrate(heads, synth, synth_group, exemplars, exemplar_group, distractors, cfg)
    return heads.eval().requires_grad_(False)


@torch.no_grad()
def hard_pools(synth, synth_group, exemplars, exemplar_group, distractors, pool: int) -> torch.Tensor:
    """(Q, pool) indices of each query's nearest distractors by the untuned cosine: the ones a ranking confuses
    with its exemplars. Distractors identical to one of the query's own exemplars (cosine > 0.9999: the same
    picture, as the discrete shapes world draws some) are left out, since they are not negatives."""
    sim = synth @ distractors.T
    for g in synth_group.unique():
        rows, own = synth_group == g, exemplars[exemplar_group == g]
        copies = (own @ distractors.T).max(0).values > 0.9999
        sim[rows] = sim[rows].masked_fill(copies, float("-inf"))
    return sim.topk(min(pool, len(distractors)), dim=1).indices


def calibrate(heads: Heads, synth, synth_group, exemplars, exemplar_group, distractors, cfg: TuneConfig) -> None:
    """Fit inv_tau and bias by the exemplars' NLL under the truncated softmax, each query ranked against its
    own exemplars plus `cfg.negatives` sampled distractors (the heads stay fixed)."""
    with torch.no_grad():
        a, ex, dis = heads.synth(synth), heads.real(exemplars), heads.real(distractors)

    def batch_fn(i):
        rng = np.random.default_rng([cfg.seed, 1, i])
        return int(rng.integers(len(synth))), torch.from_numpy(rng.integers(0, len(dis), cfg.negatives))

    def loss_fn(b):
        q, neg = b   # (neg arrives on the training device; the features stay where they are)
        own = ex[exemplar_group == synth_group[q]]
        s = (a[q] @ torch.cat([own, dis[neg.to(dis.device)]]).T).to(heads.inv_tau.device)
        t = _trunc(s, heads.inv_tau, heads.bias, smooth=True)
        return torch.log(t.sum()) - torch.log(t[:len(own)]).mean(), {}

    tc = TrainConfig(steps=cfg.calibrate_steps, lr=1e-1, weight_decay=0.0, seed=cfg.seed, desc="calibrate",
                     progress=False, log_every=max(1, cfg.calibrate_steps), max_grad_norm=None)
    train({"inv_tau": heads.inv_tau, "bias": heads.bias}, loss_fn, batch_fn, tc)


def save_heads(heads: Heads, folder: str | Path, encoder: str, extra: dict | None = None) -> None:
    from difflab.core.data import save_tensors
    folder = Path(folder)
    save_tensors(folder / "heads.safetensors", heads.state_dict())
    (folder / "heads.json").write_text(json.dumps({"encoder": encoder, "dim": heads.dim, "kind": heads.kind,
                                                   **(extra or {})}, indent=2) + "\n")


def load_heads(folder: str | Path, encoder: str | None = None) -> Heads:
    """Heads saved by `save_heads`; refused when they were tuned on another encoder than `encoder`."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "heads.safetensors").is_file() or not (folder / "heads.json").is_file():
        families = [k for k in ("object", "style") if (folder / k / "heads.json").is_file()]
        if families:   # `difflab attribute benchmark --heads-per-kind`
            raise DifflabError(f"{folder} holds one pair of heads per family: pass "
                               + " or ".join(str(folder / k) for k in families))
        raise DifflabError(f"{folder} holds no tuned heads (heads.safetensors + heads.json; "
                           "`difflab attribute benchmark` writes them)")
    meta = json.loads((folder / "heads.json").read_text())
    if encoder is not None and meta["encoder"] != encoder:
        raise DifflabError(f"the heads in {folder} were tuned on encoder {meta['encoder']!r}, not {encoder!r}")
    heads = Heads(meta["dim"], meta.get("kind", "linear"))
    state = load_file(folder / "heads.safetensors")
    state.setdefault("mean", heads.mean)   # heads saved before the whitening (session 12) had none: the identity
    state.setdefault("proj", heads.proj)
    heads.load_state_dict(state)
    heads.encoder = meta["encoder"]
    return heads.eval().requires_grad_(False)

