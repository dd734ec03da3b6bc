"""Real-image training volumes for the style CycleGAN: real iUS, and T1 cut to iUS-shaped fields of view.

Everything is resampled to one isotropic working spacing (``spacing`` mm, default 1 mm: the coarse
stage registers at 1 mm, and at 0.5 mm a 48-voxel patch would see only 24 mm of an iUS sweep) on
the image's own voxel axes (no reorientation: flips in training make the network orientation-free).

* iUS domain: the real volumes of a folder (e.g. ``../shared/data/real_ius``: RESECT, 0.5 mm, zero
  outside the sweep), anti-aliased and downsampled; the field of view is where more than half of
  a working voxel was inside the sweep.
* T1 domain: T1 volumes (the real ReMIND ceT1 and the packaged MNI152 2009a template) cut to the
  fields of view of the training iUS volumes: a real FOV mask, randomly flipped and transposed,
  is placed with its centre 15-35 mm below the brain surface (real sweeps start at the cortex and
  reach 40-70 mm deep) and kept where at least 85 % of it lies in the brain; the T1 is zero
  outside FOV and brain. So both domains have the same support shapes and the same share of
  deep structures, and the discriminators cannot tell them apart by the cone.
* The brain mask of a whole-head T1 comes from the MNI template's (grey + white matter, closed and
  filled) through a 12-dof reg_aladin of the template to the T1 (about a minute; cached).

No file of the real data is copied anywhere: the caller passes folders and files.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..io import Volume, load_volume, save_volume
from .data import StyleCase, make_case

WORK_SPACING = 1.0          # mm
CENTRE_DEPTH_MM = (15.0, 35.0)
MIN_INSIDE_BRAIN = 0.85
MASK_EROSION_MM = 3.0       # a registered template mask reaches into dura and skull by a few mm


def to_spacing(data: np.ndarray, zooms: np.ndarray, spacing: float,
               fov: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` (voxel sizes ``zooms`` mm) to isotropic ``spacing`` mm on its own axes.

    Downsampling is anti-aliased (Gaussian, sigma = 0.4 x the factor in input voxels). With ``fov``
    (bool) the image is averaged over the field of view only (its border is not darkened by the
    zeros outside) and the output FOV is where more than half of an output voxel was inside.
    Returns ``(image, fov)``, float32 and bool; the image is 0 outside the FOV.
    """
    data = np.asarray(data, dtype=np.float32)
    fov = (data > 0) if fov is None else np.asarray(fov, dtype=bool)
    factor = np.asarray(zooms, dtype=float) / float(spacing)
    if np.allclose(factor, 1.0, atol=0.02):
        return np.where(fov, data, 0.0).astype(np.float32), fov
    sigma = [0.4 / f if f < 1 else 0.0 for f in factor]
    w = ndi.gaussian_filter(fov.astype(np.float32), sigma)
    v = ndi.gaussian_filter(np.where(fov, data, 0.0), sigma)
    w_out = ndi.zoom(w, factor, order=1)
    v_out = ndi.zoom(v, factor, order=1)
    fov_out = ndi.zoom(fov.astype(np.float32), factor, order=1) > 0.5
    img = np.where(fov_out, v_out / np.maximum(w_out, 1e-6), 0.0).astype(np.float32)
    return img, fov_out


def case_number(path: str | Path) -> str:
    """``RESECT_Case16_US_before.nii.gz`` -> ``'16'`` (the first number of the file name)."""
    found = re.search(r"(\d+)", Path(path).name)
    return found.group(1) if found else Path(path).name


def ius_files(folder: str | Path, hold_out: list[str]) -> tuple[list[Path], list[Path]]:
    """NIfTI files of a folder of real iUS volumes split into (training, held out) by case number."""
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: not a folder of real iUS volumes")
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise ValueError(f"{folder}: no .nii/.nii.gz iUS volume")
    held = [p for p in files if case_number(p) in set(hold_out)]
    return [p for p in files if p not in held], held


def load_ius(path: str | Path, spacing: float = WORK_SPACING) -> tuple[np.ndarray, np.ndarray]:
    """A real iUS at the working spacing: ``(image, fov)``."""
    vol = load_volume(path)
    if not (vol.data > 0).any():
        raise ValueError(f"{path}: iUS has no voxel > 0 (empty field of view)")
    return to_spacing(vol.data, vol.spacing, spacing)


def mni_t1() -> tuple[Volume, np.ndarray]:
    """The packaged MNI152 2009a T1 (skull-stripped, 1 mm) and its brain mask (GM + WM > 0.5,
    closed and hole-filled, so ventricles and sulcal CSF are inside)."""
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1 = load_volume(folder / name.format("t1"))
    tissue = load_volume(folder / name.format("gm")).data + load_volume(folder / name.format("wm")).data
    brain = ndi.binary_fill_holes(ndi.binary_closing(np.pad(tissue > 0.5, 4), iterations=3))[4:-4, 4:-4, 4:-4]
    return t1, brain


