"""DINOv2 backbone + linear classifier (cross-entropy; accuracy and expected calibration error).

Data: an image folder (one sub-folder per class) or an ``.npz`` with ``images`` (N,H,W,3 uint8
or N,3,H,W float) and ``labels`` (N,). fp16 is refused: DINOv2's activations overflow it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sweeper.errors import UserError

from .base import Family, HParams, Regressor
from .registry import describe
from .splits import Splits

SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=28, patch_size=7),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=56, patch_size=14),
    "vit-s14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, image_size=224, patch_size=14),
    "vit-b14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=14),
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def synthetic_images(n: int, classes: int, size: int, seed: int, noise: float):
    """Class k = stripes at angle k·180°/classes with a random phase, plus noise: learnable, not trivial."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, classes, n)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, k in enumerate(labels):
        ang = np.pi * k / classes
        freq = 3 + g.uniform(-0.5, 0.5)
        phase = g.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy) + phase)
        img = 0.5 + 0.35 * wave[..., None] * g.uniform(0.6, 1.0, 3) + g.normal(0, noise * 2, (size, size, 3))
        imgs[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return imgs, labels.astype(np.int64)


def _to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim != 4:
        raise UserError(f"images must be 4-D (N,H,W,3 or N,3,H,W), got shape {tuple(x.shape)}")
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - MEAN) / STD


def read_split(path: str, size: int, class_names: list[str] | None):
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:  # never unpickle user data
                images, labels = z["images"], z["labels"]
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"data file {p}: needs arrays 'images' and 'labels' ({e})") from None
        return _to_tensor(images, size), torch.as_tensor(labels, dtype=torch.long), class_names
    if p.is_dir():
        from PIL import Image

        classes = class_names or sorted(d.name for d in p.iterdir() if d.is_dir())
        if not classes:
            raise UserError(f"image folder {p}: no class sub-folders")
        imgs, labels = [], []
        for k, c in enumerate(classes):
            for f in sorted((p / c).glob("*")):
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                    with Image.open(f) as im:
                        imgs.append(np.asarray(im.convert("RGB").resize((size, size))))
                    labels.append(k)
        if not imgs:
            raise UserError(f"image folder {p}: no images")
        return _to_tensor(np.stack(imgs), size), torch.tensor(labels), classes
    raise UserError(f"data path {p}: expected an .npz file or an image folder")


class DinoClassifier(Family):
    info = describe("dinov2_classifier")

    def load_splits(self, data_spec: dict, model_spec: dict) -> Splits:
        size = self.image_size(model_spec)
        gen = data_spec.get("generator")
        data, classes = {}, None
        if gen:
            for i, split in enumerate(("train", "val_select", "val_calib", "test")):
                imgs, labels = synthetic_images(gen[f"n_{split}"], gen["num_classes"], gen["image_size"], gen["seed"] * 1000 + i, gen["noise"])
                data[split] = torch.utils.data.TensorDataset(_to_tensor(imgs, size), torch.from_numpy(labels))
            classes = [f"class_{k}" for k in range(gen["num_classes"])]
        else:
            for split, path in data_spec["paths"].items():
                x, y, classes = read_split(path, size, classes)
                data[split] = torch.utils.data.TensorDataset(x, y)
            if classes is None:
                n = int(max(int(ds.tensors[1].max()) for ds in data.values()) + 1)
                classes = [f"class_{k}" for k in range(n)]
        return Splits(data, {"classes": classes, "image_size": size})

    def image_size(self, model_spec: dict) -> int:
        if model_spec.get("path"):
            from transformers import Dinov2Config

            return int(Dinov2Config.from_pretrained(model_spec["path"]).image_size)
        return int({**SIZES[model_spec.get("size", "tiny")], **(model_spec.get("config_overrides") or {})}["image_size"])

    def build_config(self, model_spec: dict):
        from transformers import Dinov2Config

        kw = dict(SIZES[model_spec.get("size", "tiny")])
        kw.update(model_spec.get("config_overrides") or {})
        cfg = Dinov2Config(**kw)
        cfg._attn_implementation = "sdpa"
        return cfg

    def build_model(self, model_spec: dict, splits: Splits, hp: HParams) -> nn.Module:
        from transformers import Dinov2Model

        if model_spec.get("path"):
            backbone = Dinov2Model.from_pretrained(model_spec["path"], attn_implementation="sdpa")
        else:
            backbone = Dinov2Model(self.build_config(model_spec))
        h = backbone.config.hidden_size
        head = nn.Sequential(nn.Dropout(hp.dropout), nn.Linear(2 * h, len(splits.info["classes"])))
        return Regressor(backbone, head)

    def fast_blocks(self, model: nn.Module) -> int:
        """Each block's LayerScales folded into the projections, and the patch embedding's convolution made a
        matmul (``trainables.dinov2_fast``). Returns how many blocks changed."""
        from .dinov2_fast import convert_layers, convert_patch_embed
        from .speed import repeated_blocks

        convert_patch_embed(model)
        return convert_layers(repeated_blocks(model, min_len=1))

    def compile_rest(self, model: nn.Module) -> int:
        """The embeddings (patches, CLS token, position embeddings), the final LayerNorm and the pooling, each
        compiled on its own. Eager, they ran about 4 ms of a 173 ms ViT-B/14 step at batch 512 on an H200 in a
        dozen separate kernels (the CLS concatenation alone 0.55 ms, the LayerNorm and its gradient 0.9 ms;
        profile of 2026-11-28, fifteenth session). Parameters and state dict unchanged."""
        bb = model.backbone
        bb.embeddings.compile()
        bb.layernorm.compile()
        model._pool_fn = torch.compile(pool)  # a plain attribute: not a module, not in the state dict
        return 3

    def forward(self, model, x):
        h = model.backbone(pixel_values=x).last_hidden_state
        return model.head(getattr(model, "_pool_fn", pool)(h))

    def loss(self, model, batch, hp):
        x, y = batch
        return nn.functional.cross_entropy(self.forward(model, x).float(), y, label_smoothing=hp.label_smoothing)

    def eval_batch(self, model, batch):
        x, y = batch
        return {"logits": self.forward(model, x).float(), "target": y}

    def metrics(self, out, splits):
        logits, y = out["logits"], out["target"]
        probs = logits.softmax(-1)
        conf, pred = probs.max(-1)
        return {
            "val_loss": float(nn.functional.cross_entropy(logits, y)),
            "val_acc": float((pred == y).float().mean()),
            "val_ece": expected_calibration_error(conf, pred == y),
        }


def pool(h: torch.Tensor) -> torch.Tensor:
    """DINOv2's linear-probe recipe: the CLS token next to the mean of the patch tokens."""
    return torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1)


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Σ_b |acc_b − conf_b| · n_b / n over equal-width confidence bins."""
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (correct[m].float().mean() - conf[m].mean()).abs()
    return float(ece)


FAMILY = DinoClassifier()
