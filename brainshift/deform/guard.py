"""The deformable stage's guard: keep a field only where it earns its place on the case."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..fields import warp
from ..lc2 import lc2
from ..metrics import jacobian_determinant
from ..ssc import ssc_mse


@dataclass
class GuardDecision:
    """Outcome of :func:`guard`: keep the deformable field or fall back to the affine one."""

    kept: bool
    reason: str
    ssc_before: float     # SSC-MSE inside the mask, moving_aligned (affine only)
    ssc_after: float      # same after warping with the deformable field
    sdlogj: float         # std of log J over the mask (J > 0 voxels), the plain (not +3) form
    folds: int            # voxels with J <= 0 (whole interior grid)
    max_disp_mm: float    # largest displacement length of the field (mm)
    lc2_before: float | None = None   # LC2 of the raw iUS against moving_aligned (None: not checked)
    lc2_after: float | None = None    # same after warping with the field

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def guard(fixed: np.ndarray, moving_aligned: np.ndarray, mask: np.ndarray, field: np.ndarray,
          spacing_mm, *, ius: np.ndarray | None = None, margin: float = 0.05, lc2_margin: float = 0.0,
          sdlogj_max: float = 0.8, max_disp_mm: float = 20.0, max_folds: int = 0) -> GuardDecision:
    """Decide whether a deformable field earns its place on this case.

    Kept only if (1) the SSC-MSE inside ``mask`` between ``fixed`` and ``moving_aligned`` warped by
    ``field`` is below ``(1 - margin)`` x the SSC-MSE without it (``margin`` relative, default 5%:
    linear resampling alone smooths the moving image and lowers SSC-MSE by ~1-3% for a sub-voxel field),
    (2) at most ``max_folds`` voxels have a Jacobian determinant <= 0, (3) the std of log J over
    the mask is at most ``sdlogj_max`` (0.8: the true fields of simulated 5-10 mm collapses have 0.41-0.57
    inside the iUS field of view, a kept estimate 0.65; the LC2 check now carries the weight 0.25 used
    to), (4) no displacement is longer than ``max_disp_mm`` and,
    when the raw iUS ``ius`` is given, (5) LC2 of ``ius`` against the warped moving image inside the
    mask exceeds LC2 without the field by more than ``lc2_margin``. (5) is the second, independent
    opinion: the field was optimised on SSC (the refinement's own loss), so SSC-MSE alone rewards
    overfitting; LC2 (intensity and gradient against the raw iUS, :mod:`brainshift.lc2`) is not
    optimised by any step and must agree. ``fixed`` may be the synthetic T1; LC2 always uses the iUS.
    ``field``: voxel pull field on the fixed grid; ``spacing_mm``: fixed voxel size (3,).
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    jac = jacobian_determinant(field)
    folds = int((jac <= 0).sum())
    inner = mask[2:-2, 2:-2, 2:-2]
    jm = jac[inner] if inner.any() else jac.ravel()
    pos = jm[jm > 0]
    sdlogj = float(np.log(pos).std()) if pos.size else float("inf")
    max_mm = float(np.sqrt(((np.asarray(field, dtype=np.float64) * spacing) ** 2).sum(-1)).max())
    finite = bool(np.isfinite(field).all())
    ssc_before = float(ssc_mse(fixed, moving_aligned, mask))
    warped = warp(moving_aligned, field) if finite else None
    ssc_after = float(ssc_mse(fixed, warped, mask)) if finite else float("inf")
    lc2_before = lc2_after = None
    if ius is not None:
        lc2_before = lc2(ius, moving_aligned, mask)
        lc2_after = lc2(ius, warped, mask) if finite else float("-inf")
    problems = []
    if not finite:
        problems.append("field has NaN/Inf")
    if not ssc_after < ssc_before * (1 - margin):
        problems.append(f"SSC-MSE {ssc_before:.5f} -> {ssc_after:.5f} does not improve by {margin:.0%}")
    if lc2_before is not None and not lc2_after > lc2_before + lc2_margin:
        problems.append(f"LC2 {lc2_before:.4f} -> {lc2_after:.4f} does not agree (must rise by > {lc2_margin})")
    if folds > max_folds:
        problems.append(f"{folds} folded voxels (J <= 0)")
    if not sdlogj <= sdlogj_max:
        problems.append(f"SDlogJ {sdlogj:.3f} > {sdlogj_max}")
    if not max_mm <= max_disp_mm:
        problems.append(f"max displacement {max_mm:.1f} mm > {max_disp_mm} mm")
    change = (ssc_after - ssc_before) / ssc_before if ssc_before > 0 else float("nan")
    if problems:
        reason = "rejected (affine kept): " + "; ".join(problems)
    else:
        lc2_text = f", LC2 {lc2_before:.4f} -> {lc2_after:.4f}" if lc2_before is not None else ""
        reason = (f"kept: SSC-MSE {ssc_before:.5f} -> {ssc_after:.5f} ({change:+.1%}){lc2_text}, no folds, "
                  f"SDlogJ {sdlogj:.3f}, max {max_mm:.1f} mm")
    return GuardDecision(kept=not problems, reason=reason, ssc_before=ssc_before, ssc_after=ssc_after,
                         sdlogj=sdlogj, folds=folds, max_disp_mm=max_mm, lc2_before=lc2_before, lc2_after=lc2_after)
