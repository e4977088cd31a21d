"""DreamSim (Fu, Tamir, Sundaram et al., NeurIPS 2023): a perceptual distance tuned to human 2AFC judgements.

d(a, b) = 1 - cos(f(a), f(b)), where f concatenates the CLS features of one or more vision backbones (CLIP: after
`ln_post` and the projection; DINO/ViT: the last block's CLS before the final LayerNorm), optionally through a
residual MLP head, then centres each vector and L2-normalises it (the pip package's `normalize_embeds`).
Fine-tuning minimises the hinge loss  L = max(0, m - (d0 - d1) y),  y = 2 round(p1) - 1,  m = 0.05, over
triplets (ref, img0, img1) whose p1 is the share of judges who found img1 closer; LoRA on the backbones'
attention projections (peft) or the MLP head alone.

    model, preprocess = difflab.similarity.dreamsim()          # the shapes CLIP backbone, offline
    d = model(preprocess(img_a), preprocess(img_b))             # distances, shape (B,)
"""
from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from difflab.errors import DifflabError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPES_CLIP = "shapes-clip"
WEIGHTS_FILE = "dreamsim.safetensors"
# attention projections LoRA targets, per transformers family (HF splits DreamSim's fused qkv into three)
LORA_TARGETS = {"clip": ["q_proj", "k_proj", "v_proj"], "vit": ["query", "key", "value"]}


class ClipVision(nn.Module):
    """A CLIP image tower: CLS after the post-LayerNorm (`ln_post`), times the visual projection."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class Backbone(nn.Module):
    """One vision tower: [0, 1] images -> resize (bicubic) -> normalise -> CLS feature."""

    def __init__(self, model: nn.Module, kind: str, image_size: int, mean, std, source: str):
        super().__init__()
        if kind == "clip" and not isinstance(model, ClipVision):
            model = ClipVision(model.vision_model, model.visual_projection)
        self.model, self.kind, self.image_size, self.source = model, kind, image_size, source
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        if self.kind == "clip":
            return self.model.visual_projection.out_features
        if self.kind == "cnn":
            return self.model.config.hidden_sizes[-1]
        return self.model.config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        if self.kind == "clip":
            return self.model(x)
        if self.kind == "cnn":   # ResNet / ConvNeXt: the globally pooled last stage
            return self.model(pixel_values=x).pooler_output.flatten(1)
        out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[-1][:, 0]   # DINO: the last block's CLS, before the final LayerNorm


def _load_clip_tower(path: str):
    """The image tower of a CLIPModel folder (text tower dropped) or of a CLIPVisionModelWithProjection."""
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection
    if AutoConfig.from_pretrained(path).model_type == "clip":
        m = CLIPModel.from_pretrained(path)
        return ClipVision(m.vision_model, m.visual_projection), m.config.vision_config.image_size
    m = CLIPVisionModelWithProjection.from_pretrained(path)
    return ClipVision(m.vision_model, m.visual_projection), m.config.image_size


def clip_source(name_or_path: str) -> tuple[str, tuple, tuple]:
    """(folder or hub id, image mean, image std) of a CLIP: the shipped shapes CLIP (trained on [-1, 1] pixels:
    0.5 / 0.5); else a local folder's preprocessor_config.json (as transformers' image processors save it), or
    OpenAI's statistics. One place for `load_backbone` (features) and `metrics.load_clip` (CLIP score)."""
    if name_or_path == SHAPES_CLIP:
        from difflab.models import shapes_dir
        return str(shapes_dir("clip")), (0.5,) * 3, (0.5,) * 3
    p = Path(name_or_path) / "preprocessor_config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    return name_or_path, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


