"""difflab.attribute: feature ranking and its cache, tuned heads, unlearning (AbU), the benchmarks and the CLI."""
import json
from dataclasses import replace

import pytest
import torch

from difflab.attribute.features import cached_features, embed_images, top_k
from difflab.errors import DifflabError


def test_chunked_top_k_equals_a_full_sort():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(5000, 64, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=-1)
    s, i = top_k(q, bank, k=50, chunk=777)
    full = q @ bank.T
    ref_s, ref_i = full.sort(dim=1, descending=True)
    assert torch.equal(i, ref_i[:, :50]) and torch.allclose(s, ref_s[:, :50])
    with pytest.raises(DifflabError, match="another encoder"):
        top_k(q[:, :32], bank)


def test_feature_cache_is_reused_and_refuses_another_encoder_or_files(tmp_path):
    from difflab.world import sample_folder
    d = sample_folder(tmp_path / "train", n=12, seed=3)
    f1, files = cached_features(d)
    assert f1.shape[0] == 12 and torch.allclose(f1.norm(dim=-1), torch.ones(12), atol=1e-5)
    cache = next((d / ".difflab-cache").glob("features-*.safetensors"))
    stamp = cache.stat().st_mtime_ns
    f2, _ = cached_features(d)
    assert torch.equal(f1, f2) and cache.stat().st_mtime_ns == stamp   # read, not recomputed
    # the query ranks its own source first
    from difflab.core.data import load_image
    s, i = top_k(embed_images([load_image(d / files[5])]), f1, k=3)
    assert i[0, 0].item() == 5
    # a cache whose metadata names another encoder is refused
    from safetensors.torch import load_file, save_file
    save_file({"features": load_file(cache)["features"]}, cache, metadata={"encoder": "other", "files": json.dumps(files)})
    with pytest.raises(DifflabError, match="features of encoder 'other'"):
        cached_features(d)
    save_file({"features": f1}, cache, metadata={"encoder": "shapes-clip", "files": json.dumps(files[::-1])})
    with pytest.raises(DifflabError, match="other files"):
        cached_features(d)


