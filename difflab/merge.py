"""Custom Diffusion's closed-form merge (Kumari et al., CVPR 2023, eq. 4) of concepts trained separately.

Each cross-attention K/V matrix is solved so that every concept's prompts map as its own run mapped them while
regularisation captions change as little as possible:

    argmin_W ||(W - W0) C_reg^T||_F^2   s.t.   W C_tgt^T = V^T

Runs that trained all of cross-attention (--params xattn) also changed the query and output projections, which
read image features and have no closed-form merge: one run's are kept and the other runs' K/V targets are carried
into that frame first (`carry_targets`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from difflab.customize import (CONFIG_NAME, Concept, add_tokens, concept_value, default_reg_prompts,
                               evaluate_concepts, read_weights, save_weights)
from difflab.errors import DifflabError


def eq4_map(C_reg: torch.Tensor, C_tgt: torch.Tensor) -> torch.Tensor:
    """M such that eq. 4's solution is W = W0 + (V^T - W0 C_tgt^T) M: linear in the targets V (float64).

        C = C_reg^T C_reg,  D = C_tgt C^-1,  M = (D C_tgt^T)^-1 D"""
    C_reg, C_tgt = C_reg.double(), C_tgt.double()
    C = C_reg.T @ C_reg
    # A tiny ridge (1e-6 of the mean eigenvalue) keeps C invertible when the regularisation features do not span
    # every direction (a LayerNorm output without bias lies in a (d-1)-dim subspace); constraints stay exact.
    C = C + 1e-6 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    D = torch.linalg.solve(C, C_tgt.T).T            # C_tgt C^-1 (C is symmetric)
    return torch.linalg.solve(D @ C_tgt.T, D)


def merge_matrix(W0: torch.Tensor, C_reg: torch.Tensor, C_tgt: torch.Tensor, V: torch.Tensor,
                 M: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_W ||(W - W0) C_reg^T||_F^2  s.t.  W C_tgt^T = V^T   (Kumari et al., eq. 4), in float64.
    W0 (o, d), C_reg (n, d) regularisation text features, C_tgt (m, d) target features, V (m, o) = rows W_i c;
    M = eq4_map(C_reg, C_tgt) when the caller has it."""
    W0, V = W0.double(), V.double()
    return (W0 + (V.T - W0 @ C_tgt.double().T) @ (eq4_map(C_reg, C_tgt) if M is None else M)).float()


def _independent_rows(C: torch.Tensor, rel_tol: float = 0.1) -> list[int]:
    """Greedy: keep row i when its distance to the span of the rows kept so far exceeds rel_tol of its norm."""
    keep: list[int] = []
    for i, row in enumerate(C):
        if keep:
            basis = torch.linalg.qr(C[keep].T).Q          # (d, k) orthonormal basis of the kept rows
            rest = row - basis @ (basis.T @ row)
        else:
            rest = row
        if rest.norm() > rel_tol * row.norm():
            keep.append(i)
    return keep


@torch.no_grad()
def text_features(pipe, prompts: list[str], skip_start: bool = True, padding: bool = False,
                  from_token: str | None = None) -> torch.Tensor:
    """Token-level text features (the rows K/V see): one row per position from after the start token through
    the first end token (with `padding`, through the last padding position: cross-attention sees those too),
    over all prompts. `from_token` starts each prompt's rows at that token instead: in a causal encoder the
    words before it ("a", "photo of a") have the same features as in every other prompt that starts so."""
    from difflab.core.data import encode_prompts
    tok = pipe.tokenizer
    hidden = encode_prompts(pipe, prompts)
    rows = []
    for p, h in zip(prompts, hidden):
        ids = tok(p, truncation=True, max_length=tok.model_max_length).input_ids
        start = ids.index(tok.convert_tokens_to_ids(from_token)) if from_token else 1 if skip_start else 0
        rows.append(h[start:None if padding else len(ids)])
    return torch.cat(rows)


