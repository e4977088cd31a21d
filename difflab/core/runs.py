"""Run folders: config.json in, artefacts and metrics.json out, every write atomic.

A command that produces something writes one folder. It is built under a hidden temporary name beside the
target and renamed into place only when the command succeeds, so a failed or interrupted command leaves
nothing half-written where the user asked for output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from difflab import __version__
from difflab.errors import DifflabError


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path in `path`'s folder to write to; it is renamed over `path` when the block succeeds and
    removed when it fails, so readers (other processes too) see the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Write JSON to a temp file in the same folder, then rename it over `path`."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _without_progress(obj):
    """A settings tree without its `progress` flags (cosmetic: they never decide what a run makes)."""
    if isinstance(obj, dict):
        return {k: _without_progress(v) for k, v in obj.items() if k != "progress"}
    return obj


def refuse_other_settings(folder: Path, settings: dict, keys=None, defaults: dict | None = None) -> None:
    """Before a resumable run goes on in `folder`: refuse it (one line) when the folder's config.json was written
    with other values of `keys` (default: every key) than `settings` (JSON-like, e.g. json round-tripped asdict).
    A key the saved file lacks counts as `defaults[key]` (a setting added since the folder was made)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return
    saved, now = _without_progress(json.loads(path.read_text())), _without_progress(settings)
    defaults = _without_progress(defaults or {})
    keys = keys if keys is not None else sorted(now.keys() | saved.keys())
    changed = [k for k in keys if saved.get(k, defaults.get(k)) != now.get(k)]
    if changed:
        raise DifflabError(f"{folder} was made with other settings ({', '.join(changed)}); "
                           "resume it with the same ones or use a new folder")


def write_metrics(folder: Path, metrics: dict, command: str | None = None) -> dict:
    """metrics.json: flat keys and numbers, plus the command and difflab's version."""
    out = dict(metrics)
    if command is None:   # the CLI's argv, or the script (a benchmark) that called the API
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
        prog = f"python {sys.argv[0]}" if prog.endswith(".py") and prog not in ("cli.py", "__main__.py") else "difflab"
        command = " ".join([prog] + sys.argv[1:])
    out["command"] = command
    out["difflab_version"] = __version__
    atomic_write_json(Path(folder) / "metrics.json", out)
    return out


@contextlib.contextmanager
def output_folder(out: Path, overwrite: bool = True):
    """Yield a temporary folder that becomes `out` when the block succeeds and vanishes when it fails.

    An existing `out` is replaced only at the end (so a failure keeps the old results intact).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out} exists")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