def test_dreamsim_embeddings_serve_as_attribution_features(tmp_path):
    from difflab.core.data import load_folder_images
    from difflab.similarity import dreamsim
    from difflab.world import sample_folder
    d = sample_folder(tmp_path / "train", n=8, seed=4)
    f, _ = cached_features(d, "shapes-dreamsim")
    model, pre = dreamsim()
    with torch.no_grad():
        ref = model.embed(torch.cat([pre(im) for im in load_folder_images(d)]))
    assert f.shape == (8, 64) and torch.allclose(f, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    assert not torch.allclose(f, cached_features(d, "shapes-clip")[0])   # its own cache beside the CLIP one
    model.save_pretrained(tmp_path / "ds")   # a DreamSim folder, as `difflab similarity train` saves
    assert torch.allclose(embed_images(load_folder_images(d)[:2], str(tmp_path / "ds")), f[:2], atol=1e-5)


def test_faiss_flat_index_gives_the_exact_ranking():
    pytest.importorskip("faiss", reason="faiss is an optional extra (pip install 'difflab[faiss]'); not installed here")
    from difflab.attribute.features import faiss_index
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(3000, 32, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=-1)
    s, i = top_k(q, bank, k=20)
    s_f, i_f = top_k(q, bank, k=20, index=faiss_index(bank))
    assert torch.equal(i, i_f) and torch.allclose(s, s_f, atol=1e-5)


def test_sweep_results_do_not_depend_on_batching():
    from difflab.attribute.unlearn import image_losses
    from difflab.core.sweep import sweep
    from difflab.models import load_pipeline
    assert torch.equal(sweep(lambda idx: idx * 2, 10, 3, progress=False), torch.arange(10) * 2)
    assert sweep(lambda idx: {"s": idx.sum()}, 10, 4, reduce="sum", progress=False)["s"].item() == 45
    pipe = load_pipeline("shapes")
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(7, 4, 8, 8, generator=g), torch.randn(7, 32, 64, generator=g)
    a = image_losses(pipe.unet, pipe.scheduler, z, c, time_samples=4, batch=2, progress=False)
    b = image_losses(pipe.unet, pipe.scheduler, z, c, time_samples=4, batch=7, progress=False)
    assert a.shape == (7,) and torch.allclose(a, b, atol=1e-6)   # noise is seeded by the image, not the batch


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    """12 shapes training images; image 5 is also the query (so unlearning it must find image 5)."""
    from difflab.world import sample_folder
    return sample_folder(tmp_path_factory.mktemp("attr") / "train", n=12, seed=11)


def test_fisher_matches_per_sample_gradients_and_is_refused_for_another_model(small_train, tmp_path):
    from difflab.attribute.unlearn import UnlearnConfig, cached_fisher, fisher_diagonal, load_fisher, training_data
    from difflab.core.diffusion import diffusion_loss
    from difflab.core.params import select
    from difflab.models import load_pipeline
    pipe = load_pipeline("shapes")
    data = training_data(pipe, small_train)
    params = select(pipe.unet, "xattn_kv")
    F = fisher_diagonal(pipe.unet, pipe.scheduler, data.z[:3], data.c[:3], params, seed=0, progress=False)
    # the same seeding as fisher_diagonal: one (t, eps) per image from a generator seeded by (seed, epoch, image)
    name = next(iter(params))
    ref = torch.zeros_like(params[name], dtype=torch.float64)
    for i in range(3):
        g = torch.Generator().manual_seed((0 * 1_000_003 + 0) * 1_000_003 + i)
        eps = torch.randn(data.z.shape[1:], generator=g)
        t = torch.randint(0, 1000, (), generator=g)
        pipe.unet.zero_grad()
        params[name].requires_grad_(True)
        diffusion_loss(pipe.unet, pipe.scheduler, data.z[i:i + 1], data.c[i:i + 1], noise=eps[None], t=t[None]).backward()
        ref += params[name].grad.double() ** 2
        params[name].requires_grad_(False)
    assert torch.allclose(F[name], ref / 3, rtol=1e-4, atol=1e-12) and F[name].sum() > 0
    cfg = UnlearnConfig()
    path = tmp_path / "fisher.safetensors"
    cached_fisher(pipe.unet, pipe.scheduler, data, cfg, path=path, progress=False)
    assert set(load_fisher(path, pipe.unet, data, cfg)) == set(params)
    with torch.no_grad():
        params[name][0, 0] += 0.1   # another model
    with pytest.raises(DifflabError, match="Fisher of another model"):
        load_fisher(path, pipe.unet, data, cfg)


def test_unlearning_finds_the_training_image_it_unlearned_and_restores_the_model(small_train):
    from difflab.attribute.unlearn import (UnlearnConfig, attribute_by_unlearning, cached_losses, forgetting,
                                           query_tensors, training_data)
    from difflab.core.data import read_metadata
    from difflab.models import load_pipeline
    from PIL import Image
    pipe = load_pipeline("shapes")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    data = training_data(pipe, small_train)
    rec = read_metadata(small_train)[5]
    with Image.open(small_train / rec["file"]) as im:   # a query of another size and mode: resized, made RGB
        query = im.convert("RGBA").resize((64, 64), Image.NEAREST)
    zq, cq = query_tensors(pipe, query, rec["caption"])
    tau = attribute_by_unlearning(pipe, data, zq, cq, UnlearnConfig(steps=5, grad_accum=2, lr=1e-3), progress=False)
    assert tau.shape == (12,) and tau.argmax().item() == 5 and tau[5] > 0
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())   # restored bit-exact
    assert any((small_train / ".difflab-cache").glob("fisher-*.safetensors"))        # cached for the next query
    # forgetting: the training losses' overall rise, larger for a larger α
    before_losses = cached_losses(pipe.unet, pipe.scheduler, data, UnlearnConfig(), progress=False)
    gentle = attribute_by_unlearning(pipe, data, zq, cq, UnlearnConfig(steps=5, grad_accum=2, lr=1e-4), progress=False)
    assert 0 < forgetting(gentle, before_losses) < forgetting(tau, before_losses)


