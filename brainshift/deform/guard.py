"""The deformable stage's guard: keep a field only where it earns its place on the case."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..fields import compose, warp
from ..lc2 import lc2
from ..metrics import jacobian_determinant
from ..ssc import ssc_mse

# SSC-MSE margins of check (1) in :func:`guard`. A field fitted on this case's own similarity (the
# refinement optimises SSC, the discrete search an SSC cost) lowers SSC-MSE whether or not it is
# right, so it must beat the affine result by 5%. The network alone is not fitted to the case: its
# SSC-MSE is an independent witness and any decrease counts (with LC2 agreeing). Chosen on
# development seeds 1-2 (10 pairs, docs/MEASUREMENTS.md session 19): the network's field lowered TRE
# on 7 of 10 with SSC-MSE changes of -1.0 to -6.7%, and a 5% margin kept 2 of them.
FITTED_MARGIN = 0.05
UNFITTED_MARGIN = 0.0


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
    inconsistency: float | None = None  # inverse consistency of the discrete search (None: not checked)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def inverse_consistency(forward: np.ndarray, backward: np.ndarray, mask: np.ndarray, spacing_mm) -> float:
    """How far a forward and a backward registration disagree, relative to the forward field's size.

    ``forward``: voxel pull field on the fixed grid (fixed ``p`` <-> moving ``p + forward[p]``);
    ``backward``: the same registration run the other way (the moving image as the fixed one, both
    on the same grid). Returns mean |forward then backward| / mean |forward| over ``mask`` (lengths
    in mm, ``spacing_mm`` the voxel size): 0 when one field undoes the other exactly, about 1 when the
    backward run did not find the forward one's displacement, up to 2 when it found the opposite.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0.0
    nz = np.nonzero(mask)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)   # compose only where it is scored
    inside, fw = mask[box], forward[box]
    forward_mm = float(_lengths_mm(fw[inside], spacing_mm).mean())
    if forward_mm == 0:
        return 0.0
    round_trip = compose(fw, backward, origin=[sl.start for sl in box])
    return float(_lengths_mm(round_trip[inside], spacing_mm).mean()) / forward_mm


def _lengths_mm(disp: np.ndarray, spacing_mm) -> np.ndarray:
    """Length in mm of each voxel displacement (``disp``: (..., 3) voxels; ``spacing_mm``: voxel size)."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    return np.sqrt(((np.asarray(disp, dtype=np.float64) * spacing) ** 2).sum(-1))


def guard(fixed: np.ndarray, moving_aligned: np.ndarray, mask: np.ndarray, field: np.ndarray,
          spacing_mm, *, ius: np.ndarray | None = None, margin: float = FITTED_MARGIN, lc2_margin: float = 0.0,
          sdlogj_max: float = 0.8, max_disp_mm: float = 20.0, max_folds: int = 0,
          inconsistency: float | None = None, inconsistency_max: float = 0.9) -> GuardDecision:
    """Decide whether a deformable field earns its place on this case.

    Kept only if (1) the SSC-MSE inside ``mask`` between ``fixed`` and ``moving_aligned`` warped by
    ``field`` is below ``(1 - margin)`` x the SSC-MSE without it (``margin`` relative: default
    ``FITTED_MARGIN``, 5%, for fields fitted on the case's SSC; ``UNFITTED_MARGIN`` for the network alone),
    (2) at most ``max_folds`` voxels have a Jacobian determinant <= 0, (3) the std of log J over
    the mask is at most ``sdlogj_max`` (0.8: the true fields of simulated 5-10 mm collapses have 0.41-0.57
    inside the iUS field of view, a kept estimate 0.65; the LC2 check now carries the weight 0.25 used
    to), (4) no displacement is longer than ``max_disp_mm`` and,
    when the raw iUS ``ius`` is given, (5) LC2 of ``ius`` against the warped moving image inside the
    mask exceeds LC2 without the field by more than ``lc2_margin``. (5) is the second, independent
    opinion: the field was optimised on SSC (the refinement's own loss), so SSC-MSE alone rewards
    overfitting; LC2 (intensity and gradient against the raw iUS, :mod:`brainshift.lc2`) is not
    optimised by any step and must agree. ``fixed`` may be the synthetic T1; LC2 always uses the iUS.
    When given, (6) ``inconsistency`` (:func:`inverse_consistency` of the large-displacement search run
    forward and backward) must be at most ``inconsistency_max``: evidence from no similarity value at
    all. A search that found a real shift finds it again the other way round; one that followed
    speckle does not. Measured (session 13, docs/MEASUREMENTS.md; development cases only, with and
    without the search's prior): every candidate that raised TRE had 0.97-1.12 (7 candidates on
    128^3 cases at 1 mm; SSC and LC2 together were fooled on 4 of them), those that lowered it had
    0.49-0.82 at 0.5 mm (dev seed 1, 6 pairs) and 0.63 / 1.03 at 1 mm (the 1.03 one, without the prior, is lost).
    ``field``: voxel pull field on the fixed grid; ``spacing_mm``: fixed voxel size (3,).
    """
    mask = np.asarray(mask, dtype=bool)
    jac = jacobian_determinant(field)
    folds = int((jac <= 0).sum())
    inner = mask[2:-2, 2:-2, 2:-2]
    jm = jac[inner] if inner.any() else jac.ravel()
    pos = jm[jm > 0]
    sdlogj = float(np.log(pos).std()) if pos.size else float("inf")
    max_mm = float(_lengths_mm(field, spacing_mm).max())
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
        problems.append(f"SSC-MSE {ssc_before:.5f} -> {ssc_after:.5f} does not improve"
                        + (f" by {margin:.0%}" if margin else ""))
    if lc2_before is not None and not lc2_after > lc2_before + lc2_margin:
        problems.append(f"LC2 {lc2_before:.4f} -> {lc2_after:.4f} does not agree (must rise by > {lc2_margin})")
    if inconsistency is not None and not inconsistency <= inconsistency_max:
        problems.append(f"forward and backward searches disagree (inverse inconsistency {inconsistency:.2f} > "
                        f"{inconsistency_max})")
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
        ic_text = f", inverse inconsistency {inconsistency:.2f}" if inconsistency is not None else ""
        reason = (f"kept: SSC-MSE {ssc_before:.5f} -> {ssc_after:.5f} ({change:+.1%}){lc2_text}{ic_text}, no folds, "
                  f"SDlogJ {sdlogj:.3f}, max {max_mm:.1f} mm")
    return GuardDecision(kept=not problems, reason=reason, ssc_before=ssc_before, ssc_after=ssc_after,
                         sdlogj=sdlogj, folds=folds, max_disp_mm=max_mm, lc2_before=lc2_before, lc2_after=lc2_after,
                        inconsistency=inconsistency)
