import json

import pytest
import torch
from PIL import Image

from difflab.errors import DifflabError
from difflab.similarity import (Backbone, DreamSim, evaluate_2afc, hinge_loss, make_2afc, make_preprocess,
                                pixel_l2, read_2afc, train_dreamsim)


def tiny_clip_backbone(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    m = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=2, image_size=32, patch_size=8,
                                                       projection_dim=16))
    return Backbone(m, "clip", 32, (0.5,) * 3, (0.5,) * 3, "tiny")


def test_distance_is_one_minus_cosine_of_centred_embeddings():
    model = DreamSim([tiny_clip_backbone(), tiny_clip_backbone(1)]).eval()
    a, b = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    ea, eb = model.embed(a), model.embed(b)
    assert ea.shape == (3, 32)
    assert torch.allclose(ea.norm(dim=-1), torch.ones(3), atol=1e-5) and ea.mean(-1).abs().max() < 1e-6
    assert torch.allclose(model(a, b), 1 - (ea * eb).sum(-1), atol=1e-5)
    assert model(a, a).abs().max() < 1e-5


def test_hinge_loss_by_hand():
    d0, d1 = torch.tensor([0.5, 0.1]), torch.tensor([0.1, 0.12])
    p1 = torch.tensor([1.0, 1.0])   # img1 closer in both
    # first: logit 0.4 -> max(0, 0.05 - 0.4) = 0; second: logit -0.02 -> 0.07
    assert hinge_loss(d0, d1, p1).item() == pytest.approx(0.035)


def test_shapes_2afc_set_is_written_in_nights_layout_and_read_back(tmp_path):
    make_2afc(tmp_path / "t", n=30, seed=3)
    assert (tmp_path / "t" / "data.csv").exists()
    train, test = read_2afc(tmp_path / "t", "train"), read_2afc(tmp_path / "t", "test")
    assert len(train) == 21 and len(test) == 6
    assert all(t["p1"] in (0.0, 1.0) and t["ref"].exists() and t["img1"].exists() for t in train)
    with pytest.raises(DifflabError, match="no data.csv"):
        read_2afc(tmp_path)


def test_lora_training_raises_2afc_and_round_trips(tmp_path, monkeypatch):
    import difflab.similarity as sim
    make_2afc(tmp_path / "t", n=200, seed=0)
    trip = read_2afc(tmp_path / "t")
    model = DreamSim([tiny_clip_backbone()])
    before = evaluate_2afc(model, trip, 32)["2afc"]
    hist = train_dreamsim(model, trip, mode="lora", steps=150, batch_size=32, lr=3e-3, progress=False,
                          lora={"r": 4, "alpha": 8, "dropout": 0.0})
    after = evaluate_2afc(model, trip, 32)["2afc"]
    assert hist["loss"][-1] < hist["loss"][0] and after > before + 0.05
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sim, "load_backbone", lambda s: tiny_clip_backbone())
    again = DreamSim.from_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again(x, x.flip(0)), model(x, x.flip(0)), atol=1e-6)


def test_loading_onto_another_backbone_fails_clearly(tmp_path, monkeypatch):
    import difflab.similarity as sim
    model = DreamSim([tiny_clip_backbone()])
    model.add_lora(r=2)
    model.save_pretrained(tmp_path / "m")

    def other(_):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        m = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=32, patch_size=8,
                                                           projection_dim=16))
        return Backbone(m, "clip", 32, (0.5,) * 3, (0.5,) * 3, "other")
    monkeypatch.setattr(sim, "load_backbone", other)
    with pytest.raises(DifflabError, match="does not fit"):
        DreamSim.from_pretrained(tmp_path / "m")


def test_preprocess_resizes_any_mode():
    pre = make_preprocess(32)
    x = pre(Image.new("L", (50, 40), 128))
    assert x.shape == (1, 3, 32, 32) and 0.49 < x.mean() < 0.52


def test_pixel_l2_baseline_disagrees_with_the_rule(tmp_path):
    make_2afc(tmp_path / "t", n=150, seed=1)
    score = evaluate_2afc(pixel_l2, read_2afc(tmp_path / "t"), 32)["2afc"]
    assert score < 0.85   # the rule weighs shape over background: pixels alone cannot follow it