def load_backbone(name_or_path: str) -> Backbone:
    """"shapes-clip" (shipped), or a transformers CLIP / DINO / DINOv2 / ViT folder or hub id, or a CNN
    (ResNet, ConvNeXt: its pooled last stage; for detection)."""
    from transformers import AutoConfig, AutoModel
    if name_or_path == SHAPES_CLIP:
        path, mean, std = clip_source(SHAPES_CLIP)
        tower, size = _load_clip_tower(path)
        return Backbone(tower, "clip", size, mean, std, SHAPES_CLIP)
    try:
        cfg = AutoConfig.from_pretrained(name_or_path)
        if cfg.model_type in ("clip", "clip_vision_model"):
            path, mean, std = clip_source(name_or_path)
            tower, size = _load_clip_tower(path)
            return Backbone(tower, "clip", size, mean, std, str(name_or_path))
        m = AutoModel.from_pretrained(name_or_path)
    except Exception as e:
        raise DifflabError(f"could not load backbone {name_or_path!r}: {str(e).splitlines()[0][:200]}") from e
    size = getattr(m.config, "image_size", 224)
    kind = "cnn" if hasattr(m.config, "hidden_sizes") else "vit"   # ResNet/ConvNeXt/RegNet vs ViT-like
    return Backbone(m, kind, size if isinstance(size, int) else size[0], IMAGENET_MEAN, IMAGENET_STD,
                    str(name_or_path))


