"""Custom Diffusion (Kumari, Zhang, Zhang, Shechtman, Zhu, CVPR 2023): teach a model new concepts.

Fine-tune only the cross-attention key/value projections W_k, W_v of the UNet (they read the text) plus the
embedding row of one modifier token V* per concept ("<new1>"), on a few concept images and, 1:1, class images
the base model generates from the class prompt (prior preservation). The loss is the masked denoising loss

    L = E || eps - eps_theta(x_t, t, c(V* class)) ||^2_mask  +  lambda E || eps - eps_theta(x_t', t, c(class)) ||^2

with Custom Diffusion's random-rescale augmentation (core/augment.py). Concepts trained separately are merged
by the closed-form constrained least squares of eq. (4) (`merge`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflab.core import conditioning
from difflab.errors import DifflabError

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"   # diffusers' save_attn_procs name
CONFIG_NAME = "adapter_config.json"
RARE_WORDS = ("ktn", "pll", "ucd", "sks")   # rows new tokens start from, as in the official code


@dataclass
class Concept:
    images: str                      # a folder of images (metadata.jsonl optional)
    token: str = "<new1>"
    class_prompt: str = "a shape"
    instance_prompt: str | None = None   # default: the class prompt with the token before its noun
    captions: bool = False           # each image's own caption from metadata.jsonl (each must hold the token)

    def prompt(self) -> str:
        if self.instance_prompt:
            if self.token not in self.instance_prompt:
                raise DifflabError(f"the instance prompt {self.instance_prompt!r} does not contain {self.token}")
            return self.instance_prompt
        words = self.class_prompt.split()
        return " ".join(words[:-1] + [self.token, words[-1]])


@dataclass
class CustomizeConfig:
    steps: int = 250
    lr: float = 1e-4
    token_lr: float | None = None     # the modifier-token rows' own lr (None: `lr`, as the paper)
    batch_size: int = 4               # instance images per step (and as many class images)
    params: str = "xattn_kv"          # or "xattn": all of cross-attention
    num_class_images: int = 64
    reg_prompts: list[str] = field(default_factory=list)   # captions for half of the class images (the class
                                                           # prompt keeps the other half; captions go with them)
    prior_weight: float = 1.0
    feature_reg: float = 0.0          # weight of the K/V output change on regularisation captions (eq. 4's
                                      # objective as a penalty during training; 0 = off, as the paper)
    feature_reg_prompts: list[str] = field(default_factory=list)   # default: the shapes world's captions
    augment: bool = True
    class_steps: int = 25
    class_guidance: float = 5.0
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)


def shapes_recipe(**overrides) -> CustomizeConfig:
    """The settings that meet the single-concept bars on the shapes model (docs/BENCHMARKS.md, session 6); the
    CLI's defaults stay the paper's. A larger lr than the paper's (its lr teaches this 64-dim text space nothing), the
    token at its own lr, half of the class images from world captions, and the K/V output penalty, which is what
    keeps the larger lr from changing prompts without the token."""
    from difflab.world.dataset import captions
    kw = dict(steps=2000, lr=1e-3, token_lr=0.1, augment=False, reg_prompts=captions(64), num_class_images=128,
              feature_reg=0.03)
    return CustomizeConfig(**{**kw, **overrides})


# --- modifier tokens -----------------------------------------------------------------------------------------
def add_tokens(pipe, tokens: list[str], init: dict[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Add modifier tokens to every tokenizer/text encoder of the pipeline. A new row starts as the row of a rare
    word (RARE_WORDS, cycling) or, when `init` gives it, that embedding (a list of tensors for SDXL)."""
    ids: dict[str, list[int]] = {t: [] for t in tokens}
    for k, (tok, te) in enumerate(conditioning.tokenizers_and_encoders(pipe)):
        for t in tokens:
            if t in tok.get_vocab() and t not in tok.get_added_vocab():
                raise DifflabError(f"token {t} is already a word of this model's vocabulary; pick another (e.g. <new1>)")
        tok.add_tokens([t for t in tokens if t not in tok.get_added_vocab()])
        te.resize_token_embeddings(len(tok))
        emb = te.get_input_embeddings().weight
        with torch.no_grad():
            for i, t in enumerate(tokens):
                tid = tok.convert_tokens_to_ids(t)
                ids[t].append(tid)
                if init is not None and t in init:
                    src = init[t][k] if isinstance(init[t], (list, tuple)) else init[t]
                    emb[tid] = src.to(emb)
                else:
                    rare = tok(RARE_WORDS[i % len(RARE_WORDS)], add_special_tokens=False).input_ids
                    emb[tid] = emb[rare[0]]
    return ids