# Carrying a run's K/V into another run's q/out frame (`merge`). The closed-form first guess is ill-conditioned
# (W_out's smallest singular values are ~1e-3 of its largest): without a ridge the targets blow up (joint accuracy
# 0.81 -> 0.09); FRAME_RIDGE was chosen on one pair of runs (heart + moon, both --params xattn, evaluation seeds:
# 0.003 -> heart 0.31, 0.01 -> 0.78, 0.03 -> 0.81, 0.1 -> 0.63). On a re-seeded pair the first guess lost the heart
# (0.00): in the middle layers its outputs' squared error was 0.95-1.43 of their variance. FIT_ITERS Adam steps on
# the target rows (FIT_REG weighs how far captions without a token move from the first guess) brought the heart
# back (0.72 on the evaluation seeds). docs/BENCHMARKS.md, session 10.
FRAME_RIDGE = 0.03
FIT_ITERS = 300
FIT_REG = 1.0


@torch.no_grad()
def attention_inputs(pipe, layers: list[str], prompts: list[str], n: int = 8, seed: int = 90_000,
                     max_positions: int = 64) -> dict:
    """(image features, text features) entering each named cross-attention, conditional branch only, at every
    denoising step while the pipeline generates n images per prompt: {layer: (X (calls*b, N, C), E (calls*b, P, d))}.
    Layers with more than `max_positions` image positions keep a seeded random subset of them (a 512 px SD model's
    first layers have 4,096), so that the record stays small."""
    from difflab.generate import generate_images
    found = dict(pipe.unet.named_modules())
    got = {m: ([], []) for m in layers}
    g = torch.Generator().manual_seed(seed)

    def hook_for(name):
        def hook(_m, args, kwargs):
            x, e = args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            half = len(x) // 2   # the pipeline batches [unconditional, conditional]
            x = x[half:].float().cpu()
            if x.shape[1] > max_positions:
                x = x[:, torch.randperm(x.shape[1], generator=g)[:max_positions]]
            got[name][0].append(x)
            got[name][1].append(e[half:].float().cpu())
        return hook
    handles = [found[m].register_forward_pre_hook(hook_for(m), with_kwargs=True) for m in layers]
    try:
        generate_images(pipe, prompts, n=n, seed=seed, progress=False)
    finally:
        for h in handles:
            h.remove()
    return {m: (torch.cat(xs), torch.cat(es)) for m, (xs, es) in got.items()}


def _attend(X, E, Wq, Wk, Wv, Wo, bo, heads: int) -> torch.Tensor:
    """Cross-attention as diffusers computes it (no biases on q/k/v, softmax(q k^T / sqrt(head dim)) v, to_out)."""
    B, N, _ = X.shape
    q, k, v = X @ Wq.T, E @ Wk.T, E @ Wv.T
    hd = q.shape[-1] // heads
    split = lambda t: t.view(B, t.shape[1], heads, hd).transpose(1, 2)
    h = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return h.transpose(1, 2).reshape(B, N, heads * hd) @ Wo.T + bo


class _state:
    """Within the block the UNet holds `state` where it gives a layer and `base` elsewhere; base again after."""
    def __init__(self, pipe, base: dict, state: dict):
        self.params, self.base, self.state = dict(pipe.unet.named_parameters()), base, state

    def _set(self, state):
        with torch.no_grad():
            for n, w in self.base.items():
                self.params[n].copy_(state.get(n, w).to(self.params[n]))

    def __enter__(self):
        self._set(self.state)

    def __exit__(self, *exc):
        self._set({})


def _into_frame(kind: str, V: torch.Tensor, rows: torch.Tensor, own: list[torch.Tensor], kept: list[torch.Tensor],
                G: torch.Tensor, heads: int, ridge: float = FRAME_RIDGE) -> torch.Tensor:
    """The closed-form first guess: carry K/V target rows (`rows` of V) of a run trained with its own (or the
    base's) q/out = [W_q, W_out, b_out] into the frame of the kept ones, so its cross-attention output stays its own.

    Values: the output is W_out sum_j a_j v_j + b with sum_j a_j = 1, so v' with W_out,t v' + b_t = W_out,i v + b_i
    keeps it row by row. Keys: k'_h = argmin E_x ((W_q,t x)_h . k' - (W_q,i x)_h . k_h)^2 over the inputs x the
    queries read (Gram G; per head h, A = W_q[h rows]), i.e. (A_t G A_t^T) k' = A_t G A_i^T k_h. Both solved with a
    ridge towards the run's own row (`ridge` x the mean eigenvalue): the matrices are ill-conditioned."""
    (Ai, Wi, bi), (At, Wt, bt) = ([t.double().cpu() for t in m] for m in (own, kept))
    V = V.clone()
    if kind == "to_v":
        A, Y = Wt.T @ Wt, (V[rows] @ Wi.T + bi - bt) @ Wt
        mu = ridge * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype)
        V[rows] = torch.linalg.solve(A + mu, (Y + V[rows] @ mu).T).T
        return V
    hd = At.shape[0] // heads
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        a, b = At[sl], Ai[sl]
        A = a @ G @ a.T
        mu = ridge * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype)
        V[rows, sl] = torch.linalg.solve(A + mu, (V[rows, sl] @ (a @ G @ b.T + mu).T).T).T
    return V


