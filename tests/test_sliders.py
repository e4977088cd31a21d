"""difflab.sliders: SliderSpace and Concept Sliders end to end on a tiny pipeline, formats, and bad input."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difflab.cli import main
from difflab.models import load_pipeline


def _img(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def discover_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sl") / "run"
    res = CliRunner().invoke(main, ["sliders", "discover", "--model", str(tiny_pipeline_dir), "--prompt", "a shape",
                                    "--num", "2", "--samples", "8", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_discover_writes_loadable_sliders(discover_run, tiny_pipeline_dir, tmp_path):
    for i in range(2):
        d = discover_run / f"slider_{i}"
        assert (d / "pytorch_lora_weights.safetensors").is_file() and (d / "strip.png").is_file()
        cfg = json.loads((d / "slider_config.json").read_text())
        assert cfg["pc_index"] == i and cfg["rank"] == 1 and cfg["alpha"] == 1
    assert (discover_run / "contact_sheet.png").is_file()
    m = json.loads((discover_run / "metrics.json").read_text())
    assert len(m["explained_variance_ratio"]) == 2 and m["explained_variance_ratio"][0] >= m["explained_variance_ratio"][1]
    # plain diffusers loads the folder, and its images equal difflab's --slider at scale 1
    pipe = load_pipeline(tiny_pipeline_dir)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    base = pipe("a shape", generator=torch.Generator().manual_seed(5), **kw).images[0]
    pipe.load_lora_weights(discover_run / "slider_0")
    lora = pipe("a shape", generator=torch.Generator().manual_seed(5), **kw).images[0]
    assert np.abs(lora - base).max() > 1e-3
    res = CliRunner().invoke(main, ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a shape", "--seed", "5",
                                    "--steps", "3", "--slider", f"{discover_run / 'slider_0'}:1", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert np.abs(_img(tmp_path / "g" / "000000.png") - np.round(lora * 255)).max() <= 1


def test_ortho_init_trains_only_a(tiny_pipeline_dir):
    from difflab.sliders.lora import add_sliders, trainable_flags
    pipe = load_pipeline(tiny_pipeline_dir)
    s = add_sliders(pipe.unet, ["s0", "s1"], init="ortho", seed=0)
    assert all(".lora_A." in k for k in s["s0"])
    pipe.unet.set_adapters(["s1"], [1.0])           # peft re-enables every tensor of the active adapter...
    trainable_flags(pipe.unet, s)                     # ...so the flags are set again
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n for n in trainable)
    for mod in pipe.unet.modules():                   # B is a unit vector per layer (rank 1)
        if hasattr(mod, "lora_B") and "s0" in mod.lora_B:
            assert torch.linalg.norm(mod.lora_B["s0"].weight) == pytest.approx(1.0, abs=1e-5)


def test_text_slider_scales_both_ways_and_diverse_mode(discover_run, tiny_pipeline_dir, tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["sliders", "text", "--model", str(tiny_pipeline_dir), "--target", "a shape", "--positive",
                          "a large shape", "--negative", "a small shape", "--steps", "2", "--attributes", "red, blue",
                          "--nouns", "circle", "--out", str(tmp_path / "ts")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ts" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "ts" / "strip.png").is_file()
    meta = json.loads((tmp_path / "ts" / "slider_config.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 1 and meta["positive"] == "a large shape"
    assert meta["attributes"] == ["red", "blue"] and meta["nouns"] == ["circle"]
    args = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a shape", "--steps", "3"]
    for name, spec in (("pos", ":2"), ("neg", ":-2"), ("zero", ":0")):
        assert r.invoke(main, args + ["--slider", f"{tmp_path / 'ts'}{spec}", "--out", str(tmp_path / name)]).exit_code == 0
    assert r.invoke(main, args + ["--out", str(tmp_path / "base")]).exit_code == 0
    assert np.abs(_img(tmp_path / "zero" / "000000.png") - _img(tmp_path / "base" / "000000.png")).max() <= 1
    # delayed start: from the last of 3 steps only, closer to the base than from step 0
    assert r.invoke(main, args + ["--slider", f"{tmp_path / 'ts'}:2", "--slider-start", "2",
                                  "--out", str(tmp_path / "late")]).exit_code == 0
    d_full = np.abs(_img(tmp_path / "pos" / "000000.png") - _img(tmp_path / "base" / "000000.png")).sum()
    d_late = np.abs(_img(tmp_path / "late" / "000000.png") - _img(tmp_path / "base" / "000000.png")).sum()
    assert d_late < d_full
    res = r.invoke(main, args + ["--n", "3", "--sliders", str(discover_run), "--diverse", "--out", str(tmp_path / "div")])
    assert res.exit_code == 0, res.output
    recs = [json.loads(l) for l in (tmp_path / "div" / "metadata.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(1 <= len(rec["sliders"]) <= 2 for rec in recs)


def test_kohya_import_reproduces_the_slider(discover_run, tiny_pipeline_dir, tmp_path):
    """An official-style .pt (kohya keys, torch.save) made from a difflab slider imports to the same slider."""
    from safetensors.torch import load_file
    sd = load_file(discover_run / "slider_1" / "pytorch_lora_weights.safetensors")
    kohya = {}
    for k, v in sd.items():
        path = k.removeprefix("unet.").rsplit(".lora_", 1)[0]
        base = "lora_unet_" + path.replace(".", "_")
        kohya[base + (".lora_down.weight" if ".lora_A." in k else ".lora_up.weight")] = v.to(torch.bfloat16)
        kohya[base + ".alpha"] = torch.tensor(1.0)
    torch.save(kohya, tmp_path / "slider_1.pt")
    r = CliRunner()
    res = r.invoke(main, ["sliders", "import", str(tmp_path / "slider_1.pt"), "--model", str(tiny_pipeline_dir),
                          "--out", str(tmp_path / "imp")])
    assert res.exit_code == 0, res.output
    args = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a shape", "--steps", "3"]
    assert r.invoke(main, args + ["--slider", str(tmp_path / "imp"), "--out", str(tmp_path / "a")]).exit_code == 0
    assert r.invoke(main, args + ["--slider", str(discover_run / "slider_1"), "--out", str(tmp_path / "b")]).exit_code == 0
    assert np.abs(_img(tmp_path / "a" / "000000.png") - _img(tmp_path / "b" / "000000.png")).max() <= 2


def test_bad_input(discover_run, tiny_pipeline_dir, tmp_path):
    r = CliRunner()
    args = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a shape", "--steps", "2", "--out", str(tmp_path / "o")]
    res = r.invoke(main, args + ["--slider", f"{discover_run / 'slider_0'}:big"])
    assert res.exit_code == 2 and "is not a number" in res.output and not (tmp_path / "o").exists()
    res = r.invoke(main, ["generate", "--prompt", "a shape", "--steps", "2", "--out", str(tmp_path / "o"),
                          "--slider", str(discover_run / "slider_0")])            # made for the tiny model, not shapes
    assert res.exit_code == 2 and "another base model" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    res = r.invoke(main, ["sliders", "discover", "--model", str(tiny_pipeline_dir), "--prompt", "a shape", "--num", "8",
                          "--samples", "8", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--num 8" in res.output and not (tmp_path / "d").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    res = r.invoke(main, ["sliders", "import", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "i")])
    assert res.exit_code == 2 and "cannot read" in res.output


def test_measures():
    from difflab.sliders.text import with_attribute
    assert with_attribute("a large shape", "red") == "a large red shape" and with_attribute("a shape", "") == "a shape"
    assert with_attribute("a large shape", "red", "circle") == "a large red circle"
    assert with_attribute("a shape", "", "star") == "a star" and with_attribute("shape", "red") == "red shape"
    from difflab.sliders.evaluate import factor_diversity, random_compositions, tv_distance
    assert tv_distance(["a", "a", "b", "b"], ["a", "b", "b", "b"], ("a", "b")) == pytest.approx(0.25)
    f = {"shape": "star", "color": "red", "size": "small", "position": "center", "background": "white", "texture": "solid"}
    g = {**f, "color": "blue", "size": "large"}
    assert factor_diversity([f, f, g]) == pytest.approx((0 + 2 + 2) / 3)
    w = random_compositions(50, 8, seed=0, k=2, max_scale=2.0)
    assert ((w != 0).sum(1) == 2).all() and np.abs(w).max() <= 2.0


def test_measure_ordinal_draws_every_image_from_its_own_seed(monkeypatch):
    import difflab.sliders.evaluate as ev
    from difflab.sliders.text import measure_ordinal
    seeds = []

    def fake_generate_at(pipe, names, weights, prompt, n, seed, start=0, fixed=((), ()), end=None):
        seeds.append((weights[0], prompt, list(range(seed, seed + n))))
        return [(prompt, seed + i, weights[0]) for i in range(n)]

    class Oracle:   # size follows the scale; seed 3 stays medium throughout; "a blue square" reads red at +2
        def predict(self, items):
            out = []
            for prompt, seed, scale in items:
                _, color, shape = prompt.split()
                size = "medium" if seed == 3 or scale == 0 else ("large" if scale > 0 else "small")
                out.append({"shape": shape, "color": "red" if scale == 2 and prompt == "a blue square" else color,
                            "size": size})
            return out

    monkeypatch.setattr(ev, "generate_at", fake_generate_at)
    r = measure_ordinal(None, "s", ["a red circle", "a blue square"], seed=0, n=8, scales=(-2.0, 0.0, 2.0),
                        oracle=Oracle())
    at_zero = [s for w, _, ss in seeds if w == 0.0 for s in ss]
    assert sorted(at_zero) == list(range(8))          # 8 images, 8 different seeds (not 4 seeds twice)
    assert r["n"] == 8 and r["size_top_gt_bottom"] == 7 / 8 and r["size_monotone"]
    assert r["shape_color_unchanged"] == 0.5 and r["shape_color_unchanged_by_scale"]["+2"] == 0.5
    assert r["shape_color_as_prompted_by_scale"] == {"-2": 1.0, "+0": 1.0, "+2": 0.5}


def test_slider_window_switches_on_at_start_and_off_at_end():
    from difflab.sliders.lora import delayed_start

    class Pipe:
        weights = None

        def set_adapters(self, names, adapter_weights):
            self.weights = list(adapter_weights)
    pipe, seen = Pipe(), []
    kw = delayed_start(pipe, ["s"], [1.5], start=2, end=4, fixed=(["other"], [0.5]))
    for i in range(6):   # the weights in force during step i, then the pipeline's callback after it
        seen.append(pipe.weights[1])
        kw["callback_on_step_end"](pipe, i, None, {})
    assert seen == [0.0, 0.0, 1.5, 1.5, 0.0, 0.0] and pipe.weights[0] == 0.5
    assert delayed_start(pipe, ["s"], [1.5]) == {} and pipe.weights == [1.5]   # no window: on from the start