def test_tuned_heads_learn_what_attribution_needs_and_calibrate():
    """Synthetic features: dims 0-7 carry the model's identity, dims 8-63 are per-image noise. Tuned on 14
    models, the heads must down-weight the noise dims and rank the exemplars of 6 unseen models better."""
    from difflab.attribute import TuneConfig, load_heads, save_heads, soft_attribution, train_heads
    from difflab.metrics import retrieval_metrics
    g = torch.Generator().manual_seed(0)
    n_models, d = 20, 64
    ident = torch.randn(n_models, 8, generator=g)

    def feats(models, noise):
        x = torch.cat([ident[models], torch.randn(len(models), d - 8, generator=g) * noise], 1)
        return torch.nn.functional.normalize(x, dim=-1)
    ex_group = torch.arange(n_models).repeat_interleave(2)
    ex = feats(ex_group, 0.3)
    syn_group = torch.arange(n_models).repeat_interleave(8)
    syn = feats(syn_group, 0.3)
    dis = torch.nn.functional.normalize(torch.randn(500, d, generator=g), dim=-1)
    heads = train_heads(syn[syn_group < 14], syn_group[syn_group < 14], ex[ex_group < 14], ex_group[ex_group < 14], dis,
                        TuneConfig(steps=150, lr=1e-2, batch=32, negatives=128, calibrate_steps=50, progress=False,
                                   head="linear", whiten=0))

    def evaluate(fq, fr):
        scores, rel = [], []
        for q in torch.nonzero(syn_group >= 14).flatten():
            cand = torch.cat([dis, ex[ex_group == syn_group[q]]])
            scores.append((fr(cand) @ fq(syn[q:q + 1])[0]).numpy())
            rel.append([0] * len(dis) + [1, 1])
        return retrieval_metrics(scores, rel)["map"]
    untuned = evaluate(lambda x: x, lambda x: x)
    tuned = evaluate(heads.synth, heads.real)
    assert tuned > untuned + 0.04, (untuned, tuned)   # measured 0.867 -> 0.935
    hard = train_heads(syn[syn_group < 14], syn_group[syn_group < 14], ex[ex_group < 14], ex_group[ex_group < 14], dis,
                       TuneConfig(steps=150, lr=1e-2, batch=32, negatives=128, calibrate_steps=50, progress=False,
                                  head="linear", whiten=0, hard_negatives=16, hard_pool=50))
    assert evaluate(hard.synth, hard.real) > untuned + 0.04   # with each query's nearest distractors as negatives too
    default = train_heads(syn[syn_group < 14], syn_group[syn_group < 14], ex[ex_group < 14], ex_group[ex_group < 14],
                          dis, TuneConfig(steps=150, batch=32, negatives=128, calibrate_steps=50, progress=False))
    # the defaults (whitened, a scale per channel): fitted and trained; whether whitening helps depends on the
    # training set's variance (here isotropic noise), so their gain is measured on the shapes benchmark instead
    losses = default.history["loss"]
    assert default.kind == "channel" and not torch.equal(default.proj, torch.eye(d))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    for m in (heads.real_mapper, heads.synth_mapper):   # identity dims up-weighted against the noise dims
        assert m.weight[:8, :8].diag().mean() > 1.2 * m.weight[8:, 8:].diag().mean()
    p = soft_attribution(torch.tensor([0.9, 0.5, 0.1]), float(heads.inv_tau), float(heads.bias))
    assert torch.isclose(p.sum(), torch.tensor(1.0)) and p[0] >= p[1] >= p[2]
    assert float(heads.inv_tau) != 1.0   # the calibrator was fitted
    save_heads(heads, tmp := __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "heads", "shapes-clip")
    assert torch.equal(load_heads(tmp).real_mapper.weight, heads.real_mapper.weight)
    with pytest.raises(DifflabError, match="tuned on encoder 'shapes-clip'"):
        load_heads(tmp, "facebook/dino-vitb16")


def test_whitening_decorrelates_the_training_set_and_survives_save_and_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from difflab.attribute import load_heads, save_heads
    from difflab.attribute.tuned import Heads
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3   # correlated, off-centre
    heads = Heads(8, "channel")
    heads.fit_whitening(x, shrink=0.0)
    w = (x - heads.mean) @ heads.proj
    cov = w.T @ w / len(w)
    assert torch.allclose(w.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(cov / cov[0, 0], torch.eye(8), atol=1e-3)   # white, up to one scale (cosine ignores it)
    save_heads(heads, tmp_path / "h", "shapes-clip")
    back = load_heads(tmp_path / "h")
    assert torch.equal(back.proj, heads.proj) and torch.equal(back.real(x[:3]), heads.real(x[:3]))
    # heads saved before the whitening existed hold no mean/proj: they load as the identity
    state = {k: v for k, v in load_file(tmp_path / "h" / "heads.safetensors").items() if k not in ("mean", "proj")}
    save_file(state, tmp_path / "h" / "heads.safetensors")
    old = load_heads(tmp_path / "h")
    assert torch.equal(old.proj, torch.eye(8)) and torch.equal(old.mean, torch.zeros(8))


def test_hard_negative_pools_hold_the_nearest_distractors_and_no_copy_of_the_own_exemplars():
    from difflab.attribute.tuned import hard_pools
    g = torch.Generator().manual_seed(0)
    ex = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)          # model 0's, model 1's
    dis = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
    dis[7] = ex[0]                                                                       # a copy of model 0's exemplar
    dis[9] = torch.nn.functional.normalize(ex[0] + 0.1 * torch.randn(16, generator=g), dim=-1)   # close to it
    syn = torch.nn.functional.normalize(ex + 0.05 * torch.randn(2, 16, generator=g), dim=-1)
    pools = hard_pools(syn, torch.tensor([0, 1]), ex, torch.tensor([0, 1]), dis, 3)
    assert 7 not in pools[0].tolist() and pools[0, 0] == 9     # the copy is not a negative, the near one first
    sims = (syn[1] @ dis.T).topk(3).indices                    # model 1's query: plainly its 3 nearest
    assert torch.equal(pools[1], sims)


