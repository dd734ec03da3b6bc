"""Whole-volume iUS -> synthetic T1 inference with a trained generator.

The iUS is first brought to the generator's working spacing (``meta['spacing_mm']``, 1 mm for
the real-data model) when it is finer (anti-aliased, averaged over the field of view only), and
the output is interpolated back to the iUS grid. On the working grid, MONAI's
``sliding_window_inference`` covers the bounding box of the field of view with overlapping
training-size patches (50 % overlap) blended with Gaussian weights (sigma = patch / 8, as
nnU-Net), so there are no seams. The output lies on the iUS grid (same shape, voxel for voxel),
in normalised T1 units ``[0, 1]`` (1 = the T1's 99.5th percentile over the field of view), and is
exactly 0 outside the field of view (``us == 0``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from .. import model_dir
from .data import normalise
from .networks import UNet3D



class StyleModel(nn.Module):
    """A generator plus what inference needs to know about it (its patch size)."""

    def __init__(self, net: nn.Module, patch: int, meta: dict | None = None):
        super().__init__()
        self.net, self.patch, self.meta = net, int(patch), dict(meta or {})

    @property
    def spacing(self) -> float | None:
        """Working spacing in mm (None: whatever the input's, as models trained on simulated grids)."""
        value = self.meta.get("spacing_mm")
        return float(value) if value else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def save_generator(path: str | os.PathLike, net: UNet3D, patch: int, meta: dict | None = None) -> Path:
    """Write the inference file: generator config, float32 weights, metadata (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"arch": "UNet3D", "base": net.base, "depth": net.depth, "upsample": net.upsample, "patch": int(patch),
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
        obj = {"base": cfg["base_width"], "depth": cfg["depth"], "upsample": cfg.get("upsample"),
               "patch": cfg["patch"], "state_dict": obj["g_us2t1"], "meta": {"epoch": obj["epoch"], "step": obj["step"]}}
    # files and checkpoints written before session 20 name no decoder: they had transposed convolutions
    net = UNet3D(base=obj["base"], depth=obj["depth"], upsample=obj.get("upsample") or "transpose")
    net.load_state_dict(obj["state_dict"])
    model = StyleModel(net, obj["patch"], obj.get("meta"))
    model.eval()
    return model.to(_device(device))


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _back_to_grid(work: np.ndarray, fov: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of a working-grid image back onto the iUS grid (inverse of the
    ``ndimage.zoom`` mapping used by :func:`brainshift.style.real.to_spacing`), averaging over the
    working field of view only (so the border is not pulled toward what lies outside it)."""
    def up(a: np.ndarray) -> np.ndarray:
        z = ndi.zoom(a, np.array(shape) / np.array(a.shape), order=1)
        out = np.zeros(shape, np.float32)
        n = tuple(min(p, q) for p, q in zip(shape, z.shape))
        out[: n[0], : n[1], : n[2]] = z[: n[0], : n[1], : n[2]]
        return out
    w = up(fov.astype(np.float32))
    return np.where(w > 1e-3, up(np.where(fov, work, 0.0)) / np.maximum(w, 1e-3), 0.0).astype(np.float32)


@torch.no_grad()
def synthesize_t1(us: np.ndarray, model: StyleModel | None = None, device: str | torch.device | None = None,
                  overlap: float = 0.5, batch: int = 2, spacing: float | np.ndarray | None = None) -> np.ndarray:
    """Synthetic T1 (float32, ``[0, 1]``, iUS grid, 0 where ``us == 0``) from an iUS volume ``[i, j, k]``.

    ``model`` defaults to :func:`load_style_model` (the shipped weights); ``device`` to CUDA when
    present, else CPU (the model is moved there). ``overlap`` is the window overlap fraction.
    ``spacing``: the iUS voxel size in mm (scalar or per axis); without it the iUS is taken to be at
    the model's working spacing already.
    """
    from monai.inferers import sliding_window_inference

    from .real import to_spacing

    us = np.asarray(us, dtype=np.float32)
    if us.ndim != 3:
        raise ValueError(f"expected a 3D iUS volume, got shape {us.shape}")
    fov = us > 0
    out = np.zeros(us.shape, dtype=np.float32)
    if not fov.any():
        return out
    dev = _device(device)
    model = (model if model is not None else load_style_model()).to(dev).eval()
    work, work_fov = us, fov
    zooms = None if spacing is None else np.broadcast_to(np.asarray(spacing, float), (3,))
    resample = zooms is not None and model.spacing is not None and bool((zooms < 0.9 * model.spacing).any())
    if resample:   # only ever downsample: a coarser iUS runs at its own spacing
        work, work_fov = to_spacing(us, zooms, model.spacing, fov)   # type: ignore[arg-type]
    x = normalise(work, work_fov)
    idx = np.argwhere(work_fov)
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, work.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    t = torch.from_numpy(np.ascontiguousarray(x[box]))[None, None].to(dev)
    use_amp = dev.type == "cuda"
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp), warnings.catch_warnings():
        # MONAI 1.5 indexes with lists internally (a PyTorch deprecation warning that is not the user's business)
        warnings.filterwarnings("ignore", "Using a non-tuple sequence", UserWarning)
        y = sliding_window_inference(t, model.patch, batch, model, overlap=overlap, mode="gaussian",
                                     sigma_scale=0.125, padding_mode="constant", cval=-1.0)
    synth = np.zeros(work.shape, np.float32)
    synth[box] = (np.clip(y.float().cpu().numpy()[0, 0], -1.0, 1.0) + 1.0) / 2.0
    if resample:
        synth = _back_to_grid(synth, work_fov, us.shape)
    out[fov] = synth[fov]
    return out


def stylize_file(input_path: str | os.PathLike, output_path: str | os.PathLike, model_path: str | os.PathLike | None = None,
                 device: str | torch.device | None = None) -> Path:
    """``brainshift style``: read an iUS image, write its synthetic T1 on the same grid (same affine)."""
    from ..io import load_volume, save_volume

    vol = load_volume(input_path)
    model = load_style_model(model_path, device)
    return save_volume(output_path, vol.like(synthesize_t1(vol.data, model, device, spacing=vol.spacing)))
