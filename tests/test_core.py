import json

import pytest
import torch

from difflab.core import diffusion
from difflab.core.params import freeze_all_but, select
from difflab.core.runs import atomic_write_json, output_folder, write_metrics
from difflab.core.trainer import TrainConfig, TrainingError, latest_checkpoint, train


def _sched(kind="epsilon"):
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_the_forward_process(kind):
    s = _sched(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 200, 500, 900])
    x_t = diffusion.add_noise(s, x0, eps, t)
    out = diffusion.target(s, x0, eps, t)   # what a perfect network would say
    assert torch.allclose(diffusion.predict_x0(s, x_t, out, t), x0, atol=1e-3)
    # the same numbers as diffusers' own add_noise / get_velocity, bit for bit, without their side effect of
    # moving the scheduler's alphas_cumprod (a CUDA-trained model then could not step the scheduler on the CPU)
    assert torch.equal(x_t, s.add_noise(x0, eps, t))
    assert torch.equal(out, eps if kind == "epsilon" else s.get_velocity(x0, eps, t))
    diffusion.add_noise(s, x0.to("meta"), eps.to("meta"), t)   # "meta" stands in for cuda here
    diffusion.target(s, x0.to("meta"), eps.to("meta"), t)
    assert s.alphas_cumprod.device.type == "cpu"


class _Perfect(torch.nn.Module):
    """A 'UNet' that returns a fixed output, to check the loss arithmetic."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, c):
        return type("O", (), {"sample": self.out})()


def test_diffusion_loss_is_zero_for_the_target_and_respects_the_mask():
    s = _sched()
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 600])
    assert diffusion.diffusion_loss(_Perfect(eps), s, x0, None, noise=eps, t=t).item() < 1e-12
    wrong = eps.clone()
    wrong[:, :, :4] += 1.0   # error only in the top half
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 4:] = 1
    assert diffusion.diffusion_loss(_Perfect(wrong), s, x0, None, noise=eps, t=t, mask=mask).item() < 1e-12
    per = diffusion.diffusion_loss(_Perfect(wrong), s, x0, None, noise=eps, t=t, reduction="none")
    assert per.shape == (2,) and torch.allclose(per, torch.full((2,), 0.5))


def test_select_cross_attention_kv(tmp_path):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4)
    kv = select(unet, "xattn_kv")
    assert kv and all("attn2.to_k" in n or "attn2.to_v" in n for n in kv)
    n = freeze_all_but(unet, kv)
    assert n == sum(p.numel() for p in unet.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="no parameter"):
        select(unet, r"nothing_here")


def _regression(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 1)
    w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def batch_fn(i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(32, 4, generator=g)
        return x, x @ w_true.T

    def loss_fn(b):
        x, y = b
        return ((lin(x) - y) ** 2).mean(), {}
    return lin, batch_fn, loss_fn


def test_training_loss_falls():
    lin, batch_fn, loss_fn = _regression()
    hist = train(dict(lin.named_parameters()), loss_fn, batch_fn,
                 TrainConfig(steps=200, lr=5e-2, log_every=20, progress=False), modules=[lin])
    assert hist["loss"][-1] < 0.01 * hist["loss"][0]


def test_a_parameter_with_its_own_lr_moves_by_that_lr():
    """Adam's first step moves every element by about lr: a frozen-lr (0) bias stays, the weight moves ~lr."""
    lin, batch_fn, loss_fn = _regression()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    train(dict(lin.named_parameters()), loss_fn, batch_fn,
          TrainConfig(steps=1, lr=1e-3, lr_by_param={"bias": 0.0}, weight_decay=0.0, progress=False, log_every=1),
          modules=[lin])
    assert torch.equal(lin.bias, b0)
    assert torch.allclose((lin.weight - w0).abs(), torch.full_like(w0, 1e-3), rtol=1e-2)


def test_resume_matches_an_unbroken_run(tmp_path):
    cfg = dict(lr=5e-2, log_every=5, progress=False, checkpoint_every=10, ema_decay=0.9)
    lin, batch_fn, loss_fn = _regression()
    train(dict(lin.named_parameters()), loss_fn, batch_fn, TrainConfig(steps=30, **cfg), modules=[lin])
    unbroken = lin.weight.detach().clone()

    lin2, batch_fn, loss_fn = _regression()
    train(dict(lin2.named_parameters()), loss_fn, batch_fn, TrainConfig(steps=25, **cfg), out=tmp_path, modules=[lin2])
    assert latest_checkpoint(tmp_path).name == "step-25"   # the end is checkpointed too
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step-25")   # pretend the run died after step 20
    lin3, batch_fn, loss_fn = _regression(seed=99)   # different init: everything must come from the checkpoint
    train(dict(lin3.named_parameters()), loss_fn, batch_fn, TrainConfig(steps=30, **cfg), out=tmp_path, modules=[lin3])
    assert torch.allclose(lin3.weight, unbroken, atol=1e-6)


def test_nan_guard_stops_with_a_clear_error():
    lin, batch_fn, _ = _regression()

    def loss_fn(b):
        return lin(b[0]).mean() * float("nan"), {}
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train(dict(lin.named_parameters()), loss_fn, batch_fn, TrainConfig(steps=5, progress=False), modules=[lin])


