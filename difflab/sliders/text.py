"""Concept Sliders from text (Gandikota et al. 2024): a LoRA that moves images of `target` from the `negative`
pole towards the `positive` one, usable at positive and negative scales.

    eps*(x_t, c_t) <- eps(x_t, c_n) + eta [eps(x_t, c_+) - eps(x_t, c_-)]        (paper eq. 8, one attribute)

eps* is the model with the LoRA on, eps the frozen model, c_t the target prompt, c_n the neutral one (default:
the target), eta the guidance scale of the edit (action "erase": -eta). With a preservation set P (`attributes`),
each step inserts one attribute p (or none) into all four prompts, so the edit is learnt at fixed p (paper eq. 8's
sum); `nouns` extends the set along the subject: each step also puts one noun (or none) in place of all four
prompts' last word ("a large shape" -> "a large circle"), so the slider sees the subjects it must keep. x_t comes
as in the official code: a partial DDIM rollout from noise with the LoRA on (classifier-free guidance 3, negative
prompt as the unconditional), stopped at a random step, so training sees the states the slider itself produces. Trained at
scale +1 only; negative scales extrapolate.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.errors import DifflabError
from difflab.sliders.lora import add_sliders, save_slider, trainable_flags

ADAPTER = "text_slider"


@dataclass
class TextSliderConfig:
    rank: int = 4                 # official: rank 4, alpha 1
    alpha: float = 1.0
    targets: str = "noxattn"      # official: self-attention q/k/v/out
    init: str = "zero"            # official: standard LoRA (B = 0)
    eta: float = 2.0              # official default 1, examples 4
    action: str = "enhance"       # or "erase"
    steps: int = 500
    lr: float = 2e-4              # official AdamW 2e-4 constant
    batch_size: int = 4
    rollout_steps: int = 25       # official: 50-step DDIM, t_k ~ U{1..49}
    rollout_guidance: float = 3.0
    attributes: tuple[str, ...] = ()   # preservation set P: each step inserts one (or none) into all four prompts
    nouns: tuple[str, ...] = ()        # and one (or none) replaces their last word (difflab's extension of P)
    seed: int = 0
    progress: bool = True


def with_attribute(prompt: str, attribute: str, noun: str = "") -> str:
    """Insert an attribute before the prompt's last word ("a large shape", "red" -> "a large red shape") and, with
    a noun, replace that word ("circle" -> "a large red circle"); the official code prefixes the attribute
    ("red, a large shape"), which reads worse to a small text encoder."""
    head, _, last = prompt.rpartition(" ")
    words = [w for w in (head, attribute, noun or last) if w]
    return " ".join(words)


@torch.no_grad()
def rollout(unet, sched, z: torch.Tensor, k: int, c_cond: torch.Tensor, c_uncond: torch.Tensor,
            guidance: float) -> torch.Tensor:
    """k DDIM steps from z (classifier-free guidance), the denoising loop written out."""
    for t in sched.timesteps[:k]:
        eps_u, eps_c = unet(torch.cat([z, z]), t, torch.cat([c_uncond, c_cond])).sample.chunk(2)
        z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
    return z


def train_text_slider(model, target: str, positive: str, negative: str, out: str | Path,
                      neutral: str | None = None, cfg: TextSliderConfig | None = None) -> dict:
    """Train the slider and write OUT (a slider folder: LoRA + slider_config.json, strip.png, metrics.json)."""
    from diffusers import DDIMScheduler

    from difflab.core.conditioning import encode, pipeline_modules
    from difflab.core.runs import atomic_write_json, output_folder, write_metrics
    from difflab.core.trainer import TrainConfig, train
    from difflab.models import load_pipeline
    cfg = cfg or TextSliderConfig()
    neutral = neutral or target
    for name, p in (("target", target), ("positive", positive), ("negative", negative), ("neutral", neutral)):
        if not p or not p.strip():
            raise DifflabError(f"the {name} prompt is empty")
    if cfg.action not in ("enhance", "erase"):
        raise DifflabError(f"action {cfg.action!r}: enhance or erase")
    t0 = time.time()
    pipe = load_pipeline(model) if isinstance(model, (str, Path)) else model
    unet = pipe.unet
    for m in (unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.rollout_steps)
    attrs = [""] + [a.strip() for a in cfg.attributes if a.strip()]
    nouns = [""] + [a.strip() for a in cfg.nouns if a.strip()]
    with torch.no_grad():   # per (attribute, noun): (c_t, c_+, c_-, c_n)
        conds = [tuple(encode(pipe, [with_attribute(p, a, n)])[0] for p in (target, positive, negative, neutral))
                 for a in attrs for n in nouns]
    sliders = add_sliders(unet, [ADAPTER], cfg.rank, cfg.alpha, cfg.targets, cfg.init, cfg.seed)
    trainable_flags(unet, sliders)
    eta = cfg.eta if cfg.action == "enhance" else -cfg.eta
    shape = (cfg.batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def batch_fn(step):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        k = int(torch.randint(1, cfg.rollout_steps, (1,), generator=g))
        a = int(torch.randint(len(conds), (1,), generator=g))   # (one draw: with neither set, the same stream)
        return {"z": torch.randn(shape, generator=g) * sched.init_noise_sigma, "k": k, "a": a}

    def loss_fn(b):
        B = b["z"].shape[0]
        c_t, c_p, c_m, c_n = (c.to(b["z"].device) for c in conds[b["a"]])   # train() may have moved the UNet
        rep = lambda c: c.expand(B, -1, -1)
        z_t = rollout(unet, sched, b["z"], b["k"], rep(c_t), rep(c_m), cfg.rollout_guidance)   # LoRA on
        t = sched.timesteps[b["k"]]
        with torch.no_grad():
            unet.disable_adapters()
            e_n, e_p, e_m = unet(torch.cat([z_t] * 3), t, torch.cat([rep(c_n), rep(c_p), rep(c_m)])).sample.chunk(3)
            unet.enable_adapters()
            trainable_flags(unet, sliders)
        pred = unet(z_t, t, rep(c_t)).sample
        return F.mse_loss(pred.float(), (e_n + eta * (e_p - e_m)).float()), {}

    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=0.0, seed=cfg.seed, max_grad_norm=None,
                     log_every=max(1, cfg.steps // 20), checkpoint_every=0, progress=cfg.progress,
                     desc="concept-slider")
    with output_folder(Path(out)) as tmp:
        hist = train(sliders[ADAPTER], loss_fn, batch_fn, tc, modules=pipeline_modules(pipe))
        unet.eval()
        t_train = time.time() - t0
        save_slider(pipe, ADAPTER, tmp, {"method": "concept-sliders-text", "target": target, "positive": positive,
                                         "negative": negative, "neutral": neutral, "eta": cfg.eta,
                                         "action": cfg.action, "base_model": str(model), "targets": cfg.targets,
                                         "attributes": list(attrs[1:]), "nouns": list(nouns[1:])})
        atomic_write_json(tmp / "config.json", {"config": asdict(cfg), "model": str(model), "target": target,
                                                "positive": positive, "negative": negative, "neutral": neutral})
        atomic_write_json(tmp / "history.json", hist)
        from difflab.report import sheet
        from difflab.sliders.evaluate import SCALES, strip_rows
        rows = strip_rows(pipe, ADAPTER, target, cfg.seed + 10_000)
        sheet(rows, [f"seed {cfg.seed + 10_000 + i}" for i in range(len(rows))],
              [f"{s:+g}" for s in SCALES]).save(tmp / "strip.png")
        metrics = {"seconds_training": t_train, "final_loss": hist["loss"][-1]}
        if str(model) == "shapes":
            from difflab.models import load_oracle
            oracle = load_oracle()
            metrics.update(measure_ordinal(pipe, ADAPTER, target, seed=cfg.seed + 20_000, oracle=oracle))
            named = measure_ordinal(pipe, ADAPTER, NAMED_PROMPTS, seed=cfg.seed + 20_000, oracle=oracle)
            metrics.update({f"named_{k}": v for k, v in named.items()})
        pipe.set_adapters([ADAPTER], [0.0])
        return write_metrics(tmp, metrics)


# prompts that name a trained shape and colour: "unchanged" is then defined by the prompt, not by how the
# oracle reads an ambiguous "a shape" image (whose shape it calls differently at scale +-0.25 for 12-16 % of
# seeds, docs/BENCHMARKS.md)
NAMED_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a purple cross",
                 "a orange diamond", "a blue circle", "a red star")


def measure_ordinal(pipe, name: str, prompts, factor: str = "size", order=("small", "medium", "large"),
                    seed: int = 0, n: int = 32, scales=(-2.0, -1.0, 0.0, 1.0, 2.0), oracle=None,
                    start: int = 0, end: int | None = None) -> dict:
    """How an ordered factor (size by default) follows the slider's scale, by the oracle over n images (n divided
    evenly among the prompts, seeds from `seed`, one per image; the slider applied from denoising step `start`,
    and before step `end` if given):
    the mean level per scale and whether it is monotone; the share of images whose level at the top scale exceeds
    the bottom one; the share whose shape and color are the same at every scale as at scale 0, and per scale;
    where every prompt names a shape and a color, the share drawn as the prompt says, per scale."""
    from difflab.models import load_oracle
    from difflab.sliders.evaluate import generate_at
    from difflab.world.dataset import parse_prompt
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per = max(1, n // len(prompts))
    oracle = oracle or load_oracle()
    # each prompt its own seeds (prompt k: seed + k * per ...): the initial noise sets most of an image's layout and
    # size, so prompts sharing seeds would make n images only `per` independent draws
    preds = [[y for k, p in enumerate(prompts)
              for y in oracle.predict(generate_at(pipe, [name], [s], p, per, seed + k * per, start, end=end))]
             for s in scales]
    n = len(preds[0])
    level = np.array([[order.index(p[factor]) for p in ps] for ps in preds])   # (scales, n)
    means = level.mean(1)
    zero = list(scales).index(0.0) if 0.0 in scales else len(scales) // 2
    keep = lambda a, b: a["shape"] == b["shape"] and a["color"] == b["color"]
    same = np.array([[keep(preds[j][i], preds[zero][i]) for i in range(n)] for j in range(len(scales))])
    label = lambda v: dict(zip([f"{s:+g}" for s in scales], np.round(v, 4).tolist()))
    out = {f"{factor}_mean_by_scale": label(means), f"{factor}_monotone": bool(np.all(np.diff(means) >= 0)),
           f"{factor}_top_gt_bottom": float(np.mean(level[-1] > level[0])),
           "shape_color_unchanged": float(same.all(0).mean()), "shape_color_unchanged_by_scale": label(same.mean(1)),
           "n": n, "start": start, "end": end}
    asked = [parse_prompt(p) for p in prompts for _ in range(per)]
    if all({"shape", "color"} <= set(a) for a in asked):
        ok = [[y["shape"] == a["shape"] and y["color"] == a["color"] for y, a in zip(ps, asked)] for ps in preds]
        out["shape_color_as_prompted_by_scale"] = label(np.mean(ok, 1))
    return out