def _cli(*args):
    from click.testing import CliRunner

    from difflab.cli import main
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def test_cli_rank_writes_a_run_and_refuses_bad_input(small_train, tmp_path):
    query = small_train / "000005.png"
    r = _cli("attribute", "rank", "--train", small_train, "--query", query, "--out", tmp_path / "run", "--k", 4)
    assert r.exit_code == 0, r.output
    top = json.loads((tmp_path / "run" / "metrics.json").read_text())["top"]
    assert top[0]["file"] == "000005.png" and len(top) == 4
    ranking = json.loads((tmp_path / "run" / "ranking.json").read_text())
    assert sorted(ranking["files"]) == sorted(f"{i:06d}.png" for i in range(12))
    assert (tmp_path / "run" / "top.png").is_file()
    r = _cli("attribute", "rank", "--train", small_train, "--query", query, "--out", tmp_path / "abu", "--k", 2,
             "--method", "unlearn", "--prompt", "a shape", "--unlearn-steps", 2, "--unlearn-lr", 1e-3)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "abu" / "metrics.json").read_text())
    assert m["forgetting"] > 0 and len(m["top"]) == 2
    # bad input: one line, exit 2, nothing written
    for args, msg in [(["--query", tmp_path / "missing.png"], "does not exist"),
                      (["--query", query, "--method", "tuned"], "needs --heads"),
                      (["--query", tmp_path / "q.png", "--method", "unlearn"], "needs the query's prompt")]:
        if "q.png" in str(args[1]):
            from shutil import copy
            copy(query, tmp_path / "q.png")
        r = _cli("attribute", "rank", "--train", small_train, "--out", tmp_path / "bad", *args)
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "bad").exists()


def test_gold_standard_runs_end_to_end_and_resumes(tmp_path):
    from difflab.attribute import GoldConfig, UnlearnConfig, gold_standard
    cfg = GoldConfig(n_train=24, queries=2, k=3, steps=4, batch=8, methods=("unlearn", "features", "random"),
                     unlearn=UnlearnConfig(steps=2, grad_accum=1, batch=4, time_samples=2), eval_stride=100)
    # two shards split the 6 retrainings; the first to finish reports the other's jobs as pending
    first = gold_standard(tmp_path / "gold", cfg, progress=False, shard=(0, 2))
    assert first == {"pending": ["features-0", "unlearn-1", "random-1"]}
    assert not (tmp_path / "gold" / "metrics.json").exists()
    m = gold_standard(tmp_path / "gold", cfg, progress=False, shard=(1, 2))
    for name in ("unlearn", "features", "random"):
        assert set(m[name]) >= {"loss_increase", "clip_distance", "mse", "factors_changed", "per_query"}
        assert len(m[name]["per_query"]["loss_increase"]) == 2
    ranks = json.loads((tmp_path / "gold" / "rankings.json").read_text())
    assert all(len(v) == 3 for v in ranks.values()) and len(ranks) == 6
    assert m["unlearn"]["forgetting"] > 0   # how much unlearning raised the training losses overall
    stamp = (tmp_path / "gold" / "retrain" / "unlearn-0.json").stat().st_mtime_ns
    m2 = gold_standard(tmp_path / "gold", cfg, progress=False)   # resumes: nothing retrained
    assert (tmp_path / "gold" / "retrain" / "unlearn-0.json").stat().st_mtime_ns == stamp
    assert m2["unlearn"]["loss_increase"] == m["unlearn"]["loss_increase"]
    with pytest.raises(DifflabError, match=r"other settings \(k\)"):   # a resume with other settings is refused
        gold_standard(tmp_path / "gold", replace(cfg, k=2), progress=False)
    # removing nothing retrains the very same model: the counterfactual is exact up to the removal
    from difflab.attribute.gold import train_small
    from difflab.attribute.unlearn import training_data
    from difflab.core.data import encode_prompts
    from difflab.models import load_pipeline
    pipe = load_pipeline("shapes")
    data = training_data(pipe, tmp_path / "gold" / "train")
    empty = encode_prompts(pipe, [""])[0]
    # (bit for bit on a GPU too: train_small asks the trainer for deterministic kernels)
    a, b = train_small(data, empty, pipe.scheduler, cfg), train_small(data, empty, pipe.scheduler, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    # a removed image cannot reach the retrained model: replacing its latent by noise changes no weight, while
    # training on it (nothing removed) does
    z = data.z.clone()
    z[[0, 5]] = torch.randn_like(z[[0, 5]]) * 10
    other = replace(data, z=z)
    r1, r2 = (train_small(d, empty, pipe.scheduler, cfg, removed=[0, 5]) for d in (data, other))
    assert all(torch.equal(x, y) for x, y in zip(r1.parameters(), r2.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), r1.parameters()))