def _fit_targets(T: dict, free: torch.Tensor, W0: dict, kept: list[torch.Tensor], data: dict, refs: dict,
                 maps: dict, heads: int, iters: int = FIT_ITERS, reg: float = FIT_REG, lr: float = 1e-2):
    """Refine the `free` K/V target rows (T: "to_k"/"to_v" -> (m, o)) by gradient descent so that the merged layer
    (eq. 4 given the targets, with the kept q/out) gives each run's own cross-attention output `refs[i]` on the
    inputs `data[i]` = (X, E) that run sees while drawing its concept; plus `reg` x how far the captions without a
    token (their Gram G_reg) move from the first guess. Returns (targets, relative output error first, last)."""
    rows = {k: T[k][free].float().clone().requires_grad_(True) for k in T}
    opt = torch.optim.Adam(rows.values(), lr=lr)
    C_tgt, M, G = maps["C_tgt"], maps["M"], maps["G_reg"]

    def weights():
        out = {}
        for k in T:
            t = T[k].float().clone()
            t[free] = rows[k]
            out[k] = W0[k] + (t.T - W0[k] @ C_tgt.T) @ M      # eq. 4, linear in the targets
        return out

    def output_error(W):
        return sum(((_attend(X, E, kept[0], W["to_k"], W["to_v"], kept[1], kept[2], heads) - refs[i]) ** 2).mean()
                   / refs[i].var() for i, (X, E) in data.items()) / len(data)
    with torch.no_grad():
        W_first = weights()
        first = float(output_error(W_first))
    for _ in range(iters):
        W = weights()
        moved = sum((((W[k] - W_first[k]) @ G) * (W[k] - W_first[k])).sum() / ((W0[k] @ G) * W0[k]).sum() for k in W)
        loss = output_error(W) + reg * moved
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(output_error(weights()))
    out = {k: T[k].clone() for k in T}
    for k in out:
        out[k][free] = rows[k].detach().to(out[k])
    return out, first, last


def carry_targets(pipe, states: list[dict], base: dict, taken: int, T: dict, owner, concept_prompts: list[list[str]],
                  maps: dict) -> tuple[dict, dict]:
    """K/V targets of every run but `taken` carried into its q/out frame: the closed-form first guess
    (`_into_frame`), then `_fit_targets` on the cross-attention inputs each run sees while drawing its concept
    (16 images per run, conditional branch). Returns (targets, {"carry_error_first", "carry_error_last"}: the
    relative output error, mean over layers)."""
    layers = sorted({n.rsplit(".", 2)[0] for n in T})
    data = {}
    for i, st in enumerate(states):
        with _state(pipe, base, st):
            data[i] = attention_inputs(pipe, layers, concept_prompts[i])
    free = torch.as_tensor(owner != taken)
    errs = []
    for a in layers:
        heads = pipe.unet.get_submodule(a).heads
        qo = lambda i: [states[i].get(f"{a}.{n}", base.get(f"{a}.{n}")).float().cpu()
                        for n in ("to_q.weight", "to_out.0.weight", "to_out.0.bias")]
        kv = lambda i: [states[i].get(f"{a}.{n}", base.get(f"{a}.{n}")).float().cpu() for n in ("to_k.weight", "to_v.weight")]
        t = {k: T[f"{a}.{k}.weight"] for k in ("to_k", "to_v")}
        for i in sorted(set(owner.tolist()) - {taken}):
            X = data[i][a][0].reshape(-1, data[i][a][0].shape[-1]).double()
            for k in t:
                t[k] = _into_frame(k, t[k], torch.as_tensor(owner == i), qo(i), qo(taken), X.T @ X / len(X), heads)
        with torch.no_grad():
            refs = {i: _attend(X, E, qo(i)[0], *kv(i), *qo(i)[1:], heads) for i, (X, E) in
                    ((i, d[a]) for i, d in data.items())}
        W0 = {k: base[f"{a}.{k}.weight"].float().cpu() for k in t}
        t, first, last = _fit_targets(t, free, W0, qo(taken), {i: d[a] for i, d in data.items()}, refs, maps, heads)
        errs.append((first, last))
        for k in t:
            T[f"{a}.{k}.weight"] = t[k]
    return T, {"carry_error_first": float(np.mean([e[0] for e in errs])),
               "carry_error_last": float(np.mean([e[1] for e in errs]))}