class DreamSim(nn.Module):
    """The ensemble embedding and its distance. `embed(x)`, `forward(a, b)`; x in [0, 1], (B, 3, H, W)."""

    def __init__(self, backbones: list[Backbone], normalize_embeds: bool = True, mlp_hidden: int | None = None):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        self.normalize_embeds = normalize_embeds
        dim = sum(b.dim for b in backbones)
        self.mlp = None
        if mlp_hidden:   # residual MLP head fc2(relu(fc1(x))) + x, fc2 zero-initialised so it starts as identity
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, dim))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.lora: dict | None = None
        self.full_backbones = False   # mode "full": every backbone weight was tuned and is saved

    @property
    def image_size(self) -> int:
        return self.backbones[0].image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbones' concatenated CLS features, before the head and the normalisation."""
        return torch.cat([b(x) for b in self.backbones], dim=-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head(self, e: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            e = self.mlp(e) + e
        if self.normalize_embeds:   # centre, then unit norm (dreamsim >= b526fd1): distance = 1 - Pearson r
            e = e - e.mean(dim=-1, keepdim=True)
            e = F.normalize(e, dim=-1)
        return e

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(self.embed(a), self.embed(b), dim=-1)

    # --- LoRA, save / load -------------------------------------------------------------------------------
    def add_lora(self, r: int = 16, alpha: float = 8, dropout: float = 0.3) -> None:
        """LoRA (peft) on every backbone's attention q/k/v projections: the reference's ensemble defaults."""
        from peft import LoraConfig, inject_adapter_in_model
        for b in self.backbones:
            cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                             target_modules=LORA_TARGETS[b.kind])
            inject_adapter_in_model(cfg, b.model)
        self.lora = {"r": r, "alpha": alpha, "dropout": dropout}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.named_parameters()
                if "lora_" in n or n.startswith("mlp.") or (self.full_backbones and n.startswith("backbones."))}

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"backbones": [b.source for b in self.backbones], "normalize_embeds": self.normalize_embeds,
               "mlp_hidden": self.mlp[0].out_features if self.mlp is not None else None, "lora": self.lora,
               "full_backbones": self.full_backbones, "embedding_dim": sum(b.dim for b in self.backbones)}
        (folder / "dreamsim_config.json").write_text(json.dumps(cfg, indent=2))
        save_file(self.trainable_state(), folder / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DreamSim":
        from safetensors.torch import load_file
        folder = Path(folder)
        try:
            cfg = json.loads((folder / "dreamsim_config.json").read_text())
        except (OSError, ValueError) as e:
            raise DifflabError(f"{folder} is not a DreamSim model folder (no readable dreamsim_config.json)") from e
        model = cls([load_backbone(s) for s in cfg["backbones"]], cfg["normalize_embeds"], cfg["mlp_hidden"])
        if sum(b.dim for b in model.backbones) != cfg["embedding_dim"]:
            raise DifflabError(f"{folder} was trained on backbones of another size than {cfg['backbones']}")
        if cfg["lora"]:
            model.add_lora(cfg["lora"]["r"], cfg["lora"]["alpha"], cfg["lora"]["dropout"])
        model.full_backbones = bool(cfg.get("full_backbones"))
        state = load_file(folder / WEIGHTS_FILE)
        own = model.trainable_state()
        bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
        if bad or set(own) - set(state):
            raise DifflabError(f"{folder} does not fit its backbones ({(bad or sorted(set(own) - set(state)))[0]})")
        model.load_state_dict(state, strict=False)
        return model.eval()


def make_preprocess(image_size: int):
    """PIL image -> (1, 3, S, S) in [0, 1]: RGB, bicubic resize to the backbone's size (as dreamsim's)."""
    def preprocess(img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return preprocess


def dreamsim(pretrained: bool = True, backbones=(SHAPES_CLIP,), device="cpu", normalize_embeds: bool = True,
             model_dir: str | Path | None = None):
    """(model, preprocess), like the `dreamsim` package. `model_dir` loads a tuned model saved by difflab;
    `pretrained` with the default backbone loads the tuned shapes DreamSim shipped with difflab (if present);
    otherwise the untuned ensemble of `backbones`."""
    if model_dir is not None:
        model = DreamSim.from_pretrained(model_dir)
    else:
        from difflab.models import WEIGHTS
        shipped = WEIGHTS / "dreamsim"
        if pretrained and tuple(backbones) == (SHAPES_CLIP,) and (shipped / WEIGHTS_FILE).exists():
            model = DreamSim.from_pretrained(shipped)
        else:
            model = DreamSim([load_backbone(b) for b in backbones], normalize_embeds)
    model = model.to(device).eval().requires_grad_(False)
    return model, make_preprocess(model.image_size)


# --- 2AFC triplets: NIGHTS layout, and a shapes-world set with a ground-truth rule --------------------------
CSV_COLUMNS = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path", "right_path", "prompt", "split",
               "is_imagenet"]
# The ground-truth rule of the shapes 2AFC set: d(ref, x) = sum of the weights of the factors x changes. Shape
# weighs most and background least, so pixel distance (dominated by the background's area) often disagrees.
MIN_GAP = 0.0   # distances closer than this are a tie (redrawn); 0: only exact ties (0.5 measured no better)
FACTOR_WEIGHTS = {"shape": 4.0, "color": 2.5, "texture": 1.5, "size": 1.2, "position": 0.8, "background": 0.3}


def read_2afc(folder: str | Path, split: str | None = None, min_votes: int = 6) -> list[dict]:
    """Triplets of a NIGHTS-layout folder (data.csv + ref/ + distort/): ref, img0 (left), img1 (right) paths
    and p1 = right_vote / votes, keeping rows with at least `min_votes` votes (NIGHTS' filter)."""
    import csv
    folder = Path(folder)
    path = folder / "data.csv"
    if not path.is_file():
        raise DifflabError(f"{folder} has no data.csv (NIGHTS layout: data.csv, ref/, distort/)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"right_vote", "votes", "ref_path", "left_path", "right_path"} <= set(rows[0]):
        raise DifflabError(f"{path} has no votes (needs columns right_vote, votes, ref_path, left_path, right_path)")
    out = []
    for r in rows:
        if split and r.get("split") != split:
            continue
        votes = float(r["votes"])
        if votes < min_votes:
            continue
        out.append({"ref": folder / r["ref_path"], "img0": folder / r["left_path"], "img1": folder / r["right_path"],
                    "p1": float(r["right_vote"]) / votes, "split": r.get("split", "")})
    if not out:
        raise DifflabError(f"{path} has no triplets" + (f" in split {split!r}" if split else ""))
    return out


def _factor_table():
    """Per factor (FACTORS order): its values (trained, then held out) and the reference's sampling weights
    (as sample_item with include_heldout: every shape alike, textures by TEXTURE_WEIGHTS, the rest uniform)."""
    from difflab.world.dataset import TEXTURE_WEIGHTS
    from difflab.world.draw import FACTORS, values
    out = []
    for fac in FACTORS:
        vals = values(fac)
        w = np.array([TEXTURE_WEIGHTS[v] for v in vals] if fac == "texture" else [1.0] * len(vals))
        out.append((fac, vals, w / w.sum()))
    return out


def world_codes(n: int, seed: int = 0, max_changes: int = 3,
                min_gap: float = MIN_GAP) -> tuple[np.ndarray, np.ndarray]:
    """n shapes-world triplets as value indices, vectorised: codes (n, 3, F) for (ref, img0, img1) and
    img1_closer (n,). img0 and img1 each change 1..max_changes factors of ref to another value, uniformly;
    d(ref, x) = the sum of FACTOR_WEIGHTS over the factors x changes. Pairs whose distances differ by less than
    `min_gap` count as ties and are redrawn (NIGHTS likewise keeps only triplets its raters agreed on)."""
    table = _factor_table()
    sizes = np.array([len(v) for _, v, _ in table])
    weight = np.array([FACTOR_WEIGHTS[f] for f, _, _ in table])
    rng = np.random.default_rng(seed)
    ref = np.stack([rng.choice(len(v), size=n, p=p) for _, v, p in table], axis=1)

    def vary(r: np.ndarray) -> np.ndarray:
        m = len(r)
        k = rng.integers(1, max_changes + 1, size=m)
        order = np.argsort(rng.random((m, len(table))), axis=1)          # a random order of the factors
        change = np.zeros_like(r, dtype=bool)
        np.put_along_axis(change, order, np.arange(len(table))[None, :] < k[:, None], axis=1)
        shift = rng.integers(1, sizes[None, :], size=r.shape)           # another value, uniformly
        return np.where(change, (r + shift) % sizes, r)

    a, b = np.empty_like(ref), np.empty_like(ref)
    todo = np.arange(n)
    while len(todo):
        a[todo], b[todo] = vary(ref[todo]), vary(ref[todo])
        gap = np.abs(((a[todo] != ref[todo]) * weight).sum(1) - ((b[todo] != ref[todo]) * weight).sum(1))
        todo = todo[gap < max(min_gap, 1e-9)]
    closer = ((b != ref) * weight).sum(1) < ((a != ref) * weight).sum(1)
    return np.stack([ref, a, b], axis=1), closer


def world_triplets(n: int, seed: int = 0, max_changes: int = 3,
                   min_gap: float = MIN_GAP) -> list[tuple[dict, dict, dict, bool]]:
    """world_codes as factor dicts: (ref, img0, img1, img1_closer)."""
    table = _factor_table()
    codes, closer = world_codes(n, seed, max_changes, min_gap)
    dicts = [[{f: vals[i] for (f, vals, _), i in zip(table, c)} for c in trip] for trip in codes.tolist()]
    return [(r, a, b, bool(c)) for (r, a, b), c in zip(dicts, closer)]


@lru_cache(maxsize=2)
def world_images(image_size: int) -> torch.Tensor:
    """Every image of the shapes world (each combination of factor values, FACTORS order, last factor fastest)
    as uint8 (N, 3, S, S): the world is finite (15,552 images), so training draws triplets as indices into it."""
    from difflab.world.draw import render
    table = _factor_table()
    pre = make_preprocess(image_size)
    out = torch.empty((int(np.prod([len(v) for _, v, _ in table])), 3, image_size, image_size), dtype=torch.uint8)
    for i, idx in enumerate(itertools.product(*[range(len(v)) for _, v, _ in table])):
        img = pre(render({f: vals[j] for (f, vals, _), j in zip(table, idx)}))
        out[i] = (img[0] * 255).round().to(torch.uint8)
    return out


def world_index(codes: np.ndarray) -> np.ndarray:
    """Value indices (..., F) -> row of world_images (mixed radix, last factor fastest)."""
    sizes = [len(v) for _, v, _ in _factor_table()]
    idx = np.zeros(codes.shape[:-1], dtype=np.int64)
    for j, s in enumerate(sizes):
        idx = idx * s + codes[..., j]
    return idx


def render_triplets(triplets, image_size: int) -> tuple[torch.Tensor, ...]:
    """world_triplets rendered in memory: (ref, img0, img1, p1) tensors as load_triplets gives them."""
    from difflab.world.draw import render
    pre = make_preprocess(image_size)
    ref, x0, x1 = ([pre(render(t[k])) for t in triplets] for k in range(3))
    p1 = torch.tensor([float(t[3]) for t in triplets])
    return torch.cat(ref), torch.cat(x0), torch.cat(x1), p1


def make_2afc(out: str | Path, n: int, seed: int = 0, splits=(("train", 0.7), ("val", 0.1), ("test", 0.2)),
              max_changes: int = 3, min_gap: float = MIN_GAP) -> Path:
    """Write n world_triplets in the NIGHTS layout; the closer image gets all 6 votes."""
    import csv

    from difflab.core.runs import output_folder
    from difflab.world.draw import render
    cuts = np.cumsum([0] + [int(round(frac * n)) for _, frac in splits])
    with output_folder(Path(out)) as tmp:
        (tmp / "ref" / "000").mkdir(parents=True)
        (tmp / "distort" / "000").mkdir(parents=True)
        rows = []
        for i, (ref, a, b, right_closer) in enumerate(world_triplets(n, seed, max_changes, min_gap)):
            name = f"{i:06d}"
            render(ref).save(tmp / "ref" / "000" / f"{name}.png")
            render(a).save(tmp / "distort" / "000" / f"{name}_0.png")
            render(b).save(tmp / "distort" / "000" / f"{name}_1.png")
            split = next((s for (s, _), lo, hi in zip(splits, cuts[:-1], cuts[1:]) if lo <= i < hi), splits[-1][0])
            rows.append([i, 0 if right_closer else 6, 6 if right_closer else 0, 6, f"ref/000/{name}.png",
                         f"distort/000/{name}_0.png", f"distort/000/{name}_1.png", "", split, False])
        with open(tmp / "data.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            w.writerows(rows)
        (tmp / "README.md").write_text(
            f"Shapes-world 2AFC triplets (difflab similarity make-2afc --n {n} --seed {seed}).\n"
            "Ground truth: d(ref, x) = sum of the weights of the factors x changes: "
            + ", ".join(f"{k} {v}" for k, v in FACTOR_WEIGHTS.items())
            + f".\nTies (equal distances{f', or closer than {min_gap}' if min_gap else ''}) are redrawn. "
            "The closer image gets all 6 votes.\n")
    return Path(out)


def load_triplets(triplets: list[dict], image_size: int) -> tuple[torch.Tensor, ...]:
    from difflab.core.data import load_image
    pre = make_preprocess(image_size)

    def stack(key):
        return torch.cat([pre(load_image(t[key])) for t in triplets])
    return stack("ref"), stack("img0"), stack("img1"), torch.tensor([t["p1"] for t in triplets])


@torch.no_grad()
def evaluate_2afc(distance, triplets: list[dict], image_size: int, batch_size: int = 256) -> dict:
    """2AFC score of a distance function (a, b) -> (B,) on [0, 1] images."""
    from difflab.metrics import two_afc
    ref, x0, x1, p1 = load_triplets(triplets, image_size)
    dev = next(distance.parameters()).device if isinstance(distance, nn.Module) else torch.device("cpu")
    d0, d1 = [], []
    for i in range(0, len(ref), batch_size):
        r = ref[i:i + batch_size].to(dev)
        d0.append(distance(r, x0[i:i + batch_size].to(dev)).cpu())
        d1.append(distance(r, x1[i:i + batch_size].to(dev)).cpu())
    return {"2afc": two_afc(torch.cat(d0), torch.cat(d1), p1), "n": len(triplets)}


def pixel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The baseline: mean squared pixel difference."""
    return ((a - b) ** 2).flatten(1).mean(1)


def hinge_loss(d0: torch.Tensor, d1: torch.Tensor, p1: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """DreamSim's loss: mean max(0, m - (d0 - d1) y), y = 2 round(p1) - 1 (+1 when img1 is closer)."""
    y = 2 * torch.round(p1) - 1
    return torch.clamp(margin - (d0 - d1) * y, min=0).mean()


def train_dreamsim(model: DreamSim, triplets: list[dict], mode: str = "lora", steps: int = 1000,
                   batch_size: int = 16, lr: float = 3e-4, margin: float = 0.05, seed: int = 0,
                   lora: dict | None = None, out: Path | None = None, progress: bool = True,
                   world: int = 0, lr_schedule: str = "constant") -> dict:
    """Fine-tune on 2AFC triplets with the hinge loss: LoRA on the backbones (mode "lora", r 16 / alpha 8 /
    dropout 0.3 by default), the residual MLP head alone (mode "mlp"), or every backbone weight (mode "full",
    for small backbones). Adam betas (0.5, 0.999) as DreamSim. `world` > 0 adds that many fresh shapes-world
    triplets (seeded apart from make-2afc's) to the training set, as indices into world_images: the world is
    procedural, so a small backbone need not overfit a few thousand triplets. `lr_schedule` "cosine" decays
    the lr to 0 over the run (after a 5% warmup)."""
    from difflab.core.trainer import TrainConfig, train
    model.requires_grad_(False)
    if mode == "lora":
        model.add_lora(**(lora or {}))
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    elif mode == "mlp":
        if model.mlp is None:
            raise DifflabError("mode 'mlp' needs a model built with mlp_hidden")
        params = dict(model.mlp.named_parameters())
    elif mode == "full":
        model.full_backbones = True
        params = {n: p for n, p in model.named_parameters() if n.startswith("backbones.")}
    else:
        raise DifflabError(f"unknown training mode {mode!r}: use lora, mlp or full")
    for p in params.values():
        p.requires_grad_(True)
    ref, x0, x1, p1 = load_triplets(triplets, model.image_size) if triplets else (None,) * 4
    n_folder = 0 if ref is None else len(ref)
    if world:   # index triplets into the world's finite image set: millions cost memory for indices only
        codes, closer = world_codes(world, seed=10_000_019 + seed)
        world_idx, world_p1 = torch.from_numpy(world_index(codes)), torch.from_numpy(closer).float()
        images = world_images(model.image_size)
    if n_folder + world == 0:
        raise DifflabError("no training triplets: give a triplet folder with a train split, or world > 0")
    if mode == "mlp":   # frozen backbones: their features are computed once, only the head runs per step
        def feats(t):
            return torch.cat([model.features(t[i:i + 512]) for i in range(0, len(t), 512)])
        with torch.no_grad():
            if n_folder:
                ref, x0, x1 = (feats(t) for t in (ref, x0, x1))
            if world:
                images = feats(images.float() / 255)
    embed = model.head if mode == "mlp" else model.embed

    def batch_fn(i):
        """batch_size triplets drawn (with replacement, seeded by the step) from the folder's and the world's."""
        idx = torch.from_numpy(np.random.default_rng([seed, i]).integers(0, n_folder + world, batch_size))
        mine, theirs = idx[idx < n_folder], idx[idx >= n_folder] - n_folder
        parts = []
        if len(mine):
            parts.append((ref[mine], x0[mine], x1[mine], p1[mine]))
        if len(theirs):
            w = images[world_idx[theirs]]
            w = w if mode == "mlp" else w.float() / 255
            parts.append((w[:, 0], w[:, 1], w[:, 2], world_p1[theirs]))
        return tuple(torch.cat(t) for t in zip(*parts))

    def loss_fn(b):
        r, a0, a1, p = b
        e = embed(torch.cat([r, a0, a1]))
        er, e0, e1 = e.chunk(3)
        d0 = 1 - F.cosine_similarity(er, e0, dim=-1)
        d1 = 1 - F.cosine_similarity(er, e1, dim=-1)
        return hinge_loss(d0, d1, p, margin), {}

    cfg = TrainConfig(steps=steps, lr=lr, betas=(0.5, 0.999), weight_decay=0.0, log_every=max(1, steps // 20),
                      lr_schedule=lr_schedule, warmup_steps=steps // 20 if lr_schedule == "cosine" else 0,
                      checkpoint_every=500 if out is not None else 0, seed=seed, desc=f"dreamsim-{mode}",
                      progress=progress, max_grad_norm=None)
    hist = train(params, loss_fn, batch_fn, cfg, out=out, modules=[model])
    model.eval().requires_grad_(False)
    return hist


def train_and_save(triplets_dir, out, backbones=(SHAPES_CLIP,), mode="lora", steps=1500, batch_size=16,
                   lr=3e-4, lora=None, seed=0, progress=True, world=0, lr_schedule="constant", init=None,
                   checkpoints: Path | None = None) -> dict:
    """Train on the train split, save to `out` (atomically), write metrics.json with val/test 2AFC.
    `init`: continue from a full-mode model folder (its backbones, tuned) instead of the untuned backbones.
    `checkpoints`: a folder for resumable checkpoints (every 500 steps; a rerun resumes from the last)."""
    from difflab.core.runs import atomic_write_json, output_folder, write_metrics
    train_t = read_2afc(triplets_dir, "train")
    if init is not None:
        model = DreamSim.from_pretrained(init)
        if mode != "full" or not model.full_backbones:
            raise DifflabError(f"--init continues a full-mode model with --mode full; {init} is not one")
        backbones = [b.source for b in model.backbones]
    else:
        model = DreamSim([load_backbone(b) for b in backbones], mlp_hidden=512 if mode == "mlp" else None)
    hist = train_dreamsim(model, train_t, mode, steps, batch_size, lr, seed=seed, lora=lora, progress=progress,
                          world=world, lr_schedule=lr_schedule, out=checkpoints)
    res = {}
    for split in ("val", "test"):
        try:
            r = evaluate_2afc(model, read_2afc(triplets_dir, split), model.image_size)
            res[f"{split}_2afc"], res[f"{split}_n"] = r["2afc"], r["n"]
        except DifflabError:
            pass
    with output_folder(Path(out)) as tmp:
        model.save_pretrained(tmp)
        atomic_write_json(tmp / "config.json", {"triplets": str(triplets_dir), "backbones": list(backbones),
                                                "mode": mode, "steps": steps, "batch_size": batch_size, "lr": lr,
                                                "lora": lora, "seed": seed, "world": world,
                                                "lr_schedule": lr_schedule, "init": str(init) if init else None})
        write_metrics(tmp, {**res, "final_loss": hist["loss"][-1]})
    return res


def eval_and_save(triplets_dir, model_dir=None, baseline="dreamsim", split="test", out=None) -> dict:
    """2AFC of a tuned model (model_dir), the untuned shapes embedding, or pixel L2; writes metrics.json."""
    from difflab.core.runs import write_metrics
    triplets = read_2afc(triplets_dir, split)
    if baseline == "pixel-l2":
        res = evaluate_2afc(pixel_l2, triplets, 32 if model_dir is None else DreamSim.from_pretrained(model_dir).image_size)
    else:
        model, _ = dreamsim(pretrained=baseline == "dreamsim", model_dir=model_dir)
        res = evaluate_2afc(model, triplets, model.image_size)
    res = {**res, "split": split, "model": str(model_dir) if model_dir else baseline}
    folder = Path(out) if out else (Path(model_dir) if model_dir else None)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_metrics(folder, res)
    return res
