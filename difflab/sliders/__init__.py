"""difflab.sliders: SliderSpace discovery and Concept Sliders, each slider a diffusers LoRA folder.

    from difflab.sliders import discover, DiscoverConfig, train_text_slider
    discover("shapes", "a shape", "run")                       # run/slider_0 ... run/slider_7, contact_sheet.png
    train_text_slider("shapes", "a shape", "a large shape", "a small shape", "size")
    pipe.load_lora_weights("run/slider_3")                     # plain diffusers loads every slider folder
"""
from __future__ import annotations

from pathlib import Path

from difflab.errors import DifflabError
from difflab.sliders.discover import DiscoverConfig, discover
from difflab.sliders.lora import SLIDER_CONFIG, import_kohya, load_sliders
from difflab.sliders.text import TextSliderConfig, train_text_slider

__all__ = ["DiscoverConfig", "discover", "TextSliderConfig", "train_text_slider", "import_kohya", "load_sliders",
           "slider_folders"]


def slider_folders(run: str | Path) -> list[Path]:
    """RUN/slider_0 .. RUN/slider_{k-1} of a discover run, in order."""
    run = Path(run)
    found = sorted((p for p in run.glob("slider_*") if (p / SLIDER_CONFIG).is_file()),
                   key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else 1 << 30)
    if not found:
        raise DifflabError(f"{run} holds no slider folders (slider_0, slider_1, ... from `difflab sliders discover`)")
    return found