def token_embeddings(pipe, tokens: list[str]) -> dict[str, list[torch.Tensor]]:
    out = {t: [] for t in tokens}
    for tok, te in conditioning.tokenizers_and_encoders(pipe):
        w = te.get_input_embeddings().weight
        for t in tokens:
            out[t].append(w[tok.convert_tokens_to_ids(t)].detach().clone())
    return out


def _only_rows(weight: torch.nn.Parameter, rows: list[int]):
    """Gradient hook: only the given embedding rows learn (the last one included; see the reference's bug)."""
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    keep[rows] = 1
    on = {}   # the mask on the gradient's device, made once (train() may move the model after the hook is set)

    def hook(g):
        if g.device not in on:
            on[g.device] = keep.to(g.device)
        return g * on[g.device]
    return weight.register_hook(hook)


def detach_start_token(unet) -> list:
    """Detach K and V at text position 0 (the start token) in every cross-attention: the forward is unchanged,
    the start token's keys and values get no gradient (official code, sec. 'start-token detach')."""
    def hook(_m, _inp, out):
        return torch.cat([out[:, :1].detach(), out[:, 1:]], dim=1)
    return [m.register_forward_hook(hook) for n, m in unet.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))]


# --- weights: save in diffusers' format, load that, Adobe's delta.bin, apply --------------------------------------
def _kv_names(unet, params: str) -> list[str]:
    from difflab.core.params import select
    return list(select(unet, params))


