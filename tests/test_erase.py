"""Concept Ablation on a tiny random pipeline: the target's prediction moves onto the anchor's, only the chosen
parameter group changes, and every group saves and loads."""
import pytest
import torch

from difflab.erase import EraseConfig, ablate, apply_erased, rewrite, save_erased
from difflab.errors import DifflabError


def _pipe(d):
    from difflab.models import load_pipeline
    return load_pipeline(d)


def _gap(pipe, target="a red star", anchor="a red shape"):
    """Mean squared difference of the UNet's predictions for target and anchor prompts at fixed x_t."""
    from difflab.core.data import encode_prompts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([100, 300, 600, 900])
    with torch.no_grad():
        e = encode_prompts(pipe, [target] * 4 + [anchor] * 4)
        out = pipe.unet(torch.cat([x, x]), torch.cat([t, t]), e).sample
    return (out[:4] - out[4:]).pow(2).mean().item()


def test_rewrite():
    assert rewrite("a red shape at the top left", "a shape", "a star") == "a red star at the top left"
    assert rewrite("a shape", "a shape", "a star") == "a star"
    with pytest.raises(DifflabError, match="does not contain"):
        rewrite("a red circle", "a shape", "a star")


@pytest.mark.parametrize("group", ["kv", "embedding", "full"])
def test_ablation_pulls_target_onto_anchor_and_round_trips(tiny_pipeline_dir, tmp_path, group):
    pipe = _pipe(tiny_pipeline_dir)
    before_gap = _gap(pipe)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    emb0 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    cfg = EraseConfig(params=group, steps=25, lr=3e-2 if group == "embedding" else 3e-3, batch_size=4,
                      num_anchor_images=4, anchor_steps=2, progress=False, augment=False)
    ablate(pipe, "a star", "a shape", cfg, anchor_prompts=["a red shape", "a blue shape"])
    assert _gap(pipe) < 0.5 * before_gap
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    emb_rows = (pipe.text_encoder.get_input_embeddings().weight != emb0).any(1).nonzero().flatten().tolist()
    if group == "kv":
        assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed) and not emb_rows
    elif group == "embedding":
        assert not changed and emb_rows == pipe.tokenizer("star", add_special_tokens=False).input_ids
    else:
        assert len(changed) > 20 and not emb_rows
    (tmp_path / "run").mkdir()
    save_erased(pipe, tmp_path / "run", cfg, "a star", "a shape", base="tiny")
    fresh = _pipe(tiny_pipeline_dir)
    apply_erased(fresh, tmp_path / "run")
    assert abs(_gap(fresh) - _gap(pipe)) < 1e-6
