"""difflab: research methods for text-to-image diffusion models, as one library and one CLI.

    import difflab
    pipe = difflab.load_pipeline("shapes")            # or a diffusers folder, or a hub id
    difflab.generate(["a red star"], "out", model=pipe, n=4)
    difflab.judge("out")                               # the shapes-world oracle scores the folder
"""
__version__ = "0.1.0"

from difflab.errors import DifflabError  # noqa: E402
from difflab.generate import generate  # noqa: E402
from difflab.models import load_oracle, load_pipeline  # noqa: E402
from difflab.world.oracle import judge_folder as judge  # noqa: E402

__all__ = ["__version__", "DifflabError", "load_pipeline", "load_oracle", "generate", "judge"]
