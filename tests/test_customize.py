"""Custom Diffusion on a tiny random pipeline: training changes only K/V and the token row, formats round-trip,
loading really changes the model, the merge satisfies its constraints."""
import numpy as np
import pytest
import torch

from difflab.customize import (Concept, CustomizeConfig, apply_weights, kv_output_penalty, read_weights, save_weights,
                               train_concepts)
from difflab.errors import DifflabError
from difflab.merge import merge, merge_matrix
from safetensors.torch import load_file


def _pipe(tiny_pipeline_dir):
    from difflab.models import load_pipeline
    return load_pipeline(tiny_pipeline_dir)


def _images(tmp_path, name="hearts", shape="heart"):
    from difflab.world import sample_folder
    return sample_folder(tmp_path / name, n=4, seed=1, where=[f"shape={shape}"])


def _image(pipe, prompt, seed=0):
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def _train(pipe, tmp_path, token="<new1>", shape="heart", steps=6):
    cfg = CustomizeConfig(steps=steps, lr=1e-2, batch_size=2, num_class_images=4, class_steps=2, progress=False)
    return train_concepts(pipe, [Concept(str(_images(tmp_path, shape + "s", shape)), token)], cfg, tmp_path / "work")


def test_training_changes_only_kv_and_the_new_row(tiny_pipeline_dir, tmp_path):
    pipe = _pipe(tiny_pipeline_dir)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    emb0 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    hist = _train(pipe, tmp_path)
    assert len(hist["loss"]) > 0
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    emb = pipe.text_encoder.get_input_embeddings().weight
    new_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert new_id == emb.shape[0] - 1
    assert torch.equal(emb[:-1], emb0) and not torch.equal(emb[new_id], emb[pipe.tokenizer("ktn", add_special_tokens=False).input_ids[0]])


def test_feature_penalty_measures_kv_output_change_and_restrains_training(tiny_pipeline_dir, tmp_path):
    from difflab.core.params import select
    pipe = _pipe(tiny_pipeline_dir)
    kv = select(pipe.unet, "xattn_kv")
    cfg = CustomizeConfig(feature_reg_prompts=["a red circle", "a blue star on a white background", "a shape"])
    penalty = kv_output_penalty(pipe, kv, cfg)
    assert penalty().item() == 0.0
    with torch.no_grad():   # every K/V output 10 % larger: relative squared change 0.01, for keys and values alike
        for p in kv.values():
            p.mul_(1.1)
    assert abs(penalty().item() - 0.01) < 1e-5
    # training with a strong penalty moves K/V (measured by the penalty itself) far less than without
    moved = {}
    for weight in (0.0, 100.0):
        pipe = _pipe(tiny_pipeline_dir)
        probe = kv_output_penalty(pipe, select(pipe.unet, "xattn_kv"), cfg)
        c = CustomizeConfig(steps=6, lr=1e-2, batch_size=2, num_class_images=4, class_steps=2, progress=False,
                            feature_reg=weight, feature_reg_prompts=cfg.feature_reg_prompts)
        train_concepts(pipe, [Concept(str(_images(tmp_path)))], c, tmp_path / f"work{weight}")
        moved[weight] = probe().item()
    assert moved[0.0] > 0 and moved[100.0] < 0.5 * moved[0.0]


def test_saved_weights_load_into_a_fresh_base_and_reproduce_the_trained_model(tiny_pipeline_dir, tmp_path):
    pipe = _pipe(tiny_pipeline_dir)
    _train(pipe, tmp_path)
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    save_weights(pipe, save_dir, ["<new1>"], "xattn_kv", base=str(tiny_pipeline_dir))
    trained = _image(pipe, "a <new1> shape")
    fresh = _pipe(tiny_pipeline_dir)
    base_img = _image(fresh, "a <new1> shape")
    assert apply_weights(fresh, save_dir) == ["<new1>"]
    loaded = _image(fresh, "a <new1> shape")
    assert np.abs(loaded - trained).max() < 1e-5
    assert np.abs(loaded - base_img).max() > 1e-3   # a no-op load would fail here


def test_adobe_delta_bin_is_read(tiny_pipeline_dir, tmp_path):
    pipe = _pipe(tiny_pipeline_dir)
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    w = dict(pipe.unet.named_parameters())[name].detach() + 0.5
    torch.save({"unet": {name: w}, "modifier_token": {"<new1>": torch.randn(16)}}, tmp_path / "delta.bin")
    state, toks = read_weights(tmp_path / "delta.bin")
    apply_weights(pipe, tmp_path / "delta.bin")
    assert torch.equal(dict(pipe.unet.named_parameters())[name], w) and "<new1>" in pipe.tokenizer.get_added_vocab()


