"""CUDA graphs for a UNet's forward and backward in a training step.

On the small models difflab trains (the shapes UNet: 8x8 latents), a GPU step is bound by the CPU dispatching
the UNet's forward and backward (about 2,900 leaf operator calls at batch 8, most of them a small kernel each, by
a CPU profile), not by the GPU running them. A CUDA graph records
those launches once and replays them with one call (`torch.cuda.make_graphed_callables`), gradients included:
the trained parameters' `.grad` and the gradient into `encoder_hidden_states` (which carries it on to the token
embeddings) come out as in eager mode. Everything outside the UNet (VAE, text encoder, loss, optimizer) stays eager.

Used where a graph can hold: a CUDA device, gradients on, the UNet in train mode, no autocast (fp32, difflab's
default), and inputs whose shapes recur (a fixed batch). One graph is recorded per input signature, up to
`max_graphs`; anything else runs eagerly, as does every call on the CPU, so `GraphedUNet(unet)` can stand in
for `unet` in `diffusion_loss` unconditionally.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


class _Forward(torch.nn.Module):
    """unet(x, t, c[, text_embeds, time_ids]) -> the prediction tensor (graphs take and return plain tensors)."""

    def __init__(self, unet, add_keys: tuple[str, ...]):
        super().__init__()
        self.unet, self.add_keys = unet, add_keys

    def forward(self, x, t, c, *add):
        kwargs = {"added_cond_kwargs": dict(zip(self.add_keys, add))} if add else {}
        return self.unet(x, t, c, return_dict=False, **kwargs)[0]


class GraphedUNet:
    """Calls like `unet(x_t, t, encoder_hidden_states, added_cond_kwargs=...)` and returns `.sample`.
    Make one per training run: a graph keeps the parameters, and which of them train, as it recorded them."""

    def __init__(self, unet, enabled: bool = True, max_graphs: int = 2):
        self.unet, self.enabled, self.max_graphs = unet, enabled, max_graphs
        self.graphs: dict[tuple, object] = {}
        self.replays = 0   # how many calls a graph served (tests and benchmarks read it)

    def _usable(self, x: torch.Tensor) -> bool:
        return (self.enabled and x.is_cuda and torch.is_grad_enabled() and self.unet.training
                and not torch.is_autocast_enabled())

    def _eager(self, x, t, c, added_cond_kwargs):
        return self.unet(x, t, c, **({"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}))

    def __call__(self, x, t, c, added_cond_kwargs: dict | None = None):
        add_keys = tuple(sorted(added_cond_kwargs)) if added_cond_kwargs else ()
        add = tuple(added_cond_kwargs[k] for k in add_keys)
        if not self._usable(x):
            return self._eager(x, t, c, added_cond_kwargs)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        args = (x, t, c, *add)
        key = (add_keys,) + tuple((a.shape, a.dtype, a.requires_grad) for a in args)
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= self.max_graphs:   # shapes that keep changing: graphs would not pay
                return self._eager(x, t, c, added_cond_kwargs)
            # the sample inputs become the graph's static input buffers: give it copies of its own
            sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            g = torch.cuda.make_graphed_callables(_Forward(self.unet, add_keys), sample, allow_unused_input=True)
            self.graphs[key] = g
        self.replays += 1
        return SimpleNamespace(sample=g(*args))
