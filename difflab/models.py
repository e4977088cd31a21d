"""load_pipeline: the built-in "shapes" model, a local diffusers folder, or a Hugging Face hub id."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from difflab.errors import DifflabError

WEIGHTS = Path(__file__).parent / "world" / "weights"
SHAPES = "shapes"


def shapes_dir(part: str = "pipeline") -> Path:
    """Folder of a shipped shapes-world model: "pipeline", "oracle" or "clip"."""
    path = WEIGHTS / part
    if not path.is_dir():
        raise DifflabError(f"the built-in shapes {part} is missing from this install ({path}); "
                           "reinstall difflab or rebuild it with `difflab world train`")
    return path


def _resolve_class(name_or_path: str):
    """The diffusers pipeline class for a folder's model_index.json (SD 1.x/2.x or SDXL)."""
    import diffusers
    index = Path(name_or_path) / "model_index.json"
    try:
        cls_name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise DifflabError(f"{name_or_path} is not a diffusers pipeline folder (no readable model_index.json): {e}")
    return getattr(diffusers, cls_name, diffusers.DiffusionPipeline)


def quiet_loading() -> None:
    """No per-component "Loading weights" bars: they bury the one line that matters (hub downloads keep theirs)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def load_pipeline(name_or_path: str | Path = SHAPES, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """A diffusers text-to-image pipeline, in fp32 on the CPU unless told otherwise.

    "shapes" is the model shipped with difflab; an existing folder written by `save_pretrained` loads offline;
    anything else is a hub id handed to diffusers (SD 1.x/2.x -> StableDiffusionPipeline, SDXL ->
    StableDiffusionXLPipeline, dispatched by the repository's model_index.json).
    """
    import diffusers
    name = str(name_or_path)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if name == SHAPES:
        path, cls = shapes_dir("pipeline"), diffusers.StableDiffusionPipeline
    elif Path(name).exists():
        if not Path(name).is_dir():
            raise DifflabError(f"{name} is a file; give a folder written by diffusers' save_pretrained")
        path, cls = Path(name), _resolve_class(name)
    elif "/" not in name.strip("/") or name.count("/") > 1:
        raise DifflabError(f"unknown model {name!r}: not \"shapes\", not an existing folder, and not a hub id "
                           "(hub ids look like owner/name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    else:
        path, cls = name, diffusers.DiffusionPipeline   # hub id: the repo's model_index.json picks the class
    if cls in (diffusers.StableDiffusionPipeline, diffusers.DiffusionPipeline):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    quiet_loading()
    try:
        pipe = cls.from_pretrained(path, **kwargs)
    except DifflabError:
        raise
    except Exception as e:   # hub offline, unknown id, missing or corrupt weights: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(msg) > 200:
            msg = msg[:200] + "..."
        where = "from a local folder" if Path(name).exists() or name == SHAPES else \
            "from the hub (no such local folder; offline, or an unknown id?)"
        raise DifflabError(f"could not load model {name!r} {where}: {msg}") from e
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_oracle(device=None):
    from difflab.world.oracle import Oracle
    try:
        return Oracle.from_pretrained(shapes_dir("oracle")).to(device or "cpu").eval()
    except DifflabError:
        raise
    except Exception as e:
        raise DifflabError(f"could not load the shapes oracle: {str(e).splitlines()[0]}") from e
