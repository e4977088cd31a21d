import json

import numpy as np
import pytest
from click.testing import CliRunner

from difflab.cli import main
from difflab.world import FACTORS, info, render, sample, training_set
from difflab.world.dataset import parse_prompt, parse_where


def test_factors_meet_the_spec():
    i = info()["factors"]
    assert len(i["shape"]["trained"]) >= 6 and len(i["shape"]["heldout"]) >= 2
    assert len(i["color"]["trained"]) >= 6 and len(i["size"]["trained"]) >= 3
    assert len(i["position"]["trained"]) >= 9 and len(i["background"]["trained"]) >= 2
    assert len(i["texture"]["trained"]) >= 3 and len(i["texture"]["heldout"]) >= 1


def test_render_is_deterministic_and_factors_change_pixels():
    f = dict(shape="star", color="red", size="large", position="center", background="white", texture="solid")
    a, b = np.asarray(render(f)), np.asarray(render(dict(f)))
    assert a.shape == (32, 32, 3) and (a == b).all()
    for factor in FACTORS:
        for v in FACTORS[factor][0] + FACTORS[factor][1]:
            if v != f[factor]:
                assert (np.asarray(render({**f, factor: v})) != a).any(), (factor, v)


def test_heldout_values_are_drawn_but_never_named_in_training_captions():
    items = training_set(3000)
    held_shapes = set(FACTORS["shape"][1])
    drawn = [it for it in items if it.factors["shape"] in held_shapes]
    assert 0.05 < len(drawn) / len(items) < 0.2
    for it in items:
        named = parse_prompt(it.caption)
        assert named == it.named
        for f, (_, held) in FACTORS.items():
            assert named.get(f) not in held, it.caption
    generic = [it for it in items if "shape" not in it.named]
    assert sum(it.factors["shape"] in held_shapes for it in generic) / len(generic) < 0.45


def test_captions_vary_in_detail():
    caps = [it.caption for it in sample(500, 3)]
    assert "a shape" in caps
    assert any(c.count(" ") >= 10 for c in caps)   # all factors named
    assert any(c.endswith(" shape") and len(c.split()) == 3 for c in caps)   # "a red shape"


def test_parse_prompt_longest_match_and_aliases():
    assert parse_prompt("a red star at the top left") == {"color": "red", "shape": "star", "position": "top left"}
    assert parse_prompt("a star at the center") == {"shape": "star", "position": "center"}
    assert parse_prompt("a <new1> shape on a black background", {"<new1>": "heart"}) == \
        {"shape": "heart", "background": "black"}
    with pytest.raises(ValueError, match="unknown shape"):
        parse_where(["shape=blob"])


def test_cli_sample_same_seed_same_bytes(tmp_path):
    r = CliRunner()
    for d in ("a", "b"):
        res = r.invoke(main, ["world", "sample", "--n", "6", "--seed", "4", "--out", str(tmp_path / d)])
        assert res.exit_code == 0, res.output
    for f in ["metadata.jsonl"] + [f"{i:06d}.png" for i in range(6)]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    rec = json.loads((tmp_path / "a" / "metadata.jsonl").read_text().splitlines()[0])
    assert set(rec) == {"file", "caption", "factors"} and set(rec["factors"]) == set(FACTORS)


def test_cli_sample_where_names_heldout(tmp_path):
    res = CliRunner().invoke(main, ["world", "sample", "--n", "5", "--out", str(tmp_path / "h"),
                                    "--where", "shape=heart"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(l) for l in (tmp_path / "h" / "metadata.jsonl").read_text().splitlines()]
    assert all(r["factors"]["shape"] == "heart" and "heart" in r["caption"] for r in recs)


def test_cli_info_is_json():
    res = CliRunner().invoke(main, ["world", "info"])
    out = json.loads(res.output)
    assert out["resolution"] == 32 and set(out["factors"]["shape"]) == {"trained", "heldout"}


def test_cli_bad_where_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["world", "sample", "--n", "2", "--out", str(tmp_path / "x"),
                                    "--where", "shape=blob"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "unknown shape 'blob'" in res.output
    assert not (tmp_path / "x").exists()


def test_cli_captions_are_distinct_and_never_name_heldout_values():
    res = CliRunner().invoke(main, ["world", "captions", "--n", "50", "--seed", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 50 == len(set(lines))
    heldout = {v for f in FACTORS for v in FACTORS[f][1]}
    assert not any(set(parse_prompt(c).values()) & heldout for c in lines)
    assert lines == CliRunner().invoke(main, ["world", "captions", "--n", "50", "--seed", "3"]).output.splitlines()


def test_soft_clip_loss_is_clips_infonce_with_repeated_captions_as_shared_positives():
    import torch
    import torch.nn.functional as F

    from difflab.world.train import soft_clip_loss
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    distinct = torch.arange(6)   # every caption different: CLIP's symmetric cross-entropy on the diagonal
    clip = (F.cross_entropy(logits, distinct) + F.cross_entropy(logits.T, distinct)) / 2
    assert torch.allclose(soft_clip_loss(logits, distinct), clip)
    same = torch.tensor([0, 0, 1, 2, 3, 4])   # images 0 and 1 share a caption: each is half of the other's target
    tgt = torch.eye(6)
    tgt[:2, :2] = 0.5
    soft = (-(tgt * logits.log_softmax(-1)).sum(-1).mean() - (tgt * logits.T.log_softmax(-1)).sum(-1).mean()) / 2
    assert torch.allclose(soft_clip_loss(logits, same), soft)