def save_weights(pipe, folder: Path, tokens: list[str], params: str, base: str, extra: dict | None = None) -> None:
    """diffusers' Custom Diffusion layout: `…attn2.processor.to_k_custom_diffusion.weight` (full matrices) plus a
    `<token>.safetensors` per token; `adapter_config.json` records the base and the tokens."""
    from safetensors.torch import save_file
    folder = Path(folder)
    state, chosen = {}, set(_kv_names(pipe.unet, params))
    for name, p in pipe.unet.named_parameters():
        if name in chosen:
            layer, proj, kind = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1], name.rsplit(".", 2)[2]
            if proj == "0":   # to_out.0
                layer, proj = name.rsplit(".", 3)[0], "to_out_custom_diffusion.0"
            else:
                proj = f"{proj}_custom_diffusion"
            state[f"{layer}.processor.{proj}.{kind}"] = p.detach().float().contiguous()
    save_file(state, folder / WEIGHTS_NAME)
    for t, embs in token_embeddings(pipe, tokens).items():
        d = {t: embs[0].float().contiguous()}
        if len(embs) > 1:
            d[f"{t}.text_encoder_2"] = embs[1].float().contiguous()
        save_file(d, folder / f"{t}.safetensors")
    cfg = {"type": "custom_diffusion", "base": base, "tokens": tokens, "params": params,
           "cross_attention_dim": pipe.unet.config.cross_attention_dim, **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """(UNet parameter name -> matrix, token -> embeddings) from a diffusers-format folder or a delta.bin."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".bin" or (folder / "delta.bin").is_file():
        path = folder if folder.is_file() else folder / "delta.bin"
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DifflabError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from e
        if "unet" not in d:
            raise DifflabError(f"{path} is not an Adobe Custom Diffusion delta.bin (no 'unet' key)")
        toks = {t: (list(v) if isinstance(v, (list, tuple)) else [v]) for t, v in d.get("modifier_token", {}).items()}
        return dict(d["unet"]), toks
    wfile = folder / WEIGHTS_NAME
    if not wfile.is_file():
        raise DifflabError(f"{folder} holds no Custom Diffusion weights ({WEIGHTS_NAME} or delta.bin)")
    try:
        raw = load_file(wfile)
    except Exception as e:
        raise DifflabError(f"cannot read {wfile}: {str(e).splitlines()[0][:200]}") from e
    state = {}
    for k, v in raw.items():   # processor names -> the base layers they replace
        layer, _, rest = k.partition(".processor.")
        rest = rest.replace("to_out_custom_diffusion.0", "to_out.0").replace("_custom_diffusion", "")
        state[f"{layer}.{rest}"] = v
    toks = {}
    for f in folder.glob("*.safetensors"):
        if f.name == WEIGHTS_NAME:
            continue
        d = load_file(f)
        for t in [k for k in d if not k.endswith(".text_encoder_2")]:
            toks[t] = [d[t]] + ([d[f"{t}.text_encoder_2"]] if f"{t}.text_encoder_2" in d else [])
    return state, toks


def apply_weights(pipe, folder: Path, scale: float = 1.0) -> list[str]:
    """Really change the model: copy the matrices into to_k/to_v (W0 + scale (W - W0)) and add the tokens.
    (diffusers' `load_attn_procs` installs nothing for these files; see the reference.) Returns the tokens."""
    state, toks = read_weights(folder)
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for name, w in state.items():
            if name not in params:
                raise DifflabError(f"{folder} was made for another model: it has {name}, this UNet does not")
            if params[name].shape != w.shape:
                raise DifflabError(f"{folder} was made for a different base model: {name} is "
                                   f"{tuple(w.shape)} there, {tuple(params[name].shape)} here")
            p = params[name]
            p.copy_(p + scale * (w.to(p) - p))
    if toks:
        add_tokens(pipe, list(toks), init=toks)
    return list(toks)


# --- training ------------------------------------------------------------------------------------------------
def _load_concept_images(c: Concept, size: int) -> tuple[torch.Tensor, list[str]]:
    """The concept's images in [-1, 1] and each one's instance prompt (its caption with `captions`)."""
    from difflab.core.data import load_folder_images, load_image, read_metadata, text_of, to_pixels
    folder = Path(c.images)
    if not folder.is_dir():
        raise DifflabError(f"concept images {folder} is not a folder")
    if c.captions:
        recs = read_metadata(folder)
        texts = [text_of(r) for r in recs]
        missing = [r["file"] for r, t in zip(recs, texts) if c.token not in t]
        if missing:
            raise DifflabError(f"{len(missing)} captions in {folder}/metadata.jsonl lack {c.token} (e.g. {missing[0]})")
        return to_pixels(load_folder_images(folder, recs, size)), texts
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise DifflabError(f"{folder} holds no images (.png, .jpg, .jpeg, .webp)")
    return to_pixels([load_image(f, size) for f in files]), [c.prompt()] * len(files)


@torch.no_grad()
def class_latents(pipe, prompts: list[str], n: int, cfg: CustomizeConfig, cache: Path | None) -> torch.Tensor:
    """Latents of n images the base model generates, cycling through `prompts` (the regularisation set; the
    paper's retrieval service is gone). Image i has prompt prompts[i % len(prompts)]. Cached as safetensors."""
    from safetensors.torch import load_file, save_file

    from difflab.core.data import encode_latents, to_pixels
    from difflab.generate import generate_images
    if cache is not None and cache.exists():
        return load_file(cache)["z"]
    cycled = [prompts[i % len(prompts)] for i in range(n)]   # image i: prompt i % len, seed + i
    images, _ = generate_images(pipe, cycled, n=1, seed=cfg.seed + 1_000_000, steps=cfg.class_steps,
                                guidance=cfg.class_guidance, progress=cfg.progress)
    z = encode_latents(pipe.vae, to_pixels(images))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"z": z.contiguous()}, cache)
    return z


