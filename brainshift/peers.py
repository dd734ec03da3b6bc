"""Peer registration methods for the benchmark (``brainshift bench``): ConvexAdam and elastix.

Both wrappers take the fixed iUS and the moving MR as :class:`~brainshift.io.Volume` and return a
field in this project's convention (see :mod:`brainshift.fields`): float32 ``(X, Y, Z, 3)``, voxel
units, a **pull** field on the **fixed** grid (moving voxel index = ``p + disp[p]``), plus a
JSON-ready record of what was run.

* **ConvexAdam** (PyPI ``convexadam==0.2.0``, used as a library through ``convex_adam_pt``): MIND-SSC
  features, coupled convex discrete optimisation, inverse consistency, then Adam instance
  optimisation. It works on voxel arrays only (no world geometry) and is deformable only (no affine
  stage); the ReMIND2Reg images share one grid, so it runs directly on them. Its output is already
  a voxel pull field on the fixed grid, channels in array-axis order (i, j, k): ``convexAdam``'s own
  ``apply_convex`` warps with ``map_coordinates(moving, identity + disp)``.
* **elastix** (Debian package ``elastix`` 5.0.1, called by subprocess): Mattes mutual information,
  rigid then B-spline (with a bending-energy penalty), multi-resolution, with the iUS field of view
  as the fixed mask, eroded at each level and sampled by its voxels (the manual's set-up for an
  ultrasound fan), rigid over three resolutions (see the comments at the parameter maps).
  ``transformix -def all`` writes, for each fixed voxel, a displacement ``d`` in physical mm in
  ITK's LPS world such that the moving point is ``x_fixed + d`` (pull); it is converted here to a
  voxel pull field (fixed voxel -> RAS -> LPS, add ``d``, back to RAS -> moving voxel).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from . import fields
from .io import LPS_RAS, Volume, save_volume

# ------------------------------------------------------------------------------------------------
# ConvexAdam
# ------------------------------------------------------------------------------------------------
# MIND-SSC radius/dilation, grid spacing and capture range of the organisers' ReMIND2Reg ConvexAdam
# baseline (github.com/ReubenDo/ReMIND2Reg, convexAdam/run_convexadam.py: MINDSSC(img, 3, 3),
# grid_sp = 6, disp_hw = 6, fixed cost masked to the iUS field of view); the Adam instance
# optimisation (which that script leaves out) with the package's defaults.
CONVEXADAM_SETTINGS: dict = {
    "mind_r": 3,            # MIND-SSC patch radius (voxels)
    "mind_d": 3,            # MIND-SSC dilation (voxels)
    "grid_sp": 6,           # control-grid spacing of the discrete (convex) step, voxels
    "disp_hw": 6,           # discrete search half-width, grid cells: +-36 voxels at grid_sp 6
    "ic": True,             # inverse-consistent discrete step
    "lambda_weight": 1.25,  # diffusion regularisation of the Adam step (package default)
    "selected_niter": 80,   # Adam iterations (package default)
    "grid_sp_adam": 2,      # Adam grid spacing, voxels (package default)
    "selected_smooth": 0,   # no extra smoothing of the final field (package default)
    "use_mask": True,       # fixed mask = iUS field of view (> 0); moving mask = whole MR
}


def convexadam_unavailable() -> str | None:
    """None when ``convexAdam`` can be imported, else why not (one line)."""
    try:
        from convexAdam.convex_adam_MIND import convex_adam_pt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken torch underneath
        return f"convexadam not importable ({type(exc).__name__}: {exc}); install with pip install convexadam==0.2.0"
    return None


def _pad_to(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pad ``a`` at the high end of each axis up to ``shape``."""
    return np.pad(a, [(0, s - n) for n, s in zip(a.shape, shape)])