def test_gold_cli_refuses_bad_options(tmp_path):
    r = _cli("attribute", "gold", "--out", tmp_path / "g", "--methods", "unlearn,magic")
    assert r.exit_code == 2 and "unknown magic" in r.output
    r = _cli("attribute", "gold", "--out", tmp_path / "g", "--k", 10, "--n-train", 10)
    assert r.exit_code == 2 and "whole training set" in r.output
    r = _cli("attribute", "gold", "--out", tmp_path / "g", "--shard", "3/3")
    assert r.exit_code == 2 and "expected I/N" in r.output and not (tmp_path / "g").exists()
    # --query-seed reaches the run's settings: a folder made with the default seed refuses another one
    from dataclasses import asdict

    from difflab.attribute import GoldConfig
    (tmp_path / "g").mkdir()
    # (a folder made before GoldConfig had `deterministic`: the missing setting counts as its default, not as a change)
    old = {k: v for k, v in asdict(GoldConfig()).items() if k != "deterministic"}
    (tmp_path / "g" / "config.json").write_text(json.dumps(old))
    r = _cli("attribute", "gold", "--out", tmp_path / "g", "--query-seed", 33000)
    assert r.exit_code == 2 and "other settings (query_seed)" in r.output
    # likewise the benchmark's --recipe and --style reach its build settings (a default-built folder refuses them)
    from difflab.attribute import BenchmarkConfig
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(asdict(BenchmarkConfig())))
    r = _cli("attribute", "benchmark", "--out", tmp_path / "b", "--recipe", "--style", "combination")
    assert r.exit_code == 2 and "other settings (customize, style)" in r.output
    r = _cli("attribute", "benchmark", "--out", tmp_path / "b", "--params", "xattn")   # so does --params
    assert r.exit_code == 2 and "other settings (customize)" in r.output
    r = _cli("attribute", "benchmark", "--out", tmp_path / "b", "--params", "qkv")
    assert r.exit_code == 2 and "qkv" in r.output
    r = _cli("attribute", "benchmark", "--out", tmp_path / "b", "--tune-head", "mlp")
    assert r.exit_code == 2 and "mlp" in r.output


def test_benchmark_cli_passes_the_tuning_options(tmp_path, monkeypatch):
    import difflab.attribute
    seen = {}
    monkeypatch.setattr(difflab.attribute, "run_benchmark", lambda out, cfg, shard: seen.update(cfg=cfg) or {})
    r = _cli("attribute", "benchmark", "--out", tmp_path / "b", "--tune-head", "channel", "--tune-lr", "0.003",
             "--tune-hard-negatives", "16", "--tune-temperature", "0.02")
    assert r.exit_code == 0, r.output
    t = seen["cfg"].tune
    assert (t.head, t.lr, t.hard_negatives, t.temperature) == ("channel", 0.003, 16, 0.02)
    r = _cli("attribute", "benchmark", "--out", tmp_path / "b", "--tune-head", "linear", "--tune-lr", "1e-4",
             "--tune-whiten", "0", "--folds", "7")
    assert (seen["cfg"].tune.head, seen["cfg"].tune.lr, seen["cfg"].tune.whiten) == ("linear", 1e-4, 0)
    assert seen["cfg"].folds == 7
    from difflab.attribute import TuneConfig
    _cli("attribute", "benchmark", "--out", tmp_path / "b")
    assert seen["cfg"].tune == TuneConfig(progress=seen["cfg"].tune.progress)   # the CLI's defaults are TuneConfig's
    assert seen["cfg"].folds == 0   # cross-validation is asked for