def test_weights_for_another_base_fail_clearly(tiny_pipeline_dir, tmp_path):
    pipe = _pipe(tiny_pipeline_dir)
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    torch.save({"unet": {name: torch.zeros(3, 3)}}, tmp_path / "delta.bin")
    with pytest.raises(DifflabError, match="different base model"):
        apply_weights(pipe, tmp_path / "delta.bin")


def test_merge_matrix_meets_constraints_and_is_optimal():
    g = torch.Generator().manual_seed(0)
    W0, C_reg = torch.randn(6, 8, generator=g), torch.randn(50, 8, generator=g)
    C_tgt, V = torch.randn(3, 8, generator=g), torch.randn(3, 6, generator=g)
    W = merge_matrix(W0, C_reg, C_tgt, V).double()
    assert (W @ C_tgt.double().T - V.double().T).abs().max() < 1e-6
    obj = lambda M: ((M - W0.double()) @ C_reg.double().T).pow(2).sum()
    # any feasible perturbation (one that keeps W C_tgt^T fixed) costs more
    null = torch.linalg.svd(C_tgt.double(), full_matrices=True).Vh[3:]   # rows orthogonal to C_tgt
    for _ in range(20):
        P = torch.randn(6, null.shape[0], generator=g, dtype=torch.float64) @ null * 0.1
        assert obj(W + P) >= obj(W) - 1e-9


def test_merge_two_runs(tiny_pipeline_dir, tmp_path):
    runs = []
    for shape in ("heart", "moon"):
        pipe = _pipe(tiny_pipeline_dir)
        _train(pipe, tmp_path / shape, shape=shape)
        d = tmp_path / f"run-{shape}"
        d.mkdir()
        save_weights(pipe, d, ["<new1>"], "xattn_kv", base="tiny", extra={"class_prompt": "a shape"})
        runs.append(d)
    pipe = _pipe(tiny_pipeline_dir)
    tokens, info = merge(pipe, runs, [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("star", "circle")] * 4)
    assert tokens == ["<new1>", "<new2>"] and info["constraint_residual"] < 1e-4
    with pytest.raises(DifflabError, match="different base"):
        import json
        cfg_json = json.loads((runs[1] / "adapter_config.json").read_text())
        (runs[1] / "adapter_config.json").write_text(json.dumps({**cfg_json, "base": "other"}))
        merge(_pipe(tiny_pipeline_dir), runs, ["a shape"])
    # one run that trained all of cross-attention: its q/out are kept, K/V merged (the K/V run's targets carried
    # into its frame); two such runs merge too, keeping the q/out of the one named
    pipe = _pipe(tiny_pipeline_dir)
    cfg = CustomizeConfig(steps=3, lr=1e-2, batch_size=2, num_class_images=4, class_steps=2, progress=False,
                          params="xattn")
    train_concepts(pipe, [Concept(str(_images(tmp_path / "x", "moons", "moon")), "<new1>")], cfg, tmp_path / "x" / "w")
    for name in ("run-x", "run-y"):
        (tmp_path / name).mkdir()
        save_weights(pipe, tmp_path / name, ["<new1>"], "xattn", base="tiny", extra={"class_prompt": "a shape"})
    trained_q = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "attn2.to_q" in n}
    merged = _pipe(tiny_pipeline_dir)
    base_q = {n: p.detach().clone() for n, p in merged.unet.named_parameters() if "attn2.to_q" in n}
    _, info = merge(merged, [runs[0], tmp_path / "run-x"], ["a red star", "a blue circle"] * 4)
    assert info["taken_layers"] > 0 and info["qo_from"] == str(tmp_path / "run-x") and info["constraint_residual"] < 1e-4
    for n, p in merged.unet.named_parameters():
        if n in trained_q:
            assert torch.equal(p, trained_q[n]) and not torch.equal(p, base_q[n])
    merged = _pipe(tiny_pipeline_dir)
    _, info = merge(merged, [tmp_path / "run-x", tmp_path / "run-y"], ["a red star"] * 8, qo_from=1)
    assert info["qo_from"] == str(tmp_path / "run-y")
    with pytest.raises(DifflabError, match="not a run index"):
        merge(_pipe(tiny_pipeline_dir), [tmp_path / "run-x", tmp_path / "run-y"], ["a shape"], qo_from=2)


