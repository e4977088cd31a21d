"""Custom Diffusion (Kumari, Zhang, Zhang, Shechtman, Zhu, CVPR 2023): teach a model new concepts.

Fine-tune only the cross-attention key/value projections W_k, W_v of the UNet (they read the text) plus the
embedding row of one modifier token V* per concept ("<new1>"), on a few concept images and, 1:1, class images
the base model generates from the class prompt (prior preservation). The loss is the masked denoising loss

    L = E || eps - eps_theta(x_t, t, c(V* class)) ||^2_mask  +  lambda E || eps - eps_theta(x_t', t, c(class)) ||^2

with Custom Diffusion's random-rescale augmentation (core/augment.py). Concepts trained separately are merged
by the closed-form constrained least squares of eq. (4) (`difflab.merge`).
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
    cuda_graphs: bool = True          # on a GPU, replay the UNet's forward and backward as CUDA graphs (core/graphs.py)
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


def regularisation_prompts(c: Concept, cfg: CustomizeConfig) -> list[str]:
    """The prompts of a concept's class images, image i from prompt i % len. The paper's regularisation images are
    retrieved for the class name, each with its own caption: here the class prompt makes every other class image
    and the --reg-prompts captions the rest."""
    return [q for r in cfg.reg_prompts for q in (c.class_prompt, r)] or [c.class_prompt]


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
    if cache is not None:   # written whole, then renamed: processes sharing a cache never read half a file
        from difflab.core.runs import atomic_path
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            save_file({"z": z.contiguous()}, tmp)
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
    class_prompts = [regularisation_prompts(c, cfg) for c in concepts]
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
    from difflab.core.graphs import GraphedUNet
    unet = GraphedUNet(pipe.unet, enabled=cfg.cuda_graphs)   # the plain UNet on the CPU
    frozen_text = {}   # embeddings of prompts without a token: fixed while only the token rows train

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
        c, add = conditioning.encode_deduplicated(pipe, texts + ctexts, lambda t: any(tk in t for tk in tokens),
                                                  cache=frozen_text)
        n = len(texts)
        x0 = torch.cat([z, zc.to(z)])
        per = diffusion_loss(unet, sched, x0, c, mask=torch.cat([m, torch.ones_like(m)]).to(z),
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


# --- runs: train into a folder, measured on the shapes world -----------------------------------------
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
