"""difflab.attribute (feature ranking so far): exact chunked top-k, the feature cache and its refusals."""
import json

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