def test_into_frame_keeps_each_runs_attention_output():
    """With a negligible ridge, a value row carried into the kept run's frame gives the same output through that
    run's W_out as the original row through its own; a key row gives the same logits for every query input."""
    from difflab.merge import _into_frame
    g = torch.Generator().manual_seed(0)
    d = 6
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    own, kept = ([rnd(d, d) + 3 * torch.eye(d, dtype=torch.float64), rnd(d, d) + 3 * torch.eye(d, dtype=torch.float64),
                  rnd(d)] for _ in range(2))   # [W_q, W_out, b_out]
    V, rows = rnd(4, d), torch.tensor([True, True, False, False])
    G = torch.eye(d, dtype=torch.float64)
    Vv = _into_frame("to_v", V, rows, own, kept, G, heads=1, ridge=1e-12)
    out = lambda m, v: v @ m[1].T + m[2]
    assert torch.allclose(out(kept, Vv[:2]), out(own, V[:2]), atol=1e-8) and torch.equal(Vv[2:], V[2:])
    Vk = _into_frame("to_k", V, rows, own, kept, G, heads=1, ridge=1e-12)
    x = rnd(10, d)
    logits = lambda m, k: (x @ m[0].T) @ k.T
    assert torch.allclose(logits(kept, Vk[:2]), logits(own, V[:2]), atol=1e-8) and torch.equal(Vk[2:], V[2:])


def test_fit_targets_lowers_the_carried_output_error():
    """Where the closed-form carry is only approximate (8 heads: keys in least squares), the fitted target rows give
    outputs closer to the run's own, and the kept run's rows are left alone."""
    from difflab.merge import _attend, _fit_targets, eq4_map
    g = torch.Generator().manual_seed(1)
    d, o, heads = 16, 16, 4
    rnd = lambda *s: torch.randn(*s, generator=g)
    C_reg, C_tgt = rnd(40, d), rnd(6, d)
    M = eq4_map(C_reg, C_tgt).float()
    W0 = {"to_k": rnd(o, d) / 4, "to_v": rnd(o, d) / 4}
    own = [rnd(o, d) / 4, rnd(o, o) / 4 + torch.eye(o), rnd(o) / 4]
    kept = [rnd(o, d) / 4, rnd(o, o) / 4 + torch.eye(o), rnd(o) / 4]
    free = torch.tensor([True] * 3 + [False] * 3)
    X, E = rnd(8, 10, d), C_tgt[None].expand(8, -1, -1).contiguous()
    Wk_own, Wv_own = W0["to_k"] + rnd(o, d) / 4, W0["to_v"] + rnd(o, d) / 4
    refs = {0: _attend(X, E, own[0], Wk_own, Wv_own, own[1], own[2], heads)}
    T = {"to_k": C_tgt @ Wk_own.T, "to_v": C_tgt @ Wv_own.T}
    maps = {"C_tgt": C_tgt, "M": M, "G_reg": C_reg.T @ C_reg / len(C_reg)}
    fitted, first, last = _fit_targets(T, free, W0, kept, {0: (X, E)}, refs, maps, heads, iters=200, reg=0.0)
    assert last < 0.5 * first
    assert all(torch.equal(fitted[k][~free], T[k][~free]) for k in T)


