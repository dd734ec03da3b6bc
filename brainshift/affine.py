"""Coarse stage: affine/rigid registration with NiftyReg's block matching (reg_aladin).

All matrices: NiftyReg convention, fixed (iUS) world -> moving (MR) world, RAS mm.

:func:`affine_stage` is the paper's affine stage (reg_aladin, 4-voxel blocks, ``-pv 25``, masks
from the iUS field of view; symmetric, 12 dof, header initialisation as measured best, see
:data:`STAGE_OPTIONS`) with the LTS inlier share ``-pi`` chosen per case by the SSC-MSE between the
fixed image and the resampled moving image inside the field of view, plus what the paper lacks:
failed or degenerate candidates (scaling, translation, field of view lost) are rejected and the
identity is kept whenever no candidate beats it on SSC-MSE.

How the grid fits the time budget: the grid of shares is searched at the coarse level only
(both images mean-pooled by 2, i.e. 1 mm for 0.5 mm data, ``-ln 1``), the runs of the grid in
parallel processes (one OpenMP thread each: with several processes on 2 cores ``-omp 2`` was
slower, not faster). With ``refine=True`` the best share is then re-run at full resolution
(``-ln 1`` from the coarse matrix), which makes the paper's two levels (1 mm then 0.5 mm); it is
off by default: at 256^3 on 2 cores that one 0.5 mm run cost 35-90 s (non-symmetric, rigid or
12-dof ``-affDirect``; 226 s rigid-then-affine) and did not pay off on the simulated cases: TRE rose in 4 of 5 tries and fell 0.02 mm in the
fifth (the 226 s one).
SSC-MSE is evaluated on the coarse grid.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import ssc
from .fields import voxel_matrix
from .io import Volume, save_volume
from .niftyreg import AladinOptions, NiftyRegError, reg_aladin, run_aladin

#: The ReMIND2Reg organisers' NiftyReg baseline, restricted to a rigid transform: masks from
#: image > 0, no symmetric version, header initialisation (the images share one grid), 2 levels.
OFFICIAL_RIGID = AladinOptions(rigid_only=True, symmetric=False, header_init=True, levels=2, levels_to_perform=2)

#: reg_aladin settings of :func:`affine_stage` for one level (the level count is set per run):
#: 25% highest-variance blocks (NiftyReg's blocks are always 4 voxels), symmetric, 12 dof
#: optimised directly (``-affDirect``), header initialisation. Measured on 5 simulated 256^3
#: cases (2 cores, see the stage's report to issue 4):
#: * image-centre (the paper) and header initialisation give bit-identical matrices whenever the
#:   two images share one grid (all ReMIND2Reg cases); where grids differ, the headers carry the
#:   navigation's alignment while the centres of differently cropped volumes need not match, so
#:   the header is kept (``-nac``).
#: * 12 dof beats rigid at the 1 mm level (it absorbs part of the gravity sinking): with the
#:   share chosen by SSC-MSE, mean TRE below the official rigid baseline, where the former
#:   symmetric rigid grid only tied it. ``-affDirect`` skips reg_aladin's rigid pass, so a run
#:   costs about the same as a symmetric rigid one (~9 s at 128^3 on one thread), whereas
#:   rigid-then-affine at 0.5 mm took minutes.
#: * symmetric, with the iUS fan as floating mask (see :func:`fov_on_moving`).
STAGE_OPTIONS = AladinOptions(rigid_only=False, symmetric=True, header_init=True, levels=1, percent_blocks=25,
                              extra=("-affDirect",))

#: LTS inlier shares (``-pi``, percent) searched per case: the SSC-MSE curve over shares is flat
#: within a few 1e-4, so a dense grid mostly adds time and chances to pick on noise; three shares
#: run in two rounds of 2 parallel processes.
DEFAULT_SHARES: tuple[float, ...] = (30, 50, 70)

#: Sanity limits for a candidate matrix.
SCALE_RANGE = (0.8, 1.25)       # det and every singular value of the linear part
MAX_TRANSLATION_MM = 40.0        # displacement of the field-of-view centroid
MIN_OVERLAP_RATIO = 0.9          # FOV share inside the moving foreground, relative to the identity's


def official_rigid_baseline(fixed: Volume, moving: Volume, threads: int | None = None) -> np.ndarray:
    """World matrix (fixed -> moving, RAS mm) of the official rigid baseline (``niftyreg-rigid``)."""
    opts = OFFICIAL_RIGID if threads is None else AladinOptions(**{**OFFICIAL_RIGID.__dict__, "threads": threads})
    return reg_aladin(fixed, moving, opts, fixed_mask=fixed.data > 0, moving_mask=moving.data > 0)


@dataclass
class AffineResult:
    """Outcome of :func:`affine_stage`."""

    matrix: np.ndarray        # 4x4 world, fixed -> moving, RAS mm (NiftyReg convention)
    share: float | None       # chosen -pi in percent (None if the identity was kept)
    curve: list[tuple[float, float]]   # (share, ssc_mse) of the coarse grid; nan = rejected candidate
    ssc_identity: float       # SSC-MSE inside the fixed mask, identity matrix (coarse grid)
    ssc_final: float          # same for the returned matrix
    kept: str                 # 'affine' or 'identity'
    seconds: float            # wall time of the whole stage
    aladin_seconds: float     # wall time spent waiting for reg_aladin (grid + refinement)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------
def pooled(vol: Volume, factor: int) -> Volume:
    """Mean-pool a volume by ``factor`` per axis; the affine follows (block centre = new voxel)."""
    if factor == 1:
        return vol
    data = ssc.downsample(vol.data, factor).numpy()
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return Volume(data, vol.affine @ scale)


def resample(moving: Volume, world_matrix: np.ndarray, fixed_affine: np.ndarray,
             fixed_shape: tuple[int, int, int]) -> np.ndarray:
    """Moving image on the fixed grid through a world matrix (trilinear, 0 outside), float32.

    Same result as ``fields.warp(moving, fields.matrix_to_field(...), order=1)``, via
    ``torch.grid_sample`` (multi-threaded, no field in memory).
    """
    v = torch.as_tensor(voxel_matrix(world_matrix, fixed_affine, moving.affine), dtype=torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in fixed_shape]
    size = torch.tensor(moving.shape, dtype=torch.float64)
    # grid_sample wants (x, y, z) = (k, j, i) normalised to [-1, 1] (align_corners=True)
    grid = torch.empty(tuple(fixed_shape) + (3,), dtype=torch.float32)
    for c in range(3):
        q = (v[c, 0] * axes[0][:, None, None] + v[c, 1] * axes[1][None, :, None]
             + v[c, 2] * axes[2][None, None, :] + v[c, 3])
        grid[..., 2 - c] = (2.0 * q / (size[c] - 1) - 1.0).float()
    img = torch.from_numpy(np.ascontiguousarray(moving.data, dtype=np.float32))[None, None]
    out = F.grid_sample(img, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


def fov_on_moving(fixed: Volume, mask: np.ndarray, moving: Volume) -> np.ndarray:
    """The fixed field-of-view mask carried to the moving grid through the headers (float32 0/1).

    Used as reg_aladin's floating mask in the symmetric version: masking the backward direction
    with the whole head (moving > 0) lets blocks outside the iUS fan match the iUS's zeros, which
    drove symmetric affine runs to scalings of 1.4-1.8 on test data.
    """
    if moving.shape == fixed.shape and np.allclose(moving.affine, fixed.affine):
        return mask.astype(np.float32)
    on_moving = resample(fixed.like(mask.astype(np.float32)), np.eye(4), moving.affine, moving.shape)
    return (on_moving > 0.5).astype(np.float32)


def coarse_factor_for(spacing: np.ndarray, level_mm: float = 1.0) -> int:
    """Largest power of two ``f`` with ``f * min(spacing) <= level_mm`` (at least 1): 2 for 0.5 mm."""
    f = 1
    while 2 * f * float(np.min(spacing)) <= level_mm + 1e-6:
        f *= 2
    return f


def check_matrix(matrix: np.ndarray, centre_mm: np.ndarray) -> str | None:
    """Reason to reject a world matrix (NaN, scaling outside ``SCALE_RANGE``, FOV-centre
    displacement beyond ``MAX_TRANSLATION_MM``), or None when it is sane."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        return "not a finite 4x4 matrix"
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        return "last row is not (0, 0, 0, 1)"
    lin = m[:3, :3]
    det = float(np.linalg.det(lin))
    sv = np.linalg.svd(lin, compute_uv=False)
    lo, hi = SCALE_RANGE
    if not lo <= det <= hi:
        return f"determinant {det:.3f} outside [{lo}, {hi}]"
    if sv.min() < lo or sv.max() > hi:
        return f"axis scale {sv.min():.3f}..{sv.max():.3f} outside [{lo}, {hi}]"
    shift = float(np.linalg.norm(lin @ centre_mm + m[:3, 3] - centre_mm))
    if shift > MAX_TRANSLATION_MM:
        return f"moves the field-of-view centre by {shift:.1f} mm (> {MAX_TRANSLATION_MM:g} mm)"
    return None


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
class _Scorer:
    """SSC-MSE of candidate matrices on one (coarse) evaluation grid, fixed descriptor cached."""

    def __init__(self, fixed: Volume, moving: Volume, mask: np.ndarray):
        self.fixed, self.moving = fixed, moving
        self.mask = torch.from_numpy(mask.astype(bool))
        self.desc_fixed = ssc.ssc_descriptor(fixed.data)
        self.foreground = moving.like((moving.data > 0).astype(np.float32))
        self.identity_overlap = self.overlap(np.eye(4))

    def overlap(self, matrix: np.ndarray) -> float:
        """Share of the fixed mask that lands in the moving image's foreground (moving > 0)."""
        fg = resample(self.foreground, matrix, self.fixed.affine, self.fixed.shape) > 0.5
        return float(fg[self.mask.numpy()].mean())

    def score(self, matrix: np.ndarray) -> float:
        warped = resample(self.moving, matrix, self.fixed.affine, self.fixed.shape)
        return ssc.descriptor_mse(self.desc_fixed, ssc.ssc_descriptor(warped), self.mask)


