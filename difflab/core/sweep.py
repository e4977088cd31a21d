"""The one evaluation loop: apply a function to every item of a dataset in batches, on one process or many.

Training has `core.trainer.train`; passes that only measure (a loss per training image, a Fisher accumulated over
the training set) use `sweep`. Under `accelerate launch` each process takes every world-th batch and the
results are gathered back in index order, so a sweep over a large training set spreads over many GPUs with no
change to the caller. A function must make its results depend on the item indices only (seed any noise by the
index), never on the batch or process it lands in: then the answer is the same however the sweep is split.
"""
from __future__ import annotations

from typing import Callable

import torch


def sweep(fn: Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]], n: int, batch_size: int,
          reduce: str = "cat", desc: str = "sweep", progress: bool = True):
    """`fn(indices)` over range(n) in batches of `batch_size` indices.

    reduce="cat": fn returns one row per index; the result is those rows for all n items, in order.
    reduce="sum": fn returns a dict of tensors; the result is their sum over all batches (and processes).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    world, rank = state.num_processes, state.process_index
    starts = list(range(0, n, batch_size))[rank::world]
    results = []
    total: dict[str, torch.Tensor] = {}
    for s in tqdm(starts, desc=desc, disable=not (progress and state.is_local_main_process), mininterval=1.0):
        idx = torch.arange(s, min(s + batch_size, n))
        out = fn(idx)
        if reduce == "sum":
            for k, v in out.items():
                total[k] = total[k] + v.detach() if k in total else v.detach().clone()
        elif reduce == "cat":
            results.append((s, out.detach().cpu()))
        else:
            raise ValueError(f"reduce must be 'cat' or 'sum', not {reduce!r}")
    if reduce == "sum":
        if world > 1:
            from accelerate.utils import reduce as acc_reduce
            total = {k: acc_reduce(v.to(state.device), reduction="sum").cpu() for k, v in total.items()}
        return {k: v.cpu() for k, v in total.items()}
    if world > 1:
        from accelerate.utils import gather_object
        results = gather_object(results)
    results.sort(key=lambda r: r[0])
    return torch.cat([r[1] for r in results]) if results else torch.empty(0)