def merge(pipe, runs: list[Path], reg_prompts: list[str], reg_padding: bool = True,
          qo_from: int | None = None) -> tuple[list[str], dict]:
    """Merge Custom Diffusion runs trained separately on the same base: tokens renamed <new1>, <new2>, ... in
    order, each K/V matrix solved in closed form so every concept's prompts map as its own run mapped them
    while regularisation prompts change as little as possible. Runs that trained all of cross-attention
    (--params xattn) are allowed: the q/out of run `qo_from` (default: the one that changed them most) are kept
    and the other runs' K/V targets carried into its frame (`carry_targets`). Changes `pipe`; returns (tokens, info)."""
    cfgs = [json.loads((Path(r) / CONFIG_NAME).read_text()) if (Path(r) / CONFIG_NAME).exists() else {} for r in runs]
    bases = {c.get("base") for c in cfgs if c}
    if len(bases) > 1:
        raise DifflabError(f"cannot merge runs made on different base models: {sorted(map(str, bases))}")
    loaded = [read_weights(Path(r)) for r in runs]
    names = sorted(set().union(*(set(s) for s, _ in loaded)))
    # eq. 4 constrains what K/V make of text features; queries and the output projection see image features and
    # have no closed-form merge (the paper merges K/V only). Measured on heart + moon (docs/BENCHMARKS.md): adding
    # both runs' q/out changes, heart 1.00 -> 0.47; RegMean on q/out (Jin et al. 2023), moon 0.94 -> 0.41 (the moon
    # needs q, k, v and out together); one run's q/out kept as trained, heart 0.88 -> 0.50. So one run's q/out are
    # kept and every other run's K/V targets are carried into that frame (`carry_targets`) before eq. 4.
    kv = [n for n in names if ".to_k." in n or ".to_v." in n]
    own = {n: [i for i, (st, _) in enumerate(loaded) if n in st] for n in names if n not in kv}
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in names}
    if len(base) != len(names):
        raise DifflabError("the runs were made for another model: some of their layers are not in this UNet")
    # each run's concept, renamed to its merged token
    tokens, concept_prompts = [], []
    for i, ((_, toks), cfg) in enumerate(zip(loaded, cfgs)):
        if len(toks) != 1:
            raise DifflabError(f"{runs[i]} has {len(toks)} tokens; merge takes single-concept runs")
        old, emb = next(iter(toks.items()))
        new = f"<new{i + 1}>"
        add_tokens(pipe, [new], init={new: emb})
        tokens.append(new)
        cls = cfg.get("class_prompt", "a shape")
        noun = cls.split()[-1]
        concept_prompts.append([f"{new} {noun}", cls.replace(noun, f"{new} {noun}")])
    # The official code keeps regularisation rows through the end token only; the padding positions after it
    # carry the prompt too (a causal encoder) and cross-attention reads them, so by default they are kept as well
    # (on the shapes model this is what keeps prompts without the new token from drifting; docs/BENCHMARKS.md).
    # The same holds for the concept's own prompts: their padding rows carry the token, so they are targets too.
    C_reg = text_features(pipe, reg_prompts, padding=reg_padding).cpu()
    C_tgt_parts = [text_features(pipe, ps, from_token=t, padding=reg_padding).cpu()
                   for t, ps in zip(tokens, concept_prompts)]
    C_all = torch.cat(C_tgt_parts)
    owner_all = np.concatenate([[i] * len(p) for i, p in enumerate(C_tgt_parts)])
    # shared words ("a" before the token) and successive padding positions give identical or nearly identical
    # rows, which make D C_tgt^T singular: keep a row only if >= 10 % of it is a new direction (the official code
    # drops exact duplicates only; at 1 % the shapes model's 64-dim space filled with 53 constraints and prompts
    # without the tokens drifted 19 points, at 10 % 15 constraints keep both concepts: docs/BENCHMARKS.md)
    keep = _independent_rows(C_all.double())
    C_tgt, owner = C_all[keep], owner_all[keep]
    residual = 0.0
    params = dict(pipe.unet.named_parameters())
    taken, solved, carry = None, {}, {}
    if own:   # keep one run's q/out (qo_from, or the run that changed them most); carry the others into its frame
        change = [sum(float((st[n].double() - base[n].double()).norm() ** 2 / base[n].double().norm() ** 2)
                      for n in own if n in st) for st, _ in loaded]
        taken = qo_from if qo_from is not None else int(np.argmax(change))
        if not 0 <= taken < len(runs):
            raise DifflabError(f"qo_from {taken} is not a run index (0 .. {len(runs) - 1})")
        solved = {n: loaded[taken][0].get(n, base[n]) for n in own}
    M = eq4_map(C_reg, C_tgt)
    T = {n: torch.stack([loaded[o][0][n].double() @ c.double() for o, c in zip(owner, C_tgt)]) for n in kv}
    if taken is not None:
        maps = {"C_tgt": C_tgt.float(), "M": M.float(), "G_reg": (C_reg.double().T @ C_reg.double() / len(C_reg)).float()}
        T, carry = carry_targets(pipe, [st for st, _ in loaded], base, taken, T, owner, concept_prompts, maps)
    with torch.no_grad():
        for n in own:
            params[n].copy_(solved[n].to(params[n]))
        for n in kv:
            W = merge_matrix(base[n].cpu(), C_reg, C_tgt, T[n], M)
            residual = max(residual, float((W.double() @ C_tgt.double().T - T[n].T.double()).abs().max()
                                           / T[n].abs().max()))
            params[n].copy_(W.to(params[n]))
    return tokens, {"constraint_residual": residual, "constraints": len(keep), "merged_layers": len(kv),
                    "taken_layers": len(own), "reg_rows": len(C_reg),
                    "qo_from": None if taken is None else str(runs[taken]), **carry}