def convexadam_register(fixed: Volume, moving: Volume, fixed_mask: np.ndarray | None = None,
                        threads: int | None = None, **overrides) -> tuple[np.ndarray, dict]:
    """ConvexAdam (MIND-SSC) field: voxel pull field (X,Y,Z,3) float32 on the fixed grid, and a record.

    ``fixed_mask`` (bool, fixed grid) defaults to ``fixed > 0`` (the iUS field of view).
    ``overrides`` replace entries of :data:`CONVEXADAM_SETTINGS`. The volumes are zero-padded at the
    high end to a multiple of 6 voxels (even, for the package's half-resolution mask fill, and a
    whole number of ``grid_sp``/``grid_sp_adam`` cells) and the field is cropped back. If the moving
    grid differs from the fixed grid, the MR is first resampled onto the fixed grid (world identity)
    and that resampling is composed into the result.
    """
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    settings = {**CONVEXADAM_SETTINGS, **overrides}
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    pre = None
    moving_data = moving.data
    if moving.shape != fixed.shape or not np.allclose(moving.affine, fixed.affine, atol=1e-6):
        pre = fields.matrix_to_field(np.eye(4), fixed.affine, moving.affine, fixed.shape)
        moving_data = fields.warp(moving.data, pre)
    mask = (fixed.data > 0) if fixed_mask is None else np.asarray(fixed_mask, dtype=bool)
    step = int(np.lcm.reduce([2, settings["grid_sp"], settings["grid_sp_adam"]]))
    shape = tuple(int(-(-n // step) * step) for n in fixed.shape)
    kwargs = {k: v for k, v in settings.items() if k != "use_mask"}
    with tempfile.TemporaryDirectory(prefix="brainshift_convexadam_") as tmp:
        mask_paths = {}
        if settings["use_mask"]:
            import nibabel as nib

            # the package reads its masks from NIfTI files (voxel arrays; the affine is not used)
            for name, m in (("fixed", _pad_to(mask, shape)), ("moving", np.ones(shape, bool))):
                mask_paths[name] = str(Path(tmp) / f"{name}_mask.nii.gz")
                nib.save(nib.Nifti1Image(m.astype(np.uint8), np.eye(4)), mask_paths[name])
        disp = convex_adam_pt(
            img_fixed=_pad_to(fixed.data.astype(np.float32), shape),
            img_moving=_pad_to(np.asarray(moving_data, np.float32), shape),
            use_mask=bool(settings["use_mask"]), path_fixed_mask=mask_paths.get("fixed"),
            path_moving_mask=mask_paths.get("moving"), dtype=torch.float32, device=torch.device("cpu"),
            verbose=False, **kwargs)
    disp = np.ascontiguousarray(disp[: fixed.shape[0], : fixed.shape[1], : fixed.shape[2]], dtype=np.float32)
    if pre is not None:
        disp = fields.compose(disp, pre)
    record = {"settings": settings, "padded_shape": list(shape), "resampled_moving": pre is not None,
              "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0}
    return disp, record


# ------------------------------------------------------------------------------------------------
# elastix
# ------------------------------------------------------------------------------------------------
# Shared by both stages (elastix parameter-file keys; values are written as elastix expects them).
_ELASTIX_COMMON: dict = {
    "FixedInternalImagePixelType": "float", "MovingInternalImagePixelType": "float",
    "FixedImageDimension": 3, "MovingImageDimension": 3,
    "UseDirectionCosines": "true",                    # oblique grids: honour the direction matrices
    "Registration": "MultiResolutionRegistration",
    "FixedImagePyramid": "FixedSmoothingImagePyramid", "MovingImagePyramid": "MovingSmoothingImagePyramid",
    "Interpolator": "BSplineInterpolator", "BSplineInterpolationOrder": 1,
    "ResampleInterpolator": "FinalBSplineInterpolator", "FinalBSplineInterpolationOrder": 3,
    "Resampler": "DefaultResampler",
    "Metric": "AdvancedMattesMutualInformation", "NumberOfHistogramBins": 32,
    "Optimizer": "AdaptiveStochasticGradientDescent", "AutomaticParameterEstimation": "true",
    # RandomSparseMask draws samples from the mask's voxels: RandomCoordinate draws from the whole grid and
    # gives up ("Could not find enough image samples ... the mask is too small") when the iUS field of
    # view fills under ~10 % of it, as it did on all three simulated pre-resection 256^3 cases (5-6 %).
    "ImageSampler": "RandomSparseMask", "NumberOfSpatialSamples": 4096, "NewSamplesEveryIteration": "true",
    "CheckNumberOfSamples": "true",
    # The iUS mask marks where there is image data, not a region of interest: elastix's manual asks for
    # ErodeMask "true" then ("the conic beam edge in ultrasound images is an example of such an artificial
    # edge"), so that the smoothing pyramid does not carry the fan's edge into the registration.
    "ErodeMask": "true",
    "HowToCombineTransforms": "Compose", "DefaultPixelValue": 0,
    "WriteResultImage": "false", "ResultImageFormat": "mhd", "ResultImagePixelType": "float",
}
# Stage 1: rigid (Euler) from the headers' alignment (ReMIND2Reg images share one grid and are
# roughly aligned by the navigation system, so no centre-of-mass initialisation); rotation about
# the fixed image centre (elastix default). A 12-parameter affine with MI sheared one of three
# simulated pairs away (TRE 5.9 -> 11.0 mm), a rigid start did not (5.9 -> 3.0 mm).
# Three resolutions, not four: the fourth (8x, 4 mm voxels at 0.5 mm) compares an iUS with almost nothing
# left in it against the MR's skull and scalp, and MI led the rigid search into a wrong basin: rigid TRE
# 15.5 mm from a 4.4 mm start on a simulated whole-head pre-resection case (7.1 from 7.0 on another),
# 2.7 and 0.75 mm with three (measured with brainshift simulate --pre-resection, seed 1; docs/MEASUREMENTS.md).
ELASTIX_RIGID: dict = {**_ELASTIX_COMMON,
                       "Transform": "EulerTransform", "AutomaticScalesEstimation": "true",
                       "AutomaticTransformInitialization": "false",
                       "NumberOfResolutions": 3, "MaximumNumberOfIterations": 500}
# Stage 2: cubic B-spline, 15 mm final control-point spacing (30 then 15 mm), MI plus a bending
# energy penalty (without it, MI B-spline folded and raised TRE on the simulated pairs).
ELASTIX_BSPLINE: dict = {**_ELASTIX_COMMON,
                         "Registration": "MultiMetricMultiResolutionRegistration",
                         "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
                         "Metric0Weight": 1.0, "Metric1Weight": 500.0,
                         "Transform": "BSplineTransform", "BSplineTransformSplineOrder": 3,
                         "FinalGridSpacingInPhysicalUnits": 15.0, "GridSpacingSchedule": [2, 1],
                         "NumberOfResolutions": 2, "MaximumNumberOfIterations": 500}


class ElastixError(RuntimeError):
    """elastix or transformix failed; the message carries the end of its log."""


def elastix_unavailable() -> str | None:
    """None when ``elastix`` and ``transformix`` are on PATH, else why not (one line)."""
    missing = [b for b in ("elastix", "transformix") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH: install Debian package elastix (apt-get install elastix)"
    return None


def elastix_version() -> str:
    """``elastix --version`` output (one line), or '' if it cannot be run."""
    try:
        out = subprocess.run(["elastix", "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def elastix_parameter_text(params: dict) -> str:
    """An elastix parameter file: one ``(Key value ...)`` line per entry; strings are quoted."""
    def fmt(v) -> str:
        if isinstance(v, bool):
            return f'"{str(v).lower()}"'
        if isinstance(v, str):
            return f'"{v}"'
        return str(v)

    lines = []
    for key, value in params.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        lines.append(f"({key} {' '.join(fmt(v) for v in values)})")
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], log: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        text = (proc.stdout + proc.stderr).strip()
        if log.is_file():
            text += "\n" + log.read_text(errors="replace")
        tail = " | ".join(line.strip() for line in text.splitlines()[-6:] if line.strip())
        raise ElastixError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): {tail}")


def lps_displacement_to_voxel_field(d_lps: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """Convert a physical pull displacement (LPS mm, on the fixed grid) to a voxel pull field.

    ``d_lps[i, j, k]`` is the ITK/elastix displacement at fixed voxel ``p = (i, j, k)``: the moving
    point is ``x_lps(p) + d``. In RAS that is ``x_ras(p) + diag(-1, -1, 1) d``; the moving voxel is
    ``inv(A_moving) @ that``, and the field is that minus ``p``. Result float32 (X,Y,Z,3).
    """
    d_ras = np.asarray(d_lps, dtype=np.float64) * np.diag(LPS_RAS)[:3]
    # moving voxel = inv(Am) (Af p + d_ras) = V p + inv(Am)[:3,:3] d_ras, with V = inv(Am) Af
    base = fields.matrix_to_field(np.eye(4), fixed_affine, moving_affine, d_lps.shape[:3]).astype(np.float64)
    lin = np.linalg.inv(moving_affine)[:3, :3]
    return (base + d_ras @ lin.T).astype(np.float32)


def elastix_register(fixed: Volume, moving: Volume, fixed_mask: np.ndarray | None = None,
                     threads: int | None = None, overrides: dict | None = None,
                     workdir: str | os.PathLike | None = None) -> tuple[np.ndarray, dict]:
    """elastix rigid + B-spline (Mattes MI) field: voxel pull field (X,Y,Z,3) on the fixed grid, and a record.

    ``fixed_mask`` (bool, fixed grid) defaults to ``fixed > 0`` (the iUS field of view) and is passed
    as ``-fMask``. ``overrides`` update both parameter maps (e.g. fewer iterations in tests).
    ``workdir`` keeps elastix's files there (default: a temporary folder, removed afterwards).
    Images are handed to elastix as ``.mha`` written by :func:`brainshift.io.save_volume`, so the
    LPS geometry elastix reads is exactly the RAS affine brainshift uses.
    """
    import SimpleITK as sitk

    reason = elastix_unavailable()
    if reason:
        raise ElastixError(reason)
    stages = [{**ELASTIX_RIGID, **(overrides or {})}, {**ELASTIX_BSPLINE, **(overrides or {})}]
    mask = (fixed.data > 0) if fixed_mask is None else np.asarray(fixed_mask, dtype=bool)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="brainshift_elastix_") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        save_volume(work / "fixed.mha", fixed)
        save_volume(work / "moving.mha", moving)
        save_volume(work / "fixed_mask.mha", Volume(mask.astype(np.uint8), fixed.affine))
        cmd = ["elastix", "-f", str(work / "fixed.mha"), "-m", str(work / "moving.mha"),
               "-fMask", str(work / "fixed_mask.mha"), "-out", str(work)]
        for n, params in enumerate(stages):
            (work / f"params_{n}.txt").write_text(elastix_parameter_text(params))
            cmd += ["-p", str(work / f"params_{n}.txt")]
        if threads:
            cmd += ["-threads", str(int(threads))]
        t = time.perf_counter()
        _run(cmd, work / "elastix.log")
        t_elastix = time.perf_counter() - t
        last = work / f"TransformParameters.{len(stages) - 1}.txt"
        tcmd = ["transformix", "-def", "all", "-tp", str(last), "-out", str(work)]
        if threads:
            tcmd += ["-threads", str(int(threads))]
        _run(tcmd, work / "transformix.log")
        img = sitk.ReadImage(str(work / "deformationField.mhd"))
        d_lps = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0, 3))  # [k,j,i,3] -> [i,j,k,3], LPS mm
        if d_lps.shape[:3] != fixed.shape:
            raise ElastixError(f"transformix field has shape {d_lps.shape[:3]}, fixed image {fixed.shape}")
        # the field's grid must be the fixed grid: compare its geometry with the fixed affine
        from .io import _itk_affine

        if not np.allclose(_itk_affine(img), fixed.affine, atol=1e-3):
            raise ElastixError("transformix field grid differs from the fixed image grid")
        disp = lps_displacement_to_voxel_field(d_lps, fixed.affine, moving.affine)
    record = {"parameters": {"rigid": stages[0], "bspline": stages[1]}, "version": elastix_version(),
              "elastix_seconds": t_elastix, "threads": threads, "seconds": time.perf_counter() - t0}
    return disp, record
