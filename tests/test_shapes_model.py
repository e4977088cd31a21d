"""The shipped shapes models against the foundation's bars, judged by the oracle (deterministic seeds)."""
import json

import pytest
from click.testing import CliRunner

from difflab.cli import main
from difflab.world import FACTORS, sample
from difflab.world.dataset import render_array
from difflab.world.evaluate import BARS, evaluate, headline
from difflab.world.oracle import judge


def test_oracle_reads_every_factor_of_fresh_images(oracle):
    items = sample(2000, seed=424242, include_heldout=True)
    res = judge(oracle.predict(render_array(items)), [it.factors for it in items])
    for f in FACTORS:
        assert res["accuracy"][f] >= 0.99, (f, res["accuracy"][f])


def test_shipped_pipeline_is_a_real_stable_diffusion_pipeline(shapes_pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    assert isinstance(shapes_pipe, StableDiffusionPipeline)
    assert isinstance(shapes_pipe.unet, UNet2DConditionModel) and isinstance(shapes_pipe.vae, AutoencoderKL)
    assert isinstance(shapes_pipe.text_encoder, CLIPTextModel)
    shapes_pipe.tokenizer.add_tokens(["<new1>"])   # modifier tokens must be addable
    assert "<new1>" in shapes_pipe.tokenizer.tokenize("a <new1> shape")


def test_shipped_weights_are_small_and_safetensors():
    from difflab.models import WEIGHTS
    files = [f for f in WEIGHTS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 50e6
    weights = [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    assert "difflab world train" in card and "Hardware" in card


@pytest.fixture(scope="module")
def quality(shapes_pipe, oracle):
    """The model card's protocol (8 images per prompt, seeds 10000+): CI recomputes the published scores.
    Fewer images are too noisy for the bars (2 per prompt put shape at 87.5% where 8 give 91.3%)."""
    return headline(evaluate(shapes_pipe, oracle, n=8, seed=10_000))


@pytest.mark.parametrize("measure", list(BARS))
def test_shapes_model_meets_its_bar(quality, measure):
    from difflab.models import WEIGHTS
    op, bar = BARS[measure]
    value = quality[measure]
    published = json.loads((WEIGHTS / "scores.json").read_text())["headline"][measure]
    assert abs(value - published) < 1e-9, f"{measure}: measured {value}, the model card says {published}"
    assert (value >= bar) if op == ">=" else (value <= bar), f"{measure} = {value:.3f}, bar {op} {bar}"


def test_judge_cli_on_world_samples(tmp_path):
    r = CliRunner()
    assert r.invoke(main, ["world", "sample", "--n", "40", "--seed", "5", "--out", str(tmp_path / "w")]).exit_code == 0
    res = r.invoke(main, ["judge", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    j = json.loads((tmp_path / "w" / "judge.json").read_text())
    assert j == json.loads(res.output)
    assert j["n"] == 40 and j["joint"] >= 0.97 and set(j["rates"]["shape"]) >= set(FACTORS["shape"][0])
    lines = (tmp_path / "w" / "judge.jsonl").read_text().splitlines()
    assert len(lines) == 40 and set(json.loads(lines[0])["factors"]) == set(FACTORS)


def test_judge_alias(tmp_path):
    r = CliRunner()
    r.invoke(main, ["world", "sample", "--n", "10", "--out", str(tmp_path / "h"), "--where", "shape=heart"])
    meta = tmp_path / "h" / "metadata.jsonl"
    recs = [json.loads(l) for l in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps({"file": x["file"], "prompt": x["caption"].replace("heart", "<new1>")}) + "\n"
                            for x in recs))
    res = r.invoke(main, ["judge", str(tmp_path / "h"), "--alias", "<new1>=heart"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["accuracy"]["shape"] >= 0.9
    res = r.invoke(main, ["judge", str(tmp_path / "h"), "--alias", "<new1>"])
    assert res.exit_code == 2 and "TOKEN=VALUE" in res.output


def test_tour_writes_report_and_metrics(tmp_path):
    res = CliRunner().invoke(main, ["tour", "--out", str(tmp_path / "t"), "--n", "1", "--train-steps", "5",
                                    "--detect-images", "30"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "t" / "report.html").read_text()
    assert "data:image/png;base64" in html and "color_shape.joint" in html
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert 0 <= m["color_shape.joint"] <= 1 and m["command"].startswith("difflab")
    assert (tmp_path / "t" / "generated" / "color_shape" / "judge.json").exists()
    assert "Customize and erase" in html and 0 <= m["edit_new1_rate"] <= 1 and "edit_target_rate_after" in m
    assert "Sliders" in html and "sliders_distinct_dominant_factors" in m
    assert 0 <= m["size_slider_named_shape_color_unchanged"] <= 1
    assert "Detection" in html and 0 <= m["detect_iou"] <= 1 and "detect_ap_ddim25_after_ddim25" in m
    # the shipped tuned DreamSim beside the untuned embedding on the tour's 200 triplets
    assert m["similarity_2afc_dreamsim_tuned"] >= m["similarity_2afc_shapes_clip_untuned"] + 0.10, m
    assert "Attribution" in html and (tmp_path / "t" / "attribute" / "unlearn-0" / "ranking.json").exists()
    # top-8 images share the query's shape and colour (as the oracle reads it) 28 % of the time; chance is ~3 %
    assert m["attribute_top_shape_color_match"] >= 0.25, m["attribute_top_shape_color_match"]