def test_customize_cli_run_folder_and_adapter(tiny_pipeline_dir, tmp_path):
    from click.testing import CliRunner

    from difflab.cli import main
    imgs = _images(tmp_path)
    r = CliRunner()
    res = r.invoke(main, ["customize", "--model", str(tiny_pipeline_dir), "--images", str(imgs), "--token", "<new1>",
                          "--class-prompt", "a shape", "--steps", "4", "--num-class-images", "2", "--out",
                          str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    for f in ("pytorch_custom_diffusion_weights.safetensors", "<new1>.safetensors", "metrics.json", "config.json"):
        assert (tmp_path / "run" / f).exists(), f
    res = r.invoke(main, ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a <new1> shape", "--steps", "2",
                          "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "gen")])
    assert res.exit_code == 0, res.output
    bad = r.invoke(main, ["customize", "--model", str(tiny_pipeline_dir), "--images", str(tmp_path / "nothing"),
                          "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "not a folder" in bad.output and not (tmp_path / "bad").exists()
    (tmp_path / "empty").mkdir()
    bad = r.invoke(main, ["customize", "--model", str(tiny_pipeline_dir), "--images", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "holds no images" in bad.output


def test_erase_cli(tiny_pipeline_dir, tmp_path):
    from click.testing import CliRunner

    from difflab.cli import main
    (tmp_path / "anchors.txt").write_text("a red shape\na blue shape\n")
    res = CliRunner().invoke(main, ["erase", "--model", str(tiny_pipeline_dir), "--target", "a star", "--anchor",
                                    "a shape", "--anchor-prompts", str(tmp_path / "anchors.txt"), "--steps", "3",
                                    "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e" / "pytorch_custom_diffusion_weights.safetensors").exists()


def test_customize_sdxl_trains_both_encoders_and_round_trips(tiny_sdxl_dir, tmp_path):
    """SDXL: the token gets a row in both text encoders; the saved run reproduces the trained model."""
    import numpy as np

    from difflab.adapters import apply_adapters
    from difflab.models import load_pipeline
    imgs = _images(tmp_path)
    pipe = load_pipeline(str(tiny_sdxl_dir))
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    train_concepts(pipe, [Concept(str(imgs))], CustomizeConfig(steps=3, num_class_images=2, batch_size=1,
                                                                lr=1e-2, progress=False))
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    (tmp_path / "run").mkdir()
    save_weights(pipe, tmp_path / "run", ["<new1>"], "xattn_kv", base=str(tiny_sdxl_dir))
    emb = load_file(tmp_path / "run" / "<new1>.safetensors")
    assert len(emb) == 2   # one row per text encoder
    fresh = load_pipeline(str(tiny_sdxl_dir))
    apply_adapters(fresh, [str(tmp_path / "run")])
    kw = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    a = pipe("a <new1> shape", generator=torch.Generator().manual_seed(0), **kw).images
    b = fresh("a <new1> shape", generator=torch.Generator().manual_seed(0), **kw).images
    base = load_pipeline(str(tiny_sdxl_dir))
    base.tokenizer.add_tokens(["<new1>"]), base.tokenizer_2.add_tokens(["<new1>"])
    base.text_encoder.resize_token_embeddings(len(base.tokenizer))
    base.text_encoder_2.resize_token_embeddings(len(base.tokenizer_2))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - base("a shape", generator=torch.Generator().manual_seed(0), **kw).images).max() > 1e-3


def test_instance_prompt_without_the_token_and_unreadable_images_fail_clearly(tiny_pipeline_dir, tmp_path):
    from click.testing import CliRunner

    from difflab.cli import main
    imgs = _images(tmp_path)
    (tmp_path / "c.json").write_text('[{"images": "%s", "token": "<new1>", "instance_prompt": "a shape"}]' % imgs)
    r = CliRunner()
    bad = r.invoke(main, ["customize", "--model", str(tiny_pipeline_dir), "--concepts", str(tmp_path / "c.json"),
                          "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "does not contain <new1>" in bad.output and not (tmp_path / "bad").exists()
    (imgs / "broken.png").write_bytes(b"not a png")
    bad = r.invoke(main, ["customize", "--model", str(tiny_pipeline_dir), "--images", str(imgs),
                          "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "broken.png" in bad.output and not (tmp_path / "bad").exists()


def test_per_image_captions_train_and_a_caption_without_the_token_fails_clearly(tiny_pipeline_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from difflab.cli import main
    imgs = _images(tmp_path)   # world captions ("a heart ..."), which do not hold <new1>
    (tmp_path / "c.json").write_text(json.dumps([{"images": str(imgs), "token": "<new1>", "captions": True}]))
    args = ["customize", "--model", str(tiny_pipeline_dir), "--concepts", str(tmp_path / "c.json"), "--steps", "2",
            "--num-class-images", "2"]
    bad = CliRunner().invoke(main, args + ["--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "lack <new1>" in bad.output and not (tmp_path / "bad").exists()
    meta = imgs / "metadata.jsonl"
    recs = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps({**r, "caption": r["caption"].replace("heart", "<new1> shape")}) + "\n"
                            for r in recs))
    ok = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["concepts"][0]["captions"] is True


def test_frozen_prompt_embeddings_are_cached_and_equal_to_fresh_ones(tiny_pipeline_dir):
    from difflab.core.conditioning import encode, encode_deduplicated
    pipe = _pipe(tiny_pipeline_dir)
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cache = {}
    prompts = ["a <new1> shape", "a shape", "a red circle", "a shape"]
    needs = lambda p: "<new1>" in p   # noqa: E731
    for _ in range(2):
        h, _ = encode_deduplicated(pipe, prompts, needs, cache=cache)
    hook.remove()
    with torch.no_grad():
        ref, _ = encode(pipe, prompts)
    assert torch.equal(h.detach(), ref) and h.requires_grad
    assert calls == [1, 2, 1]   # the token prompt every time; the two frozen prompts once
    assert set(cache) == {("a shape", torch.device("cpu")), ("a red circle", torch.device("cpu"))}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/device_check.sh runs this)")
def test_training_with_cuda_graphs_follows_eager_training(tiny_pipeline_dir, tmp_path, monkeypatch):
    import difflab.core.graphs as graphs
    made = []

    class Spy(graphs.GraphedUNet):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    monkeypatch.setattr(graphs, "GraphedUNet", Spy)
    hist = {}
    for on in (False, True):
        pipe = _pipe(tiny_pipeline_dir)
        cfg = CustomizeConfig(steps=8, lr=1e-3, batch_size=2, num_class_images=4, class_steps=2, progress=False,
                              cuda_graphs=on)
        hist[on] = train_concepts(pipe, [Concept(str(_images(tmp_path)))], cfg, tmp_path / f"work{on}")
    assert made[0].replays == 0 and made[1].replays == 8
    np.testing.assert_allclose(hist[True]["loss"], hist[False]["loss"], rtol=1e-3)
