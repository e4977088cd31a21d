"""difflab.detect: data handling, metrics, augmentation order, learning, update with replay, streaming,
pixel-level data and training, and bad input at the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difflab import metrics as M
from difflab.cli import main
from difflab.detect import data as D
from difflab.errors import DifflabError


# --- helpers -------------------------------------------------------------------------------------------------
def _world(tmp_path, n=60, seed=0, name="real"):
    from difflab.world import sample_folder
    return sample_folder(tmp_path / name, n=n, seed=seed)


def _fake_from(real: Path, out: Path, kind: str, seed: int = 0) -> Path:
    """A stand-in generator: the reals with a fingerprint (noise, or a 2x down/up-sampling blur)."""
    out.mkdir()
    rng = np.random.default_rng(seed)
    for f in sorted(real.glob("*.png")):
        a = np.asarray(Image.open(f).convert("RGB")).astype(np.float32)
        if kind == "noise":
            a = a + rng.normal(0, 6, a.shape)
        else:
            a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((16, 16), Image.BILINEAR)
                           .resize((32, 32), Image.BILINEAR)).astype(np.float32)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(out / f"{kind}-{f.name}")
    return out


# --- data ----------------------------------------------------------------------------------------------------
def test_modes_and_sizes_become_square_rgb(tmp_path):
    Image.new("L", (40, 64), 100).save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    Image.new("P", (50, 20)).save(tmp_path / "pal.gif")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.mask.png")   # masks are not images
    arr, paths = D.read_folder(tmp_path, 32)
    assert arr.shape == (3, 32, 32, 3) and arr.dtype == np.uint8
    assert [Path(p).name for p in paths] == ["clear.png", "gray.png", "pal.gif"]
    assert (arr[0] == 255).all()            # fully transparent -> white, not black
    assert (arr[1] == 100).all()            # grayscale replicated to RGB


def test_unreadable_and_empty_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DifflabError, match="has no images"):
        D.read_folder(tmp_path / "empty", 32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DifflabError, match="cannot read image .*a.png"):
        D.read_folder(tmp_path / "bad", 32)


def test_split_by_name_is_stable_and_proportioned():
    names = [f"{i:06d}.png" for i in range(5000)]
    splits = [D.split_of(n) for n in names]
    assert splits == [D.split_of(n) for n in names]
    share = {s: splits.count(s) / len(splits) for s in D.SPLITS}
    assert abs(share["train"] - 0.7) < 0.03 and abs(share["val"] - 0.1) < 0.02 and abs(share["test"] - 0.2) < 0.03
    assert D.split_of("/a/b/000001.png") == D.split_of("000001.png")


def test_augmentation_runs_after_resize_and_before_crop(tmp_path):
    """CNNDetection's order: resize -> blur/JPEG -> crop. A crop of an augmented image differs from an augmented
    crop, so the batch must equal the former exactly."""
    from difflab.detect.image import DetectConfig, training_batches
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)]
    fake = [rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)]
    cfg = DetectConfig(batch_size=2, crop_size=32, load_size=40,
                       augment=D.AugmentConfig(blur_prob=1.0, jpeg_prob=1.0, flip=False))
    x = training_batches(real, fake, [1.0], cfg)(7)["x"]
    r = np.random.default_rng([0, 7])
    r.integers(1, size=1)                                        # the real index draw
    expect = D.crop(D.augment(real[0][0], r, cfg.augment), 32, r)
    assert torch.equal(x[0], torch.from_numpy(expect.copy()).permute(2, 0, 1).float() / 255)
    # the blur's sigma scales with the image: at 32 px sigma 3 (stated for 256 px) is a 0.375 px blur
    im = Image.fromarray(real[0][0][:32, :32])
    assert np.abs(np.asarray(D.blur(im, 3.0)).astype(int) - np.asarray(im)).mean() < \
        np.abs(np.asarray(im.filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3))).astype(int)
               - np.asarray(im)).mean()


# --- metrics -------------------------------------------------------------------------------------------------
def test_auc_threshold_and_iou_against_brute_force():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=300), 1)                       # ties on purpose
    y = rng.random(300) < 0.4
    s[y] += 0.7
    pos, neg = s[y], s[~y]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert M.auc(s, y) == pytest.approx(brute, abs=1e-12)
    t, acc = M.best_threshold(s, y)
    cands = np.concatenate([[s.min() - 1], np.unique(s)])
    best = max(M.balanced_accuracy(s, y, c)[0] for c in cands)
    assert acc == pytest.approx(best) and M.balanced_accuracy(s, y, t)[0] == pytest.approx(best)
    a = np.zeros((4, 4), bool); a[:2] = True
    b = np.zeros((4, 4), bool); b[1:3] = True
    assert M.iou(a, b) == pytest.approx(4 / 12)
    assert M.balanced_accuracy([0.1, 0.9, 0.8], [0, 1, 0], 0.5) == (0.75, 0.5, 1.0)


# --- image-level ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    real = _world(root, n=120)
    return {"real": real, "noise": _fake_from(real, root / "noise", "noise"),
            "blurry": _fake_from(real, root / "blurry", "blur")}


def test_train_learns_then_update_lifts_new_generator_without_forgetting(folders, tmp_path):
    from difflab.detect import DetectConfig, load_detector, train_detector, update_detector
    cfg = DetectConfig(steps=60, batch_size=16, progress=False, augment=D.AugmentConfig(blur_prob=0, jpeg_prob=0))
    m = train_detector([folders["real"]], [folders["noise"]], tmp_path / "run", cfg)
    assert m["ap"] > 0.95 and set(m) >= {"ap", "acc", "acc_best", "acc_calibrated", "per_fake", "threshold"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["per_fake"]["noise"]["ap"] == m["ap"] and saved["n_real"] == m["n_real"] > 0
    before = m["ap"]
    u = update_detector(tmp_path / "run", [folders["blurry"]], tmp_path / "run2", steps=60, progress=False)
    assert set(u["per_fake"]) == {"noise", "blurry"}
    assert u["per_fake"]["blurry"]["ap"] > 0.9
    assert u["per_fake"]["noise"]["ap"] >= before - 0.05          # replay keeps the old generator
    log = json.loads((tmp_path / "run2" / "config.json").read_text())["log"]
    assert [e["op"] for e in log] == ["train", "update"]
    # the saved detector reproduces the in-run predictions bit-exactly after a reload
    model, c = load_detector(tmp_path / "run2")
    res = CliRunner().invoke(main, ["detect", "score", str(tmp_path / "run2"), str(folders["blurry"])])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.output.splitlines()]
    from difflab.detect.image import predict
    arr, _ = D.read_folder(folders["blurry"], c["load_size"])
    assert [r["p_fake"] for r in lines] == [round(float(p), 6) for p in predict(model, arr, c["crop_size"])]
    assert all(r["fake"] == (r["p_fake"] > c["threshold"]) for r in lines)


def test_frozen_probe_saves_only_the_head(folders, tmp_path):
    from safetensors.torch import load_file

    from difflab.detect import DetectConfig, load_detector, train_detector
    train_detector([folders["real"]], [folders["noise"]], tmp_path / "probe",
                   DetectConfig(backbone="shapes-clip", steps=3, batch_size=8, progress=False))
    assert set(load_file(tmp_path / "probe" / "detector.safetensors")) == {"head.weight", "head.bias"}
    model, cfg = load_detector(tmp_path / "probe")
    assert cfg["backbone"] == "shapes-clip" and cfg["crop_size"] == 32


def test_checkpoint_from_another_backbone_is_one_line(folders, tmp_path):
    from difflab.detect import DetectConfig, train_detector
    train_detector([folders["real"]], [folders["noise"]], tmp_path / "run",
                   DetectConfig(steps=2, batch_size=8, width=16, progress=False))
    cfg_path = tmp_path / "run" / "detector_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["backbone"] = "shapes-clip"
    cfg_path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["detect", "score", str(tmp_path / "run"), str(folders["noise"])])
    assert res.exit_code == 2 and "does not fit backbone 'shapes-clip'" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("which", ["empty", "corrupt"])
def test_train_cli_bad_folders_leave_nothing(folders, tmp_path, which):
    bad = tmp_path / which
    bad.mkdir()
    if which == "corrupt":
        Image.new("RGB", (32, 32)).save(bad / "ok.png")
        (bad / "z.png").write_bytes(b"junk")
    res = CliRunner().invoke(main, ["detect", "train", "--real", str(folders["real"]), "--fake", str(bad),
                                    "--steps", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and ("no images" if which == "empty" else "cannot read image") in res.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_stream_writes_a_complete_ap_matrix(folders, tmp_path):
    cfg = {"real": str(folders["real"]),
           "generators": [{"name": "noise", "folder": str(folders["noise"])},
                          {"name": "blurry", "folder": str(folders["blurry"])}],
           "train": {"steps": 20, "batch_size": 16}, "update_steps": 20}
    (tmp_path / "s.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["detect", "stream", "--config", str(tmp_path / "s.json"), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    mat = json.loads((tmp_path / "s" / "ap_matrix.json").read_text())
    assert mat["generators"] == ["noise", "blurry"]
    assert np.array(mat["ap"]).shape == (2, 2) and np.isfinite(mat["ap"]).all()
    assert Image.open(tmp_path / "s" / "ap_matrix.png").size[0] > 100
    (tmp_path / "bad.json").write_text(json.dumps({"real": "x", "generators": [{"name": "a"}]}))
    res = CliRunner().invoke(main, ["detect", "stream", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "at least two generators" in res.output


def test_make_generator_samples_and_reconstructs(tiny_pipeline_dir, tmp_path):
    from difflab.detect import make_generator
    real = _world(tmp_path, n=3)
    a = make_generator({"model": str(tiny_pipeline_dir), "scheduler": "euler", "steps": 2}, real, tmp_path / "a",
                       progress=False)
    b = make_generator({"model": str(tiny_pipeline_dir), "reconstruct": True}, real, tmp_path / "b", progress=False)
    for d in (a, b):
        arr, _ = D.read_folder(d, 32)
        assert arr.shape == (3, 32, 32, 3)
    recs = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == [json.loads(line)["caption"] for line in (real / "metadata.jsonl").read_text().splitlines()]
    with pytest.raises(DifflabError, match="unknown scheduler"):
        make_generator({"model": str(tiny_pipeline_dir), "scheduler": "nope"}, real, tmp_path / "c")


# --- pixel-level ---------------------------------------------------------------------------------------------
def test_masks_cover_15_to_35_percent_and_paste_back_is_exact():
    from difflab.detect.pixel import cutmix, paste_back, random_mask
    rng = np.random.default_rng(0)
    for _ in range(60):
        m = random_mask(rng, 32)
        assert 0.15 <= m.mean() <= 0.35
    a, b = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = paste_back(a, b, m)
    assert (out[~m] == a[~m]).all() and (out[m] == b[m]).all()
    x, cm = cutmix(a, b, rng)
    assert 0.1 <= cm.mean() <= 0.4 and (x[~cm] == a[~cm]).all()


def test_weighted_dice_loss():
    from difflab.detect.pixel import dice_loss
    g = torch.zeros(2, 8, 8, dtype=torch.bool)
    g[:, :2] = True
    big = 20.0 * (g.float() * 2 - 1)
    assert dice_loss(big, g) < 1e-3 and dice_loss(-big, g) > 0.999
    # by hand: 32 fake, 96 real pixels, all called real: w = 1/32^2, 1/96^2;
    # 1 - 2 (96/96^2) / (32/32^2 + 224/96^2) = 0.625 (unweighted Dice over both classes would give 0.25)
    assert dice_loss(torch.full((2, 8, 8), -20.0), g).item() == pytest.approx(0.625, abs=1e-4)
    logits = torch.zeros(2, 8, 8, requires_grad=True)
    dice_loss(logits, g).backward()
    assert (logits.grad[g] < 0).all() and (logits.grad[~g] > 0).all()


def test_inpainting_data_keeps_pixels_outside_the_mask(tiny_pipeline_dir, tmp_path):
    from difflab.detect.pixel import make_inpainted, read_masked_folder
    real = _world(tmp_path, n=4)
    make_inpainted(str(tiny_pipeline_dir), real, tmp_path / "inp", steps=2, progress=False)
    x, m, files = read_masked_folder(tmp_path / "inp", 32)
    src, _ = D.read_folder(real, 32)
    assert x.shape == (4, 32, 32, 3)
    for xi, mi, si in zip(x, m, src):
        assert 0.15 <= mi.mean() <= 0.35
        assert (xi[~mi] == si[~mi]).all()                         # bit-exact outside the hole
        assert (xi[mi] != si[mi]).any()                           # the hole is the generator's
    res = CliRunner().invoke(main, ["detect", "train-pixel", "--inpainted", str(tmp_path / "inp"), "--steps", "2",
                                    "--out", str(tmp_path / "prun")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["detect", "localize", str(tmp_path / "prun"), str(tmp_path / "inp" / "000000.png"),
                                    "--out", str(tmp_path / "ov.png")])
    assert res.exit_code == 0 and Image.open(tmp_path / "ov.png").size[0] > 64
    res = CliRunner().invoke(main, ["detect", "train", "--real", str(real), "--fake", str(tmp_path / "inp"), "--steps",
                                    "1", "--out", str(tmp_path / "irun")])   # masks are skipped as images
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["detect", "localize", str(tmp_path / "irun"), str(tmp_path / "inp" / "000000.png")])
    assert res.exit_code == 2 and "pixel-level run" in res.output


def test_cutmix_pixel_detector_learns(folders, tmp_path):
    from difflab.detect.pixel import PixelConfig, train_pixel_detector
    m = train_pixel_detector([], tmp_path / "cm", PixelConfig(steps=120, batch_size=16, progress=False),
                             real=[folders["real"]], cutmix_fake=[folders["noise"]])
    assert m["test"] == "cutmix" and m["iou"] > 0.6 and m["pixel_ap"] > 0.8, m


def test_cnndetection_recipe_on_a_transformers_resnet(folders, tmp_path):
    """A transformers ResNet (tiny, random, saved locally) trained end to end, saved whole, reloaded equal."""
    from transformers import ResNetConfig, ResNetModel

    from difflab.detect import DetectConfig, load_detector, train_detector
    from difflab.detect.image import predict
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(tmp_path / "rn")
    m = train_detector([folders["real"]], [folders["noise"]], tmp_path / "run",
                       DetectConfig(backbone=str(tmp_path / "rn"), tune="full", steps=3, batch_size=8,
                                    crop_size=32, progress=False))
    model, cfg = load_detector(tmp_path / "run")
    assert cfg["tune"] == "full" and any(k.startswith("features.") for k in model.trainable())
    arr, paths = D.read_folder(folders["noise"], 32)
    test = D.split_mask(paths, "test")
    p_fake = predict(model, arr[test], 32)
    assert m["per_fake"]["noise"]["acc_fake"] == pytest.approx(float((p_fake > 0.5).mean()))