def test_output_folder_is_atomic(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with output_folder(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with output_folder(target) as tmp:
        write_metrics(tmp, {"a": 1.0}, command="difflab test")
    m = json.loads((target / "metrics.json").read_text())
    assert m["a"] == 1.0 and m["command"] == "difflab test" and "difflab_version" in m
    atomic_write_json(target / "x.json", {"b": 2})
    assert json.loads((target / "x.json").read_text()) == {"b": 2}


def test_image_folder_caches_latents_and_text(tiny_pipeline_dir, tmp_path):
    from difflab.core.data import ImageFolder
    from difflab.models import load_pipeline
    from difflab.world import sample_folder
    sample_folder(tmp_path / "w", n=5, seed=1)
    pipe = load_pipeline(tiny_pipeline_dir)
    ds = ImageFolder(tmp_path / "w")
    z = ds.latents(pipe.vae)
    assert z.shape == (5, 4, 8, 8)
    assert len(list((tmp_path / "w" / ".difflab-cache").glob("latents-*.safetensors"))) == 1
    assert torch.equal(ImageFolder(tmp_path / "w").latents(pipe.vae), z)   # from the cache
    e = ds.text_embeddings(pipe)
    assert e.shape[0] == 5 and e.shape[-1] == pipe.text_encoder.config.hidden_size


def test_bf16_autocast_and_gradient_accumulation_train():
    lin, batch_fn, loss_fn = _regression()
    hist = train(dict(lin.named_parameters()), loss_fn, batch_fn,
                 TrainConfig(steps=100, lr=5e-2, log_every=10, progress=False, mixed_precision="bf16", grad_accum=2),
                 modules=[lin])
    assert hist["loss"][-1] < 0.05 * hist["loss"][0]


def test_multi_process_training_keeps_ranks_in_sync(tmp_path):
    """torchrun with 2 CPU processes: each draws its own batches, gradients are averaged, weights stay equal."""
    import os
    import subprocess
    import sys
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        worker], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "DDP-OK" in p.stdout


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_deduplicated_encoding_equals_plain_encoding(which, tiny_pipeline_dir, tiny_sdxl_dir):
    from difflab.core import conditioning
    from difflab.models import load_pipeline
    pipe = load_pipeline(str(tiny_pipeline_dir if which == "sd" else tiny_sdxl_dir))
    prompts = ["a red star", "a shape", "a red star", "a blue circle", "a shape"]
    h0, a0 = conditioning.encode(pipe, prompts)
    h1, a1 = conditioning.encode_deduplicated(pipe, prompts, needs_grad=lambda p: "star" in p)
    assert torch.allclose(h0, h1, atol=1e-6)
    if which == "sdxl":
        assert all(torch.allclose(a0[k], a1[k], atol=1e-6) for k in a0)


def _unet_step(unet, call, x, t, c, add=None):
    """One forward and backward through `call`: (output, grads of the trained parameters, grad of c)."""
    c = c.detach().clone().requires_grad_(True)
    kwargs = {"added_cond_kwargs": add} if add else {}
    out = call(x, t, c, **kwargs).sample
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return out.detach().clone(), grads, c.grad.detach().clone()


def _kv_unet(pipe, device):
    unet = pipe.unet.to(device).train()
    unet.requires_grad_(False)
    freeze_all_but(unet, select(unet, "xattn_kv"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, unet.config.in_channels, 8, 8, generator=g).to(device)
    t = torch.tensor([10, 500, 900], device=device)
    c = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g).to(device)
    return unet, x, t, c


def test_graphed_unet_runs_eagerly_off_the_gpu(tiny_pipeline_dir):
    from difflab.core.graphs import GraphedUNet
    from difflab.models import load_pipeline
    unet, x, t, c = _kv_unet(load_pipeline(tiny_pipeline_dir), "cpu")
    g = GraphedUNet(unet)
    a, b = _unet_step(unet, unet, x, t, c), _unet_step(unet, g, x, t, c)
    assert g.replays == 0 and not g.graphs
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/device_check.sh runs this)")
def test_graphed_unet_matches_eager_outputs_and_gradients_on_the_gpu(tiny_pipeline_dir):
    from difflab.core.graphs import GraphedUNet
    from difflab.models import load_pipeline
    unet, x, t, c = _kv_unet(load_pipeline(tiny_pipeline_dir), "cuda")
    g = GraphedUNet(unet)
    for k in range(3):   # the first call records the graph, the others replay it, on new inputs each time
        xk, ck = x * (1 + k), c - k
        ref = _unet_step(unet, unet, xk, t, ck)
        got = _unet_step(unet, g, xk, t, ck)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-5)
        for n in ref[1]:
            torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-4, atol=1e-5)
    assert g.replays == 3 and len(g.graphs) == 1


def test_deterministic_kernels_hold_inside_and_restore_after():
    from difflab.core.trainer import deterministic_kernels
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    with deterministic_kernels():
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    with pytest.raises(KeyError), deterministic_kernels():   # restored on error too
        raise KeyError
    assert torch.are_deterministic_algorithms_enabled() == before[0]
    with deterministic_kernels(on=False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]