def test_abc_benchmark_builds_tunes_and_scores_every_method(tmp_path):
    from difflab.attribute import BenchmarkConfig, TuneConfig, UnlearnConfig, run_benchmark
    from difflab.customize import CustomizeConfig
    cfg = BenchmarkConfig(models=2, extra_train_models=1, synth_per_model=2, distractors=40,
                          customize=CustomizeConfig(steps=2, lr=2e-3, augment=False, num_class_images=2, progress=False),
                          tune=TuneConfig(steps=3, batch=2, negatives=8, calibrate_steps=2, progress=False),
                          unlearn=UnlearnConfig(steps=1, grad_accum=1, batch=2, time_samples=2),
                          unlearn_queries=1, unlearn_distractors=10)
    m = run_benchmark(tmp_path / "abc", cfg, progress=False)
    with pytest.raises(DifflabError, match=r"other settings \(style\)"):   # its models would be mixed with others
        run_benchmark(tmp_path / "abc", replace(cfg, style="combination"), progress=False)
    for name in ("features", "whitened", "tuned", "unlearn", "oracle"):
        assert set(m[name]) == {"map", "recall@5", "recall@10", "recall@100"} and 0 < m[name]["map"] <= 1
    # the test model (1) is a style model: its fidelity is a share of its 2 queries, and its row is the whole split
    assert set(m["fidelity"]) == {"style"} and m["fidelity"]["style"] in (0.0, 0.5, 1.0)
    assert m["by_kind"]["style"]["features"] == m["features"]
    assert m["models"] == {"train": 2, "test": 1} and m["queries"] == 2   # models 0 and 2 train, 1 tests
    # intervals over the test models: with one test model, every draw is that model, so each is its mean
    assert m["ci95"]["tuned"]["recall@10"] == pytest.approx([m["tuned"]["recall@10"]] * 2, abs=1e-4)
    gain = m["tuned"]["map"] - m["features"]["map"]
    assert m["ci95"]["tuned - features"]["map"] == pytest.approx([gain] * 2, abs=1e-4)
    assert m["unlearn_subset"]["forgetting"] > 0   # AbU's overall rise of the candidates' losses, saved per query
    # with 40 distractors + 1 exemplar, Recall@100 finds every exemplar
    assert m["features"]["recall@100"] == 1.0
    d = tmp_path / "abc" / "models" / "01"
    assert (d / "weights").is_dir() and len(list((d / "synth").glob("*.png"))) == 2
    heads = tmp_path / "abc" / "heads"
    r = _cli("attribute", "rank", "--train", tmp_path / "abc" / "distractors", "--query", d / "synth" / "000000.png",
             "--method", "tuned", "--heads", heads, "--out", tmp_path / "rank")
    assert r.exit_code == 0, r.output
    top = json.loads((tmp_path / "rank" / "metrics.json").read_text())["top"]
    assert all(0 <= t["probability"] <= 1 for t in top)
    # heads per family need a training model of each: models 0 and 2 are both objects
    with pytest.raises(DifflabError, match="none is a style model"):
        run_benchmark(tmp_path / "abc", replace(cfg, heads_per_kind=True, unlearn_queries=0), progress=False)
    # one more model (3, a style model: the others are the same models) and the tagger's readings as the encoder;
    # 2-fold cross-validation over the 4 models as well
    with pytest.raises(DifflabError, match="2 to 4 folds"):   # refused before anything is built
        run_benchmark(tmp_path / "abc", replace(cfg, extra_train_models=2, unlearn_queries=0, folds=5), progress=False)
    assert not (tmp_path / "abc" / "models" / "03").exists()
    m = run_benchmark(tmp_path / "abc", replace(cfg, extra_train_models=2, heads_per_kind=True, encoder="shapes-tagger",
                                                unlearn_queries=0, folds=2), progress=False)
    assert m["models"] == {"train": 3, "test": 1} and 0 < m["tuned"]["map"] <= 1 and "unlearn" not in m
    cv = m["crossval"]
    assert (cv["folds"], cv["models"], cv["queries"]) == (2, 4, 8) and set(cv["fidelity"]) == {"object", "style"}
    assert set(cv["by_kind"]) == {"object", "style"} and 0 < cv["tuned"]["map"] <= 1 and "oracle" in cv
    rows = json.loads((tmp_path / "abc" / "per_query_crossval.json").read_text())
    assert sorted((r["model"], r["query"]) for r in rows["tuned"]) == [(j, q) for j in range(4) for q in range(2)]
    assert [json.loads((heads / k / "heads.json").read_text())["train_models"] for k in ("object", "style")] \
        == [[0, 2], [3]]
    from difflab.attribute.tuned import load_heads
    assert load_heads(heads / "style", "shapes-tagger").dim == 30   # 6 + 6 + 3 + 9 + 3 + 3 trained values
    with pytest.raises(DifflabError, match="one pair of heads per family: pass .*object or .*style"):
        load_heads(heads)   # the first run's single pair is gone with the rerun
    run_benchmark(tmp_path / "abc", replace(cfg, extra_train_models=2, unlearn_queries=0), progress=False)
    assert not (tmp_path / "abc" / "per_query_crossval.json").exists()   # a run without folds leaves no stale one


