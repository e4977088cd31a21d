"""Run by test_multi_process_training under torchrun: two CPU processes train one regression together."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_core import _regression  # noqa: E402

from difflab.core.trainer import TrainConfig, train  # noqa: E402

torch.set_num_threads(1)
lin, batch_fn, loss_fn = _regression()
hist = train(dict(lin.named_parameters()), loss_fn, batch_fn,
             TrainConfig(steps=60, lr=5e-2, log_every=10, progress=False), modules=[lin])
import torch.distributed as dist  # noqa: E402
w = lin.weight.detach().clone()
others = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(others, w)
assert dist.get_world_size() == 2
assert all(torch.equal(o, others[0]) for o in others), "ranks diverged: gradients were not averaged"
assert hist["loss"][-1] < 0.05 * hist["loss"][0]
if dist.get_rank() == 0:
    print("DDP-OK", w.tolist())
dist.barrier()   # leave together: a rank that exits first tears down the store the other still uses
dist.destroy_process_group()