def merge_runs(model, runs: list[Path], out: Path, reg_prompts: list[str] | None = None,
               evaluate: bool | None = None, qo_from: int | None = None) -> dict:
    """Merge single-concept runs in closed form into `out` (only the changed K/V matrices are saved). On the
    shapes model, when the runs' concept images can still be read, metrics.json also gets the oracle-judged
    rates of every merged concept and the drift, as a customize run's does."""
    from difflab.core.runs import output_folder, write_metrics
    from difflab.models import load_pipeline
    pipe = load_pipeline(model)
    if reg_prompts is None:   # the base model's own captions: what the merge must leave alone
        reg_prompts = default_reg_prompts()
    tokens, info = merge(pipe, runs, reg_prompts, qo_from=qo_from)
    cfgs = [json.loads((Path(r) / CONFIG_NAME).read_text()) for r in runs]
    with output_folder(Path(out)) as tmp:
        save_weights(pipe, tmp, tokens, "xattn" if info["taken_layers"] else "xattn_kv", base=str(model),
                     extra={"class_prompt": cfgs[0].get("class_prompt"), "merged_from": [str(r) for r in runs]})
        values = [concept_value(Concept(**c["concepts"][0])) if c.get("concepts") else None for c in cfgs]
        if (evaluate if evaluate is not None else str(model) == "shapes") and all(values):
            info.update(evaluate_concepts(pipe, load_pipeline(model), tokens, values))
        write_metrics(tmp, info)
    return {"tokens": tokens, **info}
