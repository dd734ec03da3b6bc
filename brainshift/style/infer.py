"""Whole-volume iUS -> synthetic T1 inference with a trained generator.

Overlapping cubic patches (the training patch size, 50 % overlap by default) cover the bounding
box of the iUS field of view; their outputs are blended with Gaussian weights (sigma = patch / 8,
as nnU-Net), so there are no seams. The output lies on the iUS grid (same shape), in normalised
T1 units ``[0, 1]`` (1 = the 99.5th percentile of a T1 brain), and is exactly 0 outside the
field of view (``us == 0``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import model_dir
from .data import normalise
from .networks import UNet3D



class StyleModel(nn.Module):
    """A generator plus what inference needs to know about it (its patch size)."""

    def __init__(self, net: nn.Module, patch: int, meta: dict | None = None):
        super().__init__()
        self.net, self.patch, self.meta = net, int(patch), dict(meta or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def save_generator(path: str | os.PathLike, net: UNet3D, patch: int, meta: dict | None = None) -> Path:
    """Write the inference file: generator config, float32 weights, metadata (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"arch": "UNet3D", "base": net.base, "depth": net.depth, "patch": int(patch),
           "state_dict": {k: v.detach().cpu().float() for k, v in net.state_dict().items()}, "meta": meta or {}}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_style_model(path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> StyleModel:
    """Load an iUS -> T1 generator; default: ``$BRAINSHIFT_STYLE_MODEL`` or the shipped
    ``model/style/us2t1.pt``. Also accepts a training checkpoint (``checkpoint.pt``)."""
    path = Path(path or os.environ.get("BRAINSHIFT_STYLE_MODEL") or model_dir() / "style" / "us2t1.pt")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: style-transfer model not found")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if "g_us2t1" in obj:  # a training checkpoint
        cfg = obj["config"]
        obj = {"base": cfg["base_width"], "depth": cfg["depth"], "patch": cfg["patch"],
               "state_dict": obj["g_us2t1"], "meta": {"epoch": obj["epoch"], "step": obj["step"]}}
    net = UNet3D(base=obj["base"], depth=obj["depth"])
    net.load_state_dict(obj["state_dict"])
    model = StyleModel(net, obj["patch"], obj.get("meta"))
    model.eval()
    return model.to(_device(device))


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gaussian_weights(patch: int, sigma_frac: float = 1 / 8) -> np.ndarray:
    """Cubic blending weights, max 1 at the centre, floored at 1e-3 (never 0)."""
    x = np.arange(patch) - (patch - 1) / 2
    g = np.exp(-0.5 * (x / (patch * sigma_frac)) ** 2)
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _starts(lo: int, hi: int, patch: int, stride: int) -> list[int]:
    """Window starts covering [lo, hi) (hi - lo >= patch), evenly spaced, step <= stride."""
    n = int(np.ceil((hi - lo - patch) / stride)) + 1
    return sorted({int(round(s)) for s in np.linspace(lo, hi - patch, n)})


@torch.no_grad()
def synthesize_t1(us: np.ndarray, model: StyleModel | None = None, device: str | torch.device | None = None,
                  overlap: float = 0.5, batch: int = 2) -> np.ndarray:
    """Synthetic T1 (float32, ``[0, 1]``, iUS grid, 0 where ``us == 0``) from an iUS volume ``[i, j, k]``.

    ``model`` defaults to :func:`load_style_model` (the shipped weights); ``device`` to CUDA when
    present, else CPU (the model is moved there). ``overlap`` is the window overlap fraction.
    """
    us = np.asarray(us, dtype=np.float32)
    if us.ndim != 3:
        raise ValueError(f"expected a 3D iUS volume, got shape {us.shape}")
    fov = us > 0
    out = np.zeros(us.shape, dtype=np.float32)
    if not fov.any():
        return out
    dev = _device(device)
    model = (model if model is not None else load_style_model()).to(dev).eval()
    p = model.patch
    stride = max(1, int(round(p * (1 - overlap))))

    # pad to at least one patch per axis (normalised background is -1)
    x = normalise(us, fov)
    pad = [(0, max(0, p - n)) for n in x.shape]
    x = np.pad(x, pad, constant_values=-1.0)
    idx = np.argwhere(np.pad(fov, pad))
    lo, hi = idx.min(0), idx.max(0) + 1
    box_lo, box_hi = [], []
    for a in range(3):  # grow the FOV bounding box to >= patch, inside the (padded) volume
        size = max(hi[a] - lo[a], p)
        start = min(max(0, (lo[a] + hi[a] - size) // 2), x.shape[a] - size)
        box_lo.append(start)
        box_hi.append(start + size)
    corners = [(i, j, k) for i in _starts(box_lo[0], box_hi[0], p, stride)
               for j in _starts(box_lo[1], box_hi[1], p, stride)
               for k in _starts(box_lo[2], box_hi[2], p, stride)]
    w = gaussian_weights(p)
    acc = np.zeros(x.shape, dtype=np.float32)
    wsum = np.zeros(x.shape, dtype=np.float32)
    use_amp = dev.type == "cuda"
    for b in range(0, len(corners), batch):
        chunk = corners[b:b + batch]
        xb = np.stack([x[i:i + p, j:j + p, k:k + p] for i, j, k in chunk])[:, None]
        t = torch.from_numpy(xb).to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            y = model(t)
        y = y.float().cpu().numpy()[:, 0]
        for (i, j, k), yi in zip(chunk, y):
            acc[i:i + p, j:j + p, k:k + p] += yi * w
            wsum[i:i + p, j:j + p, k:k + p] += w
    n = us.shape
    acc, wsum = acc[:n[0], :n[1], :n[2]], wsum[:n[0], :n[1], :n[2]]
    synth = (np.clip(acc / np.maximum(wsum, 1e-12), -1.0, 1.0) + 1.0) / 2.0
    out[fov] = synth[fov]
    return out


def stylize_file(input_path: str | os.PathLike, output_path: str | os.PathLike, model_path: str | os.PathLike | None = None,
                 device: str | torch.device | None = None) -> Path:
    """``brainshift style``: read an iUS image, write its synthetic T1 on the same grid (same affine)."""
    from ..io import load_volume, save_volume

    vol = load_volume(input_path)
    model = load_style_model(model_path, device)
    return save_volume(output_path, vol.like(synthesize_t1(vol.data, model, device)))