def test_world_triplets_have_a_clear_ground_truth_and_render_in_memory():
    from difflab.similarity import FACTOR_WEIGHTS, render_triplets, world_triplets
    MIN_GAP = 0.5
    trip = world_triplets(300, seed=4, min_gap=MIN_GAP)

    def d(f, g):
        return sum(w for k, w in FACTOR_WEIGHTS.items() if f[k] != g[k])
    for ref, a, b, b_closer in trip:
        assert abs(d(ref, a) - d(ref, b)) >= MIN_GAP and b_closer == (d(ref, b) < d(ref, a))
        assert 1 <= sum(ref[k] != a[k] for k in ref) <= 3
    ref, x0, x1, p1 = render_triplets(trip[:5], 32)
    assert ref.shape == x0.shape == (5, 3, 32, 32) and p1.tolist() == [float(t[3]) for t in trip[:5]]
    # training draws the same triplets as rows of the world's image table: pixel-identical to rendering them
    from difflab.similarity import world_codes, world_images, world_index
    codes, closer = world_codes(300, seed=4, min_gap=MIN_GAP)
    table = world_images(32)[torch.from_numpy(world_index(codes[:5]))].float() / 255
    assert torch.equal(table[:, 0], ref) and torch.equal(table[:, 2], x1) and closer[:5].tolist() == p1.bool().tolist()


def test_full_mode_tunes_the_backbone_with_world_triplets_and_round_trips(tmp_path, monkeypatch):
    import difflab.similarity as sim
    make_2afc(tmp_path / "t", n=20, seed=0)
    model = DreamSim([tiny_clip_backbone()])
    w0 = model.backbones[0].model.vision_model.embeddings.patch_embedding.weight.clone()
    hist = train_dreamsim(model, read_2afc(tmp_path / "t"), mode="full", steps=3, batch_size=8, lr=1e-3,
                          progress=False, world=40)
    assert not torch.equal(w0, model.backbones[0].model.vision_model.embeddings.patch_embedding.weight)
    assert len(hist["loss"]) >= 1
    model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sim, "load_backbone", lambda s: tiny_clip_backbone())
    again = DreamSim.from_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again(x, x.flip(0)), model(x, x.flip(0)), atol=1e-6)


def test_init_continues_a_full_model_with_resumable_checkpoints(tmp_path, monkeypatch):
    import difflab.similarity as sim
    from safetensors.torch import load_file
    make_2afc(tmp_path / "t", n=20, seed=0)
    monkeypatch.setattr(sim, "load_backbone", lambda s: tiny_clip_backbone())
    sim.train_and_save(tmp_path / "t", tmp_path / "m", backbones=("tiny",), mode="full", steps=2, batch_size=4,
                       progress=False, world=30)
    sim.train_and_save(tmp_path / "t", tmp_path / "m2", mode="full", steps=3, batch_size=4, lr=1e-2,
                       progress=False, world=30, init=tmp_path / "m", checkpoints=tmp_path / "ck")
    first, second = (load_file(tmp_path / d / sim.WEIGHTS_FILE) for d in ("m", "m2"))
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "ck" / "checkpoints" / "step-3").is_dir()           # a rerun would resume from here
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["init"] == str(tmp_path / "m")
    with pytest.raises(DifflabError, match="continues a full-mode model"):
        sim.train_and_save(tmp_path / "t", tmp_path / "m3", mode="lora", steps=1, init=tmp_path / "m")
    assert not (tmp_path / "m3").exists()


def test_the_shipped_dreamsim_follows_the_rule_on_triplets_it_never_saw(tmp_path):
    """The tuned shapes DreamSim that `dreamsim()` loads: on a fresh set (seed 11, never used in training) it
    agrees with the ground-truth rule far more often than the untuned embedding (measured 0.970 vs 0.757)."""
    from difflab.similarity import dreamsim
    make_2afc(tmp_path / "t", n=400, seed=11, splits=(("test", 1.0),))
    trip = read_2afc(tmp_path / "t")
    tuned, untuned = dreamsim()[0], dreamsim(pretrained=False)[0]
    assert tuned.full_backbones
    s_tuned, s_untuned = (evaluate_2afc(m, trip, 32)["2afc"] for m in (tuned, untuned))
    assert s_tuned >= 0.90 and s_tuned >= s_untuned + 0.10, (s_tuned, s_untuned)


def test_a_clip_folder_is_normalised_as_its_preprocessor_config_says(tmp_path):
    import shutil

    from difflab.models import shapes_dir
    from difflab.similarity import load_backbone
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "clip"
    shutil.copytree(shapes_dir("clip"), folder)   # the shipped CLIP, trained on [-1, 1] pixels, as a plain folder
    with torch.no_grad():
        ref = load_backbone("shapes-clip").eval()(x)
        openai_stats = load_backbone(str(folder)).eval()(x)   # no preprocessor_config.json: OpenAI's statistics
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
        own_stats = load_backbone(str(folder)).eval()(x)
    assert torch.allclose(own_stats, ref, atol=1e-6)
    assert not torch.allclose(openai_stats, ref, atol=1e-3)