class _Aladin:
    """reg_aladin runs on volumes written once (uncompressed NIfTI) to a private folder."""

    def __init__(self, folder: Path, fixed: Volume, moving: Volume, mask: np.ndarray, tag: str):
        self.folder, self.tag = folder, tag
        self.ref = save_volume(folder / f"ref_{tag}.nii", fixed)
        self.flo = save_volume(folder / f"flo_{tag}.nii", moving)
        self.rmask = save_volume(folder / f"rmask_{tag}.nii", fixed.like(mask.astype(np.float32)))
        self.fmask = save_volume(folder / f"fmask_{tag}.nii", moving.like(fov_on_moving(fixed, mask, moving)))

    def run(self, options: AladinOptions, name: str, init: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """World matrix and seconds spent in reg_aladin; raises NiftyRegError on failure."""
        t0 = time.perf_counter()
        matrix = run_aladin(self.ref, self.flo, self.folder / f"aff_{self.tag}_{name}.txt", options, self.rmask,
                            self.fmask if options.symmetric else None, init)
        return matrix, time.perf_counter() - t0


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def affine_stage(fixed: Volume, moving: Volume, fixed_mask: np.ndarray | None = None, *,
                 shares: tuple[float, ...] | list[float] = DEFAULT_SHARES, threads: int | None = None,
                 options: AladinOptions = STAGE_OPTIONS, coarse_factor: int | None = None,
                 refine: bool = False) -> AffineResult:
    """Paper's affine stage with a per-case LTS inlier share, guarded against degenerate results.

    ``fixed``: the image on the iUS grid (iUS or its synthetic T1); ``moving``: the MR.
    ``fixed_mask``: the iUS field of view on the fixed grid (default ``fixed.data > 0``).
    ``shares``: ``-pi`` values (percent) of the grid. ``threads``: CPU cores to use (default: all
    available); the grid runs ``threads`` reg_aladin processes at a time, one thread each.
    ``options``: reg_aladin settings of one level (``levels`` is overridden).
    ``coarse_factor``: pooling of the grid level (default :func:`coarse_factor_for`: the grid runs at
    about 1 mm, i.e. 2 for 0.5 mm data, 1 for data at 1 mm or coarser); when it is above 1 and
    ``refine`` is set, the best share is re-run at full resolution (0.5 mm) from the coarse matrix
    and kept if its SSC-MSE is lower. Off by default: on simulated 256^3 cases that 0.5 mm level
    cost 35-230 s on 2 cores and did not lower TRE (e.g. 2.66 -> 2.81 mm with 12 dof, non-symmetric).

    Returns an :class:`AffineResult` whose ``matrix`` (fixed world -> moving world, RAS mm) has an
    SSC-MSE no worse than the identity's; rejected candidates and the reasons are in ``notes``.
    """
    t_start = time.perf_counter()
    if coarse_factor is None:
        coarse_factor = coarse_factor_for(fixed.spacing)
    threads = threads or _cpu_count()
    notes: list[str] = []
    mask = (fixed.data > 0) if fixed_mask is None else np.asarray(fixed_mask, dtype=bool)
    if mask.shape != fixed.shape:
        raise ValueError(f"fixed_mask {mask.shape} is not on the fixed grid {fixed.shape}")
    if fixed.shape != moving.shape and coarse_factor > 1:
        notes.append("fixed and moving grids differ; each is pooled on its own grid")

    fixed_c, moving_c = pooled(fixed, coarse_factor), pooled(moving, coarse_factor)
    mask_c = ssc.downsample_mask(mask, coarse_factor).numpy()
    if not mask_c.any():
        return AffineResult(np.eye(4), None, [], float("nan"), float("nan"), "identity",
                            time.perf_counter() - t_start, 0.0, ["empty fixed mask: identity kept"])
    centre = (fixed.affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]
    scorer = _Scorer(fixed_c, moving_c, mask_c)
    ssc_identity = scorer.score(np.eye(4))

    def judge(matrix: np.ndarray) -> tuple[str | None, float]:
        reason = check_matrix(matrix, centre)
        if reason is None:
            ov = scorer.overlap(matrix)
            if ov < MIN_OVERLAP_RATIO * scorer.identity_overlap:
                reason = f"field of view lost: {ov:.0%} of it in the moving foreground (identity {scorer.identity_overlap:.0%})"
        return reason, (scorer.score(matrix) if reason is None else float("nan"))

    aladin_seconds = 0.0
    candidates: list[tuple[float, np.ndarray, float, str]] = []   # (ssc, matrix, share, level)
    curve: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="brainshift_affine_") as tmp:
        coarse = _Aladin(Path(tmp), fixed_c, moving_c, mask_c, "coarse")
        jobs = max(1, min(threads, len(shares)))
        per_job = max(1, threads // jobs)
        opts = replace(options, levels=1, levels_to_perform=None, threads=per_job)

        def one(share: float):
            try:
                return coarse.run(replace(opts, percent_inliers=share), f"pi{share:g}")
            except (NiftyRegError, OSError, ValueError) as exc:
                return exc

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outs = list(pool.map(one, shares))
        aladin_seconds += time.perf_counter() - t0
        for share, out in zip(shares, outs):
            if isinstance(out, Exception):
                notes.append(f"-pi {share:g}: reg_aladin failed ({out})")
                curve.append((float(share), float("nan")))
                continue
            reason, value = judge(out[0])
            if reason:
                notes.append(f"-pi {share:g}: rejected, {reason}")
            else:
                candidates.append((value, out[0], float(share), "coarse"))
            curve.append((float(share), value))

        if candidates and refine and coarse_factor > 1:
            best = min(candidates, key=lambda c: c[0])
            full = _Aladin(Path(tmp), fixed, moving, mask, "full")
            try:
                matrix, sec = full.run(replace(opts, threads=threads, percent_inliers=best[2]), "refine", init=best[1])
                aladin_seconds += sec
                reason, value = judge(matrix)
                if reason:
                    notes.append(f"refinement at -pi {best[2]:g}: rejected, {reason}")
                else:
                    candidates.append((value, matrix, best[2], "refined"))
            except (NiftyRegError, OSError, ValueError) as exc:
                notes.append(f"refinement at -pi {best[2]:g}: reg_aladin failed ({exc})")

    if not candidates:
        notes.append("no valid candidate: identity kept")
        return AffineResult(np.eye(4), None, curve, ssc_identity, ssc_identity, "identity",
                            time.perf_counter() - t_start, aladin_seconds, notes)
    value, matrix, share, level = min(candidates, key=lambda c: (c[0], c[3] != "refined"))
    if not value < ssc_identity:
        notes.append(f"best candidate (-pi {share:g}, {level}) SSC-MSE {value:.5f} is not below the "
                     f"identity's {ssc_identity:.5f}: identity kept")
        return AffineResult(np.eye(4), None, curve, ssc_identity, ssc_identity, "identity",
                            time.perf_counter() - t_start, aladin_seconds, notes)
    notes.append(f"kept -pi {share:g} ({level} level): SSC-MSE {ssc_identity:.5f} -> {value:.5f}")
    return AffineResult(matrix, share, curve, ssc_identity, value, "affine",
                        time.perf_counter() - t_start, aladin_seconds, notes)


def save_curve(result: AffineResult, json_path: Path, png_path: Path) -> None:
    """Write the SSC-MSE vs inlier-share curve as JSON and as a PNG plot (the paper's Fig. 3).

    The JSON holds every field of the result (matrix as nested lists, NaN as null); the plot marks
    the chosen share and the identity's SSC-MSE.
    """
    def clean(x):
        return None if isinstance(x, float) and not np.isfinite(x) else x

    doc = {
        "matrix": np.asarray(result.matrix).tolist(), "share": result.share,
        "curve": [[s, clean(v)] for s, v in result.curve], "ssc_identity": clean(result.ssc_identity),
        "ssc_final": clean(result.ssc_final), "kept": result.kept, "seconds": result.seconds,
        "aladin_seconds": result.aladin_seconds, "notes": list(result.notes),
    }
    json_path, png_path = Path(json_path), Path(png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = [(s, v) for s, v in result.curve if np.isfinite(v)]
    if pts:
        ax.plot(*zip(*pts), "o-", label="reg_aladin (coarse level)")
    bad = [s for s, v in result.curve if not np.isfinite(v)]
    if bad:
        ax.plot(bad, [result.ssc_identity] * len(bad), "x", color="grey", label="rejected")
    if np.isfinite(result.ssc_identity):
        ax.axhline(result.ssc_identity, color="k", ls="--", lw=1, label="identity")
    if result.share is not None:
        ax.plot([result.share], [result.ssc_final], "*", ms=14, color="C3", label=f"kept: -pi {result.share:g}")
    ax.set_xlabel("LTS inlier share -pi (%)")
    ax.set_ylabel("SSC-MSE in the iUS field of view")
    ax.set_title(f"affine stage: {result.kept}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
