"""difflab.attribute: which training images made this image? (in progress: feature ranking only so far)

    from difflab.attribute.features import cached_features, embed_images, top_k
"""
