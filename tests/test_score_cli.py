"""difflab score and similarity commands on the shipped shapes CLIP."""
import json

from click.testing import CliRunner

from difflab.cli import main


def _world(tmp_path, name, n, seed, *extra):
    r = CliRunner().invoke(main, ["world", "sample", "--n", str(n), "--seed", str(seed), "--out",
                                  str(tmp_path / name), *extra])
    assert r.exit_code == 0, r.output
    return tmp_path / name


def test_score_fd_kid_clip_diversity(tmp_path):
    a = _world(tmp_path, "a", 60, 1)
    b = _world(tmp_path, "b", 60, 2)
    hearts = _world(tmp_path, "h", 60, 3, "--where", "shape=heart", "--where", "background=black")
    r = CliRunner()
    fd = lambda x, y: json.loads(r.invoke(main, ["score", str(x), "--metric", "fd", "--ref", str(y)]).output)["fd"]
    assert fd(a, b) < fd(a, hearts)   # two samples of the world are closer than the world and black hearts
    out = r.invoke(main, ["score", str(a), "--metric", "kid", "--ref", str(hearts)])
    assert out.exit_code == 0 and json.loads(out.output)["kid"] > 0
    res = r.invoke(main, ["score", str(a), "--metric", "clip"])
    assert res.exit_code == 0 and json.loads((a / "score-clip.json").read_text())["clip_score"] > 0
    div = lambda x: json.loads(r.invoke(main, ["score", str(x), "--metric", "diversity"]).output)["diversity"]
    assert div(hearts) < div(a)   # one shape on one background is less diverse than the world
    bad = r.invoke(main, ["score", str(a), "--metric", "fd"])
    assert bad.exit_code == 2 and "--ref" in bad.output


def test_clip_matches_images_to_their_captions(tmp_path):
    import torch

    from difflab.core.data import load_folder_images, read_metadata
    from difflab.metrics import clip_embeddings
    d = _world(tmp_path, "c", 40, 7)
    recs = read_metadata(d)
    ie, te = clip_embeddings(load_folder_images(d, recs), [f"a {r['factors']['color']} {r['factors']['shape']}"
                                                          for r in recs])
    sims = torch.nn.functional.normalize(ie, dim=-1) @ torch.nn.functional.normalize(te, dim=-1).T
    same = torch.tensor([[ri["factors"]["color"] == rj["factors"]["color"] and
                          ri["factors"]["shape"] == rj["factors"]["shape"] for rj in recs] for ri in recs])
    # each image's best text names its colour and shape, in at least 70% of images
    assert same[torch.arange(len(recs)), sims.argmax(1)].float().mean() >= 0.7


def test_similarity_score_cli(tmp_path):
    d = _world(tmp_path, "s", 3, 0)
    r = CliRunner()
    same = json.loads(r.invoke(main, ["similarity", "score", str(d / "000000.png"), str(d / "000000.png")]).output)
    diff = json.loads(r.invoke(main, ["similarity", "score", str(d / "000000.png"), str(d / "000001.png")]).output)
    assert abs(same["distance"]) < 1e-5 and diff["distance"] > 0.01
    bad = r.invoke(main, ["similarity", "score", str(d / "metadata.jsonl"), str(d / "000000.png")])
    assert bad.exit_code == 2 and "cannot read image" in bad.output


def test_similarity_train_and_eval_cli(tmp_path):
    r = CliRunner()
    assert r.invoke(main, ["similarity", "make-2afc", "--n", "120", "--seed", "3", "--out", str(tmp_path / "t")]).exit_code == 0
    res = r.invoke(main, ["similarity", "train", "--triplets", str(tmp_path / "t"), "--out", str(tmp_path / "m"),
                          "--steps", "30", "--lora-r", "4"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "dreamsim.safetensors").exists() and (tmp_path / "m" / "metrics.json").exists()
    res = r.invoke(main, ["similarity", "eval", "--triplets", str(tmp_path / "t"), "--model", str(tmp_path / "m")])
    out = json.loads(res.output)
    assert res.exit_code == 0 and 0 <= out["2afc"] <= 1 and out["n"] == 24
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["2afc"] == out["2afc"]
    bad = r.invoke(main, ["similarity", "eval", "--triplets", str(tmp_path)])
    assert bad.exit_code == 2 and "no data.csv" in bad.output
    bad = r.invoke(main, ["similarity", "eval", "--triplets", str(tmp_path / "t"), "--model", str(tmp_path)])
    assert bad.exit_code == 2 and "not a DreamSim model folder" in bad.output