def test_cross_validation_scores_each_fold_with_heads_that_never_saw_it():
    from difflab.attribute import TuneConfig
    from difflab.attribute.benchmark import cross_validate, crossval_folds, fit_heads, kind_scorer, score_queries
    cons = [{"kind": k, "exemplars": []} for k in ("object", "style") * 5]   # models 0-9, alternating families
    folds = crossval_folds(range(10), cons, 3)
    # each family dealt round-robin: every model once, every fold holds both families
    assert folds == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5]]
    with pytest.raises(DifflabError, match="2 to 10 folds"):
        crossval_folds(range(10), cons, 1)
    g = torch.Generator().manual_seed(0)
    concept = torch.randn(10, 8, generator=g)   # each model's queries and exemplars share a direction
    ex = {j: concept[j] + 0.7 * torch.randn(2, 8, generator=g) for j in range(10)}
    syn = {j: concept[j] + 0.7 * torch.randn(3, 8, generator=g) for j in range(10)}
    dis = torch.randn(200, 8, generator=g)
    dis_factors = [json.dumps({"i": i}) for i in range(200)]
    tcfg = TuneConfig(steps=30, batch=4, negatives=16, lr=0.05, calibrate_steps=2, progress=False)
    per = cross_validate(range(10), 3, cons, ex, syn, dis, dis_factors, tcfg, per_kind=True)
    assert sorted((r["model"], r["query"]) for r in per["tuned"]) == [(j, q) for j in range(10) for q in range(3)]
    # the rows of fold [4, 5] are those of heads fitted on the other 8 models alone
    heads = fit_heads([0, 1, 2, 3, 6, 7, 8, 9], cons, ex, syn, dis, tcfg, per_kind=True)
    alone = score_queries([4, 5], cons, dis_factors, {4: 3, 5: 3}, {4: 2, 5: 2}, kind_scorer(heads, cons, dis, ex, syn))
    assert [r for r in per["tuned"] if r["model"] in (4, 5)] == alone["tuned"]
    assert [r for r in per["tuned"] if r["model"] in (4, 5)] != \
        score_queries(   # and not those of heads that saw the fold: the data tells the two apart
[4, 5], cons, dis_factors, {4: 3, 5: 3}, {4: 2, 5: 2}, kind_scorer(
            fit_heads(list(range(10)), cons, ex, syn, dis, tcfg, per_kind=True), cons, dis, ex, syn))["tuned"]


def test_benchmark_reference_reads_the_ground_truth():
    from difflab.attribute.benchmark import fidelity, oracle_features, shows_concept
    from difflab.world.draw import render
    heart = {"shape": "heart", "color": "red", "size": "large", "position": "center", "background": "white",
             "texture": "solid"}
    circle, blue = {**heart, "shape": "circle"}, {**heart, "color": "blue"}
    assert fidelity([render(heart), render(circle)], {"kind": "object", "exemplars": [heart]}) == 0.5
    assert shows_concept([render(circle), render(blue), render(heart)], {"kind": "object", "exemplars": [heart]}) \
        == [False, True, True]   # per image: an object is its shape, whatever the colour
    dotted = {**heart, "shape": "square", "texture": "dotted"}
    # a style is its texture and colour: another shape keeps it, another colour does not
    style = {"kind": "style", "exemplars": [dotted]}
    assert fidelity([render({**dotted, "shape": "star"}), render({**dotted, "color": "blue"})], style) == 0.5
    f = oracle_features([render(heart), render(heart), render(circle), render(blue)])
    s = f @ f[0]
    assert s[1] > 0.999 and s[2] < 0.95 and s[3] < 0.95
    # the network under the readings: 256-d, unit length, the same image the same feature
    b = oracle_features([render(heart), render(heart), render(circle)], readout=False)
    assert b.shape == (3, 256) and torch.allclose(b.norm(dim=-1), torch.ones(3)) and (b @ b[0])[1] > 0.999
    assert (b @ b[0])[2] < 0.999


