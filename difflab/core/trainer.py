"""The one training loop every difflab method uses.

Methods differ in their loss and in which parameters train, never in the loop: a method hands `train` its
modules, the parameters to optimise, a `batch_fn(step)` and a `loss_fn(batch)`. The loop is accelerate-based
(mixed precision, gradient accumulation, `accelerate launch` for many GPUs), keeps an optional EMA of the
trained parameters, checkpoints to safetensors (no pickle anywhere) and resumes from the last checkpoint
exactly: data are a function of the step, so step N sees the same batch in a resumed run as in an unbroken one.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from difflab.core.runs import atomic_write_json


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say); the message says what to change."""


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    lr_by_param: dict = field(default_factory=dict)   # parameter name -> its own base lr (others use `lr`)
    optimizer: str = "adamw"            # "adamw", or "sgd" (plain steps: unlearning's preconditioned ascent)
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"       # "constant" or "cosine" (after warmup)
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"         # "no", "fp16" or "bf16", as accelerate names them
    ema_decay: float | None = None      # keep an EMA of the trained parameters (used for the final weights)
    checkpoint_every: int = 0           # optimizer steps between checkpoints; 0 = only at the end
    log_every: int = 50
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    deterministic: bool = False         # on CUDA: deterministic kernels (see `deterministic_kernels`)


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return 1.0