def train_concepts(pipe, concepts: list[Concept], cfg: CustomizeConfig, work: Path | None = None) -> dict:
    """Train one or several concepts jointly (each step draws every concept and its class images).
    Changes `pipe` in place; returns the loss history."""
    from difflab.core.augment import rescale_augment
    from difflab.core.diffusion import diffusion_loss
    from difflab.core.params import freeze_all_but, select
    from difflab.core.trainer import TrainConfig, train
    if len({c.token for c in concepts}) != len(concepts):
        raise DifflabError("each concept needs its own token (<new1>, <new2>, ...)")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data, prompts = zip(*[_load_concept_images(c, size) for c in concepts])
    # the paper's regularisation images are retrieved for the class name, each with its own caption: here the
    # class prompt makes every other class image and the --reg-prompts captions the rest
    class_prompts = [[q for r in cfg.reg_prompts for q in (c.class_prompt, r)] or [c.class_prompt] for c in concepts]
    z_class = [class_latents(pipe, cp, cfg.num_class_images, cfg, work / "class" / f"{i}.safetensors" if work else None)
               for i, cp in enumerate(class_prompts)]
    tokens = [c.token for c in concepts]
    ids = add_tokens(pipe, tokens)
    from diffusers import DDPMScheduler
    sched = DDPMScheduler.from_config(pipe.scheduler.config)

    params = {f"unet.{k}": v for k, v in select(pipe.unet, cfg.params).items()}
    hooks = []
    for k, (tok, te) in enumerate(conditioning.tokenizers_and_encoders(pipe)):
        emb = te.get_input_embeddings().weight
        params[f"text_encoder_{k}.embedding"] = emb
        hooks.append(_only_rows(emb, [ids[c.token][k] for c in concepts]))
    pipe.unet.requires_grad_(False)
    freeze_all_but(pipe.unet, select(pipe.unet, cfg.params))
    for _, te in conditioning.tokenizers_and_encoders(pipe):
        te.requires_grad_(False)
        te.get_input_embeddings().weight.requires_grad_(True)
    hooks += detach_start_token(pipe.unet)
    f = pipe.vae_scale_factor
    feature_penalty = kv_output_penalty(pipe, params, cfg) if cfg.feature_reg else None

    def batch_fn(i):
        rng = np.random.default_rng([cfg.seed, i])
        xs, masks, texts, zc, ctexts = [], [], [], [], []
        for c, x_all, p, z, cp in zip(concepts, data, prompts, z_class, class_prompts):
            for _ in range(cfg.batch_size):
                k = int(rng.integers(len(x_all)))
                x = x_all[k]
                if cfg.augment:
                    x, m, prefix = rescale_augment(x, rng, f)
                else:
                    m, prefix = torch.ones(1, size // f, size // f), ""
                xs.append(x)
                masks.append(m)
                texts.append(prefix + p[k])
                j = int(rng.integers(len(z)))
                zc.append(z[j])
                ctexts.append(cp[j % len(cp)])
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return torch.stack(xs), torch.stack(masks), texts, torch.stack(zc), ctexts, g

    def loss_fn(b):
        x, m, texts, zc, ctexts, g = b
        vae_w = next(pipe.vae.parameters())   # (train moves the pipeline: look its device up per step)
        with torch.no_grad():
            z = pipe.vae.encode(x.to(vae_w.device, vae_w.dtype)).latent_dist.sample(g).float()
            z = z * pipe.vae.config.scaling_factor
        c, add = conditioning.encode_deduplicated(pipe, texts + ctexts, lambda t: any(tk in t for tk in tokens))
        n = len(texts)
        x0 = torch.cat([z, zc.to(z)])
        per = diffusion_loss(pipe.unet, sched, x0, c, mask=torch.cat([m, torch.ones_like(m)]).to(z),
                             generator=g, added_cond_kwargs=add, reduction="none")
        inst, prior = per[:n].mean(), per[n:].mean()
        loss, logs = inst + cfg.prior_weight * prior, {"instance": inst.item(), "prior": prior.item()}
        if feature_penalty is not None:
            r = feature_penalty()
            loss, logs["feature_reg"] = loss + cfg.feature_reg * r, r.item()
        return loss, logs

    # no weight decay: AdamW would shrink every embedding row, and the saved adapter (new rows only) would no
    # longer reproduce the trained model exactly
    emb_lr = {n: cfg.token_lr for n in params if n.startswith("text_encoder_")} if cfg.token_lr else {}
    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, lr_by_param=emb_lr, seed=cfg.seed, progress=cfg.progress, desc="customize", weight_decay=0.0,
                     log_every=max(1, cfg.steps // 25), checkpoint_every=0)
    try:
        hist = train(params, loss_fn, batch_fn, tc, modules=conditioning.pipeline_modules(pipe))
    finally:
        for h in hooks:
            h.remove()
        pipe.unet.requires_grad_(False)
        for _, te in conditioning.tokenizers_and_encoders(pipe):
            te.requires_grad_(False)
    pipe.unet.eval()
    return hist


def kv_output_penalty(pipe, params: dict, cfg: CustomizeConfig):
    """A closure giving, averaged over the trained K/V matrices, ||(W - W0) C^T||_F^2 / ||W0 C^T||_F^2: how much
    they change what cross-attention reads from prompts without a new token (eq. 4's objective, as a penalty).

    C holds every position of the regularisation captions (start token and padding included: cross-attention
    reads them all). For keys the features are centred per caption: adding one vector to all of a caption's keys
    shifts every attention logit of a query by the same amount, which the softmax ignores, so only the change of
    the keys relative to each other counts. Only the d x d Gram matrices are kept: a few small matmuls per step."""
    prompts = cfg.feature_reg_prompts or default_reg_prompts()
    with torch.no_grad():
        H = conditioning.encode(pipe, prompts)[0].double()    # (captions, positions, d): what K/V read
    Hc = H - H.mean(1, keepdim=True)
    gram = {"to_k": torch.einsum("npd,npe->de", Hc, Hc), "to_v": torch.einsum("npd,npe->de", H, H)}
    mats = []   # (W, W0, G, ||W0 C^T||^2): the denominator is fixed, so it is computed once, not every step
    for n, p in params.items():
        for kind, G in gram.items():
            if n.endswith(f"attn2.{kind}.weight"):
                W0, G = p.detach().clone(), (G / len(H)).float()
                mats.append((p, W0, G, float(((W0 @ G) * W0).sum())))

    def penalty() -> torch.Tensor:
        terms = []
        for i, (W, W0, G, denom) in enumerate(mats):
            if W0.device != W.device:   # train() moved the model to its device: follow it, once
                mats[i] = (W, W0.to(W.device), G.to(W.device), denom)
                W0, G = mats[i][1], mats[i][2]
            dW = W - W0
            terms.append(((dW @ G) * dW).sum() / denom)
        return torch.stack(terms).mean()
    return penalty


def default_reg_prompts(n: int = 200) -> list[str]:
    """n distinct captions of the shapes model's training kind (`difflab world captions --n 200`): what a concept
    must leave alone. (Until session 6 the merge took the first 200 in sorted order: only blue and green ones.)"""
    from difflab.world.dataset import captions
    return captions(n)


# --- closed-form merge (eq. 4) -------------------------------------------------------------------------------
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


# --- runs: train / merge into a folder, measured on the shapes world -----------------------------------------
def concept_value(c: Concept) -> str | None:
    """The shapes-world shape a concept's images show (from their metadata.jsonl), if they are world images."""
    from collections import Counter
    meta = Path(c.images) / "metadata.jsonl"
    if not meta.is_file():
        return None
    shapes = [json.loads(line).get("factors", {}).get("shape") for line in meta.read_text().splitlines() if line]
    shapes = [s for s in shapes if s]
    return Counter(shapes).most_common(1)[0][0] if shapes else None


def evaluate_concepts(pipe, base_pipe, tokens: list[str], values: list[str], n: int = 8, seed: int = 50_000) -> dict:
    """Oracle-judged rates on the shapes model: each taught concept on "a <tok> shape" (4n images) and on
    "a {color} <tok> shape" (n per color), the base model on the same prompts, and joint accuracy on 18
    trained-concept prompts ("a {color} {shape}", n each) before and after. Seeds start at 50,000: no training
    image or class image uses them."""
    from difflab.generate import generate_images
    from difflab.models import load_oracle
    from difflab.world.dataset import parse_prompt
    from difflab.world.draw import FACTORS
    from difflab.world.oracle import judge
    oracle = load_oracle()
    colors = FACTORS["color"][0]
    out = {}

    def rate(p, prompts, aliases, k=n):
        imgs, recs = generate_images(p, prompts, n=k, seed=seed, progress=False)
        return judge(oracle.predict(imgs), [parse_prompt(r["prompt"], aliases) for r in recs])

    for tok, val in zip(tokens, values):
        aliases = {tok: val}
        plain = [f"a {tok} shape"]
        colored = [f"a {c} {tok} shape" for c in colors]
        for name, p in (("", pipe), ("base_", base_pipe)):
            r1, r2 = rate(p, plain, aliases, 4 * n), rate(p, colored, aliases)   # 4n and 6n images
            out[f"{name}{tok}_rate"] = r1["accuracy"]["shape"]
            out[f"{name}{tok}_color_prompts_rate"] = r2["accuracy"]["shape"]
            out[f"{name}{tok}_color_accuracy"] = r2["accuracy"]["color"]
    trained = [f"a {c} {s}" for c in colors[:3] for s in FACTORS["shape"][0]]
    out["drift_joint_before"] = rate(base_pipe, trained, {})["joint"]
    out["drift_joint_after"] = rate(pipe, trained, {})["joint"]
    return out


def customize(model, concepts: list[Concept], out: Path, cfg: CustomizeConfig | None = None,
              evaluate: bool | None = None) -> dict:
    """Train concepts jointly on `model` and write the run folder `out` (weights, config.json, metrics.json)."""
    import time

    from difflab.core.runs import atomic_write_json, output_folder, write_metrics
    from difflab.models import load_pipeline
    cfg = cfg or CustomizeConfig()
    pipe = load_pipeline(model)
    t0 = time.time()
    with output_folder(Path(out)) as tmp:
        hist = train_concepts(pipe, concepts, cfg, work=tmp)
        seconds = time.time() - t0
        tokens = [c.token for c in concepts]
        save_weights(pipe, tmp, tokens, cfg.params, base=str(model),
                     extra={"class_prompt": concepts[0].class_prompt, "concepts": [asdict(c) for c in concepts]})
        atomic_write_json(tmp / "config.json", {"model": str(model), "concepts": [asdict(c) for c in concepts],
                                                **asdict(cfg)})
        metrics = {"train_seconds": round(seconds, 1), "loss_first": hist["loss"][0], "loss_last": hist["loss"][-1]}
        values = [concept_value(c) for c in concepts]
        if (evaluate if evaluate is not None else str(model) == "shapes") and all(values):
            metrics.update(evaluate_concepts(pipe, load_pipeline(model), tokens, values))
        write_metrics(tmp, metrics)
    return metrics


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