def test_benchmark_style_all_but_shape_shares_every_factor_but_the_shape(tmp_path):
    from difflab.attribute import BenchmarkConfig
    from difflab.attribute.benchmark import _write_exemplars, concepts
    default, template = concepts(BenchmarkConfig(models=4, extra_train_models=0)), \
        concepts(BenchmarkConfig(models=4, extra_train_models=0, style="all-but-shape"))
    assert default[0] == template[0]                          # object models are the same
    ex = template[1]["exemplars"]
    assert len({e["shape"] for e in ex}) == 3 and ex[0]["texture"] == "dotted" and ex[0]["size"] == "large"
    assert all({k: v for k, v in e.items() if k != "shape"} == {k: v for k, v in ex[0].items() if k != "shape"}
               for e in ex)
    combo = concepts(BenchmarkConfig(models=4, extra_train_models=0, style="combination"))[1]["exemplars"]
    assert combo[0]["texture"] in ("solid", "striped", "outline") and len({e["shape"] for e in combo}) == 3
    with pytest.raises(DifflabError, match="unknown style"):
        concepts(BenchmarkConfig(models=2, extra_train_models=0, style="colour"))
    _write_exemplars(tmp_path / "ex", ex, name_shape=True)   # the captions name each exemplar's shape
    from difflab.core.data import read_metadata
    assert [r["prompt"] for r in read_metadata(tmp_path / "ex")] == [f"a <new1> {e['shape']}" for e in ex]


def test_benchmark_build_splits_between_shards_into_the_same_models(tmp_path):
    from difflab.attribute import BenchmarkConfig, TuneConfig, run_benchmark
    from difflab.attribute.benchmark import build
    from difflab.customize import CustomizeConfig
    from safetensors.torch import load_file
    cfg = BenchmarkConfig(models=2, extra_train_models=1, synth_per_model=1, distractors=6, unlearn_queries=0,
                          customize=CustomizeConfig(steps=2, lr=2e-3, augment=False, num_class_images=2, progress=False),
                          tune=TuneConfig(steps=2, batch=2, negatives=4, calibrate_steps=1, progress=False))
    whole = build(tmp_path / "whole", cfg, progress=False)
    assert whole[1] == []
    # shard 1 of 2 first (model 1 alone: it must still train with model 0's class images), then shard 0 evaluates
    first = run_benchmark(tmp_path / "split", cfg, progress=False, shard=(1, 2))
    assert first == {"pending": ["model-00", "model-02"]} and not (tmp_path / "split" / "metrics.json").exists()
    m = run_benchmark(tmp_path / "split", cfg, progress=False, shard=(0, 2))
    assert "features" in m and (tmp_path / "split" / "metrics.json").exists()
    for j in range(3):
        a, b = (load_file(tmp_path / f / "models" / f"{j:02d}" / "weights" / "pytorch_custom_diffusion_weights.safetensors")
                for f in ("whole", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "split").glob(".distractors.*")) and not list((tmp_path / "split" / "class").glob(".*"))


def test_tagger_learns_what_the_captions_name_and_embeds_any_image(tmp_path):
    """train_tagger: supervised by the captions only (held-out values have no class); its readings as features."""
    from difflab.attribute.features import tagger_features
    from difflab.world.draw import FACTORS, render
    from difflab.world.oracle import Oracle
    from difflab.world.train import train_tagger
    acc = train_tagger(tmp_path, steps=60, batch=64, n=256)
    # 60 steps on 256 images: the factors the captions name most plainly are read far above chance (1/9, 1/3)
    assert acc["tagger_acc_position"] > 0.8 and acc["tagger_acc_background"] > 0.8
    folder = tmp_path / "tagger" / "final"
    assert Oracle.from_pretrained(folder).factor_values == {f: list(FACTORS[f][0]) for f in FACTORS}   # no heart, no dotted
    a = {"shape": "star", "color": "red", "size": "large", "position": "center", "background": "white", "texture": "solid"}
    b = {**a, "background": "black", "position": "top left"}
    f = embed_images([render(a), render(a), render(b)], str(folder))
    assert f.shape == (3, 30) and torch.allclose(f.norm(dim=-1), torch.ones(3)) and (f @ f[0])[1] > 0.999
    assert (f @ f[0])[2] < (f @ f[0])[1]
    # the shipped tagger: an image of another size and mode is converted and resized to its 32 x 32 input
    big = render(a).resize((64, 64)).convert("RGBA")
    g = tagger_features([render(a), big, render(b)])
    assert g.shape == (3, 30) and (g @ g[0])[1] > (g @ g[0])[2]
    assert torch.equal(g, embed_images([render(a), big, render(b)], "shapes-tagger"))
    # "A+B": the encoders' features side by side, each unit length, then unit length together
    both = embed_images([render(a), render(b)], "shapes-clip+shapes-tagger")
    clip = embed_images([render(a), render(b)], "shapes-clip")
    assert both.shape == (2, clip.shape[1] + 30)
    assert torch.allclose(both, torch.cat([clip, g[[0, 2]]], -1) / 2 ** 0.5, atol=1e-6)
