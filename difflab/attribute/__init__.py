"""difflab.attribute: which training images made this image?

    features   (AbC's untuned baseline)  cosine ranking of cached encoder features, exact and chunked
    tuned      (AbC)                     identity-initialised heads tuned contrastively, calibrated soft attribution
    unlearn    (AbU)                     Fisher-preconditioned unlearning of the query, ranked by training-loss change
    benchmark  (AbC-style)               exemplars -> Custom Diffusion models -> queries; Recall@K and mAP
    gold       (AbU's counterfactual)    retrain without each method's top K and measure the query's loss

    from difflab.attribute import rank, run_benchmark, gold_standard
"""
from difflab.attribute.benchmark import BenchmarkConfig, run_benchmark
from difflab.attribute.features import cached_features, embed_images, top_k
from difflab.attribute.gold import GoldConfig, gold_standard
from difflab.attribute.rank import rank
from difflab.attribute.tuned import Heads, TuneConfig, load_heads, save_heads, soft_attribution, train_heads
from difflab.attribute.unlearn import UnlearnConfig, attribute_by_unlearning

__all__ = ["BenchmarkConfig", "GoldConfig", "Heads", "TuneConfig", "UnlearnConfig", "attribute_by_unlearning",
           "cached_features", "embed_images", "gold_standard", "load_heads", "rank", "run_benchmark", "save_heads",
           "soft_attribution", "top_k", "train_heads"]