def brain_mask(t1: Volume, cache: str | Path | None = None, threads: int | None = None) -> np.ndarray:
    """Brain mask of a whole-head T1 on its grid: the MNI template's, moved by a 12-dof reg_aladin
    (fixed = this T1, moving = the template, template mask as the floating mask). ``cache``: a
    NIfTI path read if it exists on the same grid, else written."""
    from ..affine import resample
    from ..niftyreg import AladinOptions, reg_aladin

    if cache is not None and Path(cache).is_file():
        saved = load_volume(cache)
        if saved.shape == t1.shape and np.allclose(saved.affine, t1.affine, atol=1e-3):
            return saved.data > 0.5
    mni, mni_brain = mni_t1()
    matrix = reg_aladin(t1, mni, AladinOptions(threads=threads), moving_mask=mni_brain)
    mask = resample(mni.like(mni_brain.astype(np.float32)), matrix, t1.affine, t1.shape) > 0.5
    if cache is not None:
        save_volume(cache, t1.like(mask.astype(np.float32)))
    return mask


def t1_at_spacing(t1: Volume, brain: np.ndarray, spacing: float = WORK_SPACING,
                  erode_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A T1 and its brain mask (bool, the T1's grid) at the working spacing, the mask eroded by
    ``erode_mm`` (0: not eroded): what :func:`t1_crops` cuts from."""
    everywhere = np.ones(t1.shape, bool)
    img = to_spacing(t1.data, t1.spacing, spacing, fov=everywhere)[0]
    brain_w = to_spacing(brain.astype(np.float32), t1.spacing, spacing, fov=everywhere)[0] > 0.5
    if erode_mm > 0:
        brain_w = ndi.binary_erosion(brain_w, iterations=max(1, round(erode_mm / spacing)))
    return img, brain_w


def _random_pose(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``mask`` with its axes randomly permuted and flipped."""
    mask = np.transpose(mask, rng.permutation(3))
    for axis in range(3):
        if rng.random() < 0.5:
            mask = np.flip(mask, axis)
    return np.ascontiguousarray(mask)


def t1_crops(t1: np.ndarray, brain: np.ndarray, fovs: list[np.ndarray], n: int, rng: np.random.Generator,
             name: str = "t1") -> list[StyleCase]:
    """``n`` T1-domain training volumes: ``t1`` (working spacing) cut to real iUS fields of view
    placed in ``brain`` as the module docstring says. Each is zero outside FOV and brain."""
    depth = ndi.distance_transform_edt(np.pad(brain, 1))[1:-1, 1:-1, 1:-1]   # voxels = mm at 1 mm spacing
    lo, hi = CENTRE_DEPTH_MM
    centres = np.argwhere((depth >= lo) & (depth <= hi))
    if not len(centres):
        raise ValueError(f"{name}: no brain voxel {lo:g}-{hi:g} mm below the surface (is the mask right?)")
    out: list[StyleCase] = []
    for attempt in range(50 * n):
        if len(out) == n:
            break
        mask = _random_pose(fovs[rng.integers(len(fovs))], rng)
        c = centres[rng.integers(len(centres))]
        start = c - np.array(mask.shape) // 2
        src = tuple(slice(max(s, 0), min(s + m, N)) for s, m, N in zip(start, mask.shape, t1.shape))
        dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
        img = np.zeros(mask.shape, np.float32)
        inside = np.zeros(mask.shape, bool)
        img[dst], inside[dst] = t1[src], brain[src]
        fov = mask & inside
        if fov.sum() < MIN_INSIDE_BRAIN * mask.sum():
            continue
        out.append(make_case(f"{name}_{len(out)}", None, np.where(fov, img, 0.0), fov))
    if len(out) < n:
        raise ValueError(f"{name}: placed only {len(out)} of {n} fields of view inside the brain")
    return out


def real_cases(ius_folder: str | Path, t1_files: list[str], hold_out: list[str], crops_per_t1: int = 24,
               mni_crops: int = 8, spacing: float = WORK_SPACING, seed: int = 0,
               cache_dir: str | Path | None = None) -> tuple[list[StyleCase], list[str]]:
    """The training set of ``brainshift train-style --real-ius``: the real iUS volumes not held out
    (one case each, iUS only), ``crops_per_t1`` FOV-shaped crops of each T1 file and ``mni_crops``
    of the MNI template. A registered brain mask is eroded by ``MASK_EROSION_MM`` so that dura and
    skull stay out. Returns the cases and the names of the held-out iUS files."""
    train, held = ius_files(ius_folder, hold_out)
    if not train:
        raise ValueError(f"{ius_folder}: every iUS volume is held out")
    cases, fovs = [], []
    for path in train:
        img, fov = load_ius(path, spacing)
        cases.append(make_case(f"us{case_number(path)}", img, None, fov))
        fovs.append(fov)
    rng = np.random.default_rng(seed)
    for i, f in enumerate(t1_files):
        vol = load_volume(f)
        cache = None if cache_dir is None else Path(cache_dir) / f"brain_mask_{Path(f).name.split('.')[0]}.nii.gz"
        img, brain = t1_at_spacing(vol, brain_mask(vol, cache), spacing, MASK_EROSION_MM)
        cases += t1_crops(img, brain, fovs, crops_per_t1, rng, name=f"t1_{i}")
    if mni_crops:
        img, brain = t1_at_spacing(*mni_t1(), spacing)
        cases += t1_crops(img, brain, fovs, mni_crops, rng, name="mni")
    return cases, [p.name for p in held]