@contextmanager
def deterministic_kernels(on: bool = True):
    """Deterministic CUDA kernels while the block runs. CUDA's defaults (atomics in the backward of convolutions,
    upsampling and attention) make two runs of the same training differ: on an H100, two 4-step retrainings of the
    gold standard's small UNet differed by up to 1.5e-3 per weight (L2 0.004), against 4.7e-3 (L2 0.32) for
    removing 5 of its 100 images; with these settings they were bit-identical (docs/BENCHMARKS.md). Off by default:
    it costs speed, and on the CPU difflab's runs are already reproducible."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS's condition for reproducible results
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)   # (ops with no deterministic kernel warn, not fail)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state to tensors (safetensors) plus JSON-able scalars."""
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars["state"].setdefault(str(idx), {})[k] = v
    return tensors, scalars


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for idx, st in scalars["state"].items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def train(
    params: dict[str, torch.nn.Parameter],
    loss_fn: Callable[[object], tuple[torch.Tensor, dict[str, float]]],
    batch_fn: Callable[[int], object],
    cfg: TrainConfig,
    out: Path | None = None,
    modules: Iterable[torch.nn.Module] = (),
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Optimise `params` (name -> parameter) to minimise `loss_fn(batch_fn(i))` for `cfg.steps` steps.

    `modules` are put in train mode and on accelerate's device; tensors in a batch are moved there too.
    Under `accelerate launch` every process draws its own batches (index i * num_processes + rank) and the
    gradients of `params` are averaged across processes before clipping, so the closures in `loss_fn` can use
    the plain modules (no DDP wrapper to thread through). With `out` set, checkpoints go to
    `out/checkpoints/step-N` and a rerun resumes from the latest one. Returns the logged history; with
    `cfg.ema_decay` the EMA weights are copied into `params` at the end.
    """
    from accelerate import Accelerator
    from accelerate.utils import send_to_device, set_seed
    from tqdm.auto import tqdm

    from accelerate.state import AcceleratorState, GradientState
    # One process may run several trainings with different settings (a method's stages, the tests): start each
    # from fresh accelerate state, keeping the distributed set-up (PartialState) that `accelerate launch` made.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # cpu=True where there is no accelerator: torchrun/accelerate launch then runs multi-process on CPUs (gloo)
    no_accel = not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=no_accel)
    set_seed(cfg.seed)
    names = list(params)
    plist = [params[n] for n in names]
    by_lr: dict[float, list] = {}   # one optimizer group per distinct lr (foreach kernels work per group)
    for n, p in zip(names, plist):
        by_lr.setdefault(cfg.lr_by_param.get(n, cfg.lr), []).append(p)
    groups = [{"params": ps, "base_lr": lr} for lr, ps in by_lr.items()]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adamw' or 'sgd'")
    # train on accelerate's device, and put every module back where it was afterwards (on error too): the
    # method's code after training (evaluation, saving) then runs where the caller placed the model
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    modules = [m.to(acc.device) for m in modules]
    held = ExitStack()   # settings that hold while the loop runs
    try:
        opt = acc.prepare(opt)   # the wrapper applies the fp16 grad scaler and skips steps while accumulating
        world, rank = acc.num_processes, acc.process_index
        ema = {n: p.detach().clone() for n, p in zip(names, plist)} if cfg.ema_decay else None

        start, history = 0, {"step": [], "loss": []}
        ck = latest_checkpoint(out) if out is not None else None
        if ck is not None:
            w = load_file(ck / "params.safetensors")
            with torch.no_grad():
                for n, p in zip(names, plist):
                    p.copy_(w[n])
            if ema is not None:
                e = load_file(ck / "ema.safetensors")
                ema = {n: e[n].to(p.device) for n, p in zip(names, plist)}   # (checkpoints load on the CPU)
            meta = json.loads((ck / "state.json").read_text())
            _load_optimizer(opt.optimizer if hasattr(opt, "optimizer") else opt,
                            load_file(ck / "optimizer.safetensors"), meta["optimizer"])
            start, history = meta["step"], meta["history"]

        for m in modules:
            m.train()
        held.enter_context(deterministic_kernels(cfg.deterministic and acc.device.type == "cuda"))
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.desc,
                   disable=not (cfg.progress and acc.is_local_main_process), mininterval=1.0)
        t0, running = time.time(), []
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * _lr_factor(cfg, step)
            for micro in range(cfg.grad_accum):   # accelerate skips opt.step until the last micro-batch
                with acc.accumulate(*modules):
                    batch = send_to_device(batch_fn((step * cfg.grad_accum + micro) * world + rank), acc.device)
                    with acc.autocast():
                        loss, logs = loss_fn(batch)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"{cfg.desc}: the loss became {loss.item()} at step {step}; "
                                            f"lower the learning rate (now {cfg.lr:g}) or use mixed_precision='no'")
                    acc.backward(loss)
                    if acc.sync_gradients and world > 1:
                        for p in plist:
                            if p.grad is not None:
                                p.grad = acc.reduce(p.grad, reduction="mean")
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(plist, cfg.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            if ema is not None:
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for n, p in zip(names, plist):
                        ema[n].lerp_(p.detach(), 1 - d)
            running.append(loss.item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                mean = sum(running) / len(running)
                running = []
                history["step"].append(step + 1)
                history["loss"].append(mean)
                for k, v in logs.items():
                    history.setdefault(k, []).append(float(v))
                bar.set_postfix(loss=f"{mean:.4f}")
                if on_log:
                    on_log(step + 1, {"loss": mean, **logs, "sec": time.time() - t0})
            # checkpoint on schedule and at the end (so a finished run can be extended with more steps)
            if out is not None and cfg.checkpoint_every and acc.is_main_process \
                    and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(out, step + 1, names, plist, ema, opt, history)
        bar.close()
        if ema is not None:
            with torch.no_grad():
                for n, p in zip(names, plist):
                    p.copy_(ema[n])
        acc.wait_for_everyone()
        return history
    finally:
        held.close()
        for m, home in zip(modules, homes):
            m.to(home)


def save_checkpoint(out: Path, step: int, names, plist, ema, opt, history, keep: int = 2) -> Path:
    """Write out/checkpoints/step-N atomically (a temp folder renamed into place); keep the last `keep`."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir(exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in zip(names, plist)}, tmp / "params.safetensors")
    if ema is not None:
        save_file({n: t.contiguous() for n, t in ema.items()}, tmp / "ema.safetensors")
    tensors, scalars = _optimizer_tensors(opt.optimizer if hasattr(opt, "optimizer") else opt)
    save_file(tensors, tmp / "optimizer.safetensors")
    atomic_write_json(tmp / "state.json", {"step": step, "history": history, "optimizer": scalars})
    final = root / f"step-{step}"
    tmp.rename(final)
    for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return final


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
