"""Coarse stage: a global transform (identity, rigid or affine) by NiftyReg's block matching.

All matrices: NiftyReg convention, fixed (iUS) world -> moving (MR) world, RAS mm.

:func:`affine_stage` runs a set of **candidates** and keeps the one a similarity **criterion**
scores best against the raw iUS; the identity (the navigation's own alignment) is always a
candidate, so the result is never worse than it by that criterion. What is kept (:func:`select`): the
**consensus**, the mean matrix of the candidates that beat the identity clearly and agree with each
other within 5 mm (:func:`consensus_members`), where it beats the identity; else a ladder on which a
candidate with more degrees of freedom must beat the simpler choice by a margin. Candidates, for every fixed image offered (the raw iUS, and the synthetic T1 when the style stage runs):

* ``rigid``: reg_aladin ``-rigOnly`` (6 dof), one per LTS inlier share ``-pi``, from the identity and
  from the discrete start below (and from the global start, when asked for);
* ``affine``: reg_aladin 12 dof optimised directly (``-affDirect``, symmetric), one per share, from
  the same starts;
* ``baseline``: the organisers' plain rigid NiftyReg set-up (:data:`OFFICIAL_RIGID`) on the same
  pooled images, so its answer is always among the candidates (the ladder below never loses to it by the criterion).

**Global start** (``search=True``, off by default): before block matching, an exhaustive search over
translations (coarse to fine: 4 then 2 mm steps on 4 and 2 mm grids, within +-12 mm) scored by
LC2 on the field of view's bounding box; block matching then also starts from the best
translation. Off since session 16: on 20 pairs of the session-15 simulator (seeds 1-4) the runs from
it were never the best candidate, the rigid one was 4.2 mm worse than the identity on average, and
without them the kept transform moved by at most 0.23 mm of TRE (mean 3.81 mm either way) for 4
fewer reg_aladin runs; the discrete start covers the same +-12 mm.

**Discrete start** (:func:`discrete_start`): the deformable stage's dense discrete search
(:func:`brainshift.deform.discrete_field`, SSC cost volume within +-12 mm) run on the pooled pair from
the identity, and a rigid and an affine map fitted to its matches inside the field of view. Both
fits are candidates, and the rigid and affine runs also start from them. Unlike the translation
search it sees rotation and the collapse's overall compression. On a simulated development set
(seed 1, 6 pairs at 256^3) it raised the pairs where the stage beats the plain rigid baseline from
4 to 5 (mean TRE 3.28 -> 3.23 mm; one pair 3.89 -> 3.61 mm with the affine fit kept), for 2-5 s.

**Criteria** (see :class:`_Scorer`): ``lc2`` (:mod:`brainshift.lc2`, Wein et al. 2013: iUS as
a local linear combination of the MR and its gradient magnitude; higher is better) and ``ssc``
(SSC-descriptor MSE, the paper's; lower is better). Both are computed for every candidate and
recorded; :data:`DEFAULT_CRITERION` picks. Why SSC: its selection regret (TRE of the candidate it
picks minus the best candidate's) was the lower on 4 simulated dev cases (seed 3: 0.011 mm vs LC2's
0.021 mm; docs/MEASUREMENTS.md). Both are scored only where their patches lie inside the field of
view: with the border included, LC2 ranked a rigid result above the true matrix of a scaled toy case,
and a pure-noise "iUS" preferred a moving image slid onto the FOV border. LC2 drives the translation search
(it is batched there) and is recorded for every candidate.

**Sanity**: a candidate is rejected when its matrix is degenerate (:func:`check_matrix`: scaling
outside :data:`SCALE_RANGE` or :data:`DET_RANGE`, a large shift of the field of view) or loses the
field of view.

**Speed**: everything runs at about 1 mm (images mean-pooled by 2 for 0.5 mm data): the search, the
reg_aladin runs (``threads`` processes at a time, one OpenMP thread each, cheap rigid runs first)
and the scoring, which is cropped to the field of view's bounding box. Every image is pooled and
written once.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
import torch.nn.functional as F

from . import ssc
from .lc2 import lc2, lc2_batch
from .fields import voxel_matrix
from .io import Volume, json_ready, save_volume
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

#: LTS inlier shares (``-pi``, percent) of the affine candidates: a dense grid mostly adds time
#: and chances to pick on noise (the SSC-MSE curve over shares is flat within a few 1e-4) ...
DEFAULT_SHARES: tuple[float, ...] = (30, 50, 70)
#: ... and for the rigid candidates, which vary less with it (2.79-3.02 mm TRE over 30/50/70 on
#: 4 simulated dev cases, where the affine candidates spread up to 0.27 mm)
RIGID_SHARES: tuple[float, ...] = (50,)

#: Sanity limits for a candidate matrix.
#: The scale limits are wide on purpose: on simulated post-resection cases the 12-dof candidates
#: that absorb the tissue collapse around the cavity (axis scales 1.03-1.27, det 1.27-1.67, TRE 1.1-1.8
#: mm where rigid reached 1.3-3.4 mm) are the best ones; what the limits catch are degenerate runs.
#: The kept candidates of the 10 seed-0 bench pairs (session-11 and session-15 simulators) stretch an
#: axis by at most 1.37; on a 64^3 / 2.25 mm test case a 1.44 x 1.13 x 0.89 stretch won the score and
#: raised the TRE over the identity's (5.57 -> 6.14 mm; with 1.4 the stage keeps a 4.98 mm candidate).
SCALE_RANGE = (0.7, 1.4)         # every singular value of the linear part
DET_RANGE = (0.5, 2.0)           # its determinant (volume change)
MAX_TRANSLATION_MM = 25.0        # displacement of the field-of-view centroid
MAX_ROTATION_DEG = 20.0          # rotation of the linear part's polar factor (navigation errors: a few degrees;
                                 # block matching on a small 2.25 mm test case returned 43-130 deg)
MIN_OVERLAP_RATIO = 0.9          # FOV share inside the moving foreground, relative to the identity's


def official_rigid_baseline(fixed: Volume, moving: Volume, threads: int | None = None) -> np.ndarray:
    """World matrix (fixed -> moving, RAS mm) of the official rigid baseline (``niftyreg-rigid``)."""
    opts = OFFICIAL_RIGID if threads is None else AladinOptions(**{**OFFICIAL_RIGID.__dict__, "threads": threads})
    return reg_aladin(fixed, moving, opts, fixed_mask=fixed.data > 0, moving_mask=moving.data > 0)


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
    """Reason to reject a world matrix (NaN, scaling outside ``SCALE_RANGE`` / ``DET_RANGE``, a
    rotation beyond ``MAX_ROTATION_DEG``, FOV-centre displacement beyond ``MAX_TRANSLATION_MM``),
    or None when it is sane."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        return "not a finite 4x4 matrix"
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        return "last row is not (0, 0, 0, 1)"
    lin = m[:3, :3]
    det = float(np.linalg.det(lin))
    u, sv, vt = np.linalg.svd(lin)
    lo, hi = DET_RANGE
    if not lo <= det <= hi:
        return f"determinant {det:.3f} outside [{lo}, {hi}]"
    lo, hi = SCALE_RANGE
    if sv.min() < lo or sv.max() > hi:
        return f"axis scale {sv.min():.3f}..{sv.max():.3f} outside [{lo}, {hi}]"
    angle = float(np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1.0, 1.0))))
    if angle > MAX_ROTATION_DEG:
        return f"rotates by {angle:.0f} deg (> {MAX_ROTATION_DEG:g} deg)"
    shift = float(np.linalg.norm(lin @ centre_mm + m[:3, 3] - centre_mm))
    if shift > MAX_TRANSLATION_MM:
        return f"moves the field-of-view centre by {shift:.1f} mm (> {MAX_TRANSLATION_MM:g} mm)"
    return None


# --------------------------------------------------------------------------------------------
# candidates and their scores
# --------------------------------------------------------------------------------------------
#: reg_aladin settings of the candidates' transform models (one level; ``-pi`` and threads per run).
MODELS: dict[str, AladinOptions] = {
    "rigid": AladinOptions(rigid_only=True, symmetric=False, header_init=True, levels=1, percent_blocks=25),
    "affine": STAGE_OPTIONS,
    "baseline": replace(OFFICIAL_RIGID, levels_to_perform=None),
}
DEFAULT_MODELS: tuple[str, ...] = ("rigid", "affine", "baseline")
#: criterion name -> True when higher is better
CRITERIA: dict[str, bool] = {"lc2": True, "ssc": False}
DEFAULT_CRITERION = "ssc"
#: Model selection: a candidate with more degrees of freedom (identity 0 < rigid and baseline 6 <
#: affine 12) is kept over the best simpler one only if its criterion is better by
#: ``MARGIN_REL`` x |the simpler one's score| + ``MARGIN_ABS[criterion]``. Without it LC2 picked a
#: 12-dof result over a better rigid one on a purely rigid test case (0.492 vs 0.488).
MARGIN_REL = 0.02
MARGIN_ABS: dict[str, float] = {"lc2": 0.002, "ssc": 0.0005}
#: translation search: half range and the step sizes of its coarse-to-fine passes (mm)
SEARCH_RANGE_MM = 12.0
SEARCH_STEPS_MM: tuple[float, ...] = (4.0, 2.0)   # block matching refines below 2 mm; a 1 mm pass cost ~13 s


@dataclass
class Candidate:
    """One coarse-stage candidate: how it was made, its matrix and its scores against the raw iUS."""

    name: str                 # e.g. 'ius/rigid/pi50/start'
    fixed_image: str          # which fixed image reg_aladin saw ('ius', 'synthetic_t1')
    model: str                # 'identity', 'rigid', 'affine', 'baseline'
    share: float | None       # -pi (percent)
    start: str                # 'identity', 'search' (the global translation), 'discrete' (fitted start) or 'consensus'
    matrix: np.ndarray        # 4x4 world, fixed -> moving, RAS mm
    scores: dict[str, float] = field(default_factory=dict)   # criterion -> value (NaN if rejected)
    rejected: str | None = None
    seconds: float = 0.0      # wall time to make it (its reg_aladin run, or the discrete fit)

    def as_dict(self) -> dict:
        return {"name": self.name, "fixed_image": self.fixed_image, "model": self.model, "share": self.share,
                "start": self.start, "matrix": np.asarray(self.matrix).tolist(), "scores": dict(self.scores),
                "rejected": self.rejected, "seconds": self.seconds}


@dataclass
class AffineResult:
    """Outcome of :func:`affine_stage`."""

    matrix: np.ndarray        # 4x4 world, fixed -> moving, RAS mm (NiftyReg convention)
    kept: str                 # model of the chosen candidate: 'identity', 'rigid', 'affine', 'baseline' or 'consensus'
    share: float | None       # its -pi (percent), None for the identity
    fixed_image: str          # the fixed image its reg_aladin run saw
    criterion: str            # the criterion that chose it
    score_identity: float     # criterion value of the identity
    score_final: float        # criterion value of the chosen matrix
    candidates: list[Candidate]
    start: np.ndarray         # the global start (a translation), fixed -> moving world
    seconds: float            # wall time of the whole stage
    aladin_seconds: float     # wall time spent waiting for reg_aladin
    notes: list[str] = field(default_factory=list)

    @property
    def curve(self) -> list[tuple[float, float]]:
        """(share, criterion) of the chosen model, fixed image and start (the paper's Fig. 3)."""
        best = next((c for c in self.candidates if c.matrix is self.matrix), None)
        if best is None or best.share is None:
            return []
        return [(c.share, c.scores.get(self.criterion, float("nan"))) for c in self.candidates
                if (c.model, c.fixed_image, c.start) == (best.model, best.fixed_image, best.start)]


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0) - margin, idx.max(0) + margin + 1
    return tuple(slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(lo, hi, mask.shape))


def crop(vol: Volume, box: tuple[slice, ...]) -> Volume:
    """Sub-volume ``vol.data[box]``; the affine follows (same world coordinates)."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    return Volume(np.ascontiguousarray(vol.data[box]), vol.affine @ shift)


class _Scorer:
    """Criteria of candidate matrices on one (coarse) grid cropped to the field of view's box.

    The raw iUS is the reference for every criterion, whatever fixed image a candidate saw; its
    SSC descriptor is computed once.
    """

    def __init__(self, ius: Volume, moving: Volume, mask: np.ndarray, patch: int = 7, erode: int | None = None):
        box = _bbox(mask, margin=patch // 2 + 2)
        self.fixed, self.moving, self.patch = crop(ius, box), moving, patch
        self.mask_np = np.ascontiguousarray(mask[box])
        # scored only where neither an LC2 patch nor the SSC descriptor (reach 3 voxels) sees past the
        # field of view: at its border the iUS jumps to 0, and a moving image whose head outline is
        # slid onto that border scored better than the identity on a pure-noise "iUS"
        inner = ndimage.binary_erosion(self.mask_np, iterations=max(patch // 2, 3) if erode is None else erode)
        self.mask = torch.from_numpy(inner if inner.any() else self.mask_np)
        self.desc_fixed = ssc.ssc_descriptor(self.fixed.data)
        self.foreground = moving.like((moving.data > 0).astype(np.float32))
        self.identity_overlap = self.overlap(np.eye(4))

    def warped(self, matrix: np.ndarray, image: Volume | None = None) -> np.ndarray:
        return resample(image or self.moving, matrix, self.fixed.affine, self.fixed.shape)

    def overlap(self, matrix: np.ndarray) -> float:
        """Share of the field of view that lands in the moving image's foreground (moving > 0)."""
        return float((self.warped(matrix, self.foreground) > 0.5)[self.mask_np].mean())

    def score(self, matrix: np.ndarray, criterion: str) -> float:
        w = self.warped(matrix)
        if criterion == "lc2":
            return lc2(self.fixed.data, w, self.mask, patch=self.patch, factor=1)
        if criterion == "ssc":
            return ssc.descriptor_mse(self.desc_fixed, ssc.ssc_descriptor(w), self.mask)
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")

    def lc2_many(self, matrices: list[np.ndarray], chunk: int = 32) -> np.ndarray:
        """LC2 of many matrices at once (batched: far fewer tensor operations than one by one)."""
        out = []
        for i in range(0, len(matrices), chunk):
            warped = torch.from_numpy(np.stack([self.warped(m) for m in matrices[i:i + chunk]]))
            out.append(lc2_batch(self.fixed.data, warped, self.mask, patch=self.patch).numpy())
        return np.concatenate(out).astype(np.float64)

    def scores(self, matrix: np.ndarray, criteria=tuple(CRITERIA)) -> dict[str, float]:
        return {c: self.score(matrix, c) for c in criteria}


def _better(criterion: str, a: float, b: float) -> bool:
    """True when score ``a`` is strictly better than ``b`` (NaN is never better)."""
    if not np.isfinite(a):
        return False
    if not np.isfinite(b):
        return True
    return a > b if CRITERIA[criterion] else a < b


def _clearly_better(criterion: str, a: float, b: float, rel: float = MARGIN_REL, absolute: float | None = None) -> bool:
    """``a`` beats ``b`` by ``rel`` x |b| + ``absolute`` (default: the model-selection margin,
    :data:`MARGIN_REL` and :data:`MARGIN_ABS`)."""
    if not np.isfinite(b):
        return np.isfinite(a)
    need = rel * abs(b) + (MARGIN_ABS[criterion] if absolute is None else absolute)
    return _better(criterion, a - need if CRITERIA[criterion] else a + need, b)


#: degrees of freedom of each model, for :func:`select` (a consensus is an affine map)
DOF = {"identity": 0, "rigid": 6, "baseline": 6, "affine": 12, "consensus": 12}
#: Consensus (:func:`consensus_members`): the candidates that beat the identity by this relative
#: margin (SSC-MSE 5 % lower) vote; those within :data:`CONSENSUS_TRIM_MM` of their medoid are averaged.
CONSENSUS_MARGIN_REL = 0.05
CONSENSUS_TRIM_MM = 5.0


def spread_mm(a: np.ndarray, b: np.ndarray, points_mm: np.ndarray) -> float:
    """RMS distance (mm) between where two world matrices (4x4, RAS mm) send ``points_mm`` (N x 3, world mm)."""
    h = np.c_[points_mm, np.ones(len(points_mm))]
    return float(np.sqrt((((h @ (np.asarray(a) - np.asarray(b)).T)[:, :3]) ** 2).sum(1).mean()))


def consensus_members(candidates: list[Candidate], criterion: str, points_mm: np.ndarray,
                      margin_rel: float = CONSENSUS_MARGIN_REL, trim_mm: float = CONSENSUS_TRIM_MM
                      ) -> list[Candidate]:
    """The candidates whose mean matrix is the consensus (empty: no consensus).

    Voters: valid candidates (not rejected, not a consensus) whose ``criterion`` beats the identity's
    (``candidates[0]``) by ``margin_rel`` x |identity's|. Their medoid is the voter with the smallest
    median :func:`spread_mm` to the others over ``points_mm`` (the field of view, world mm); the members
    are the voters within ``trim_mm`` of it. Block-matching runs from different starts, shares and
    models that land near each other agree on the anatomy; a run that diverged lands alone.
    """
    ident = candidates[0].scores.get(criterion, np.nan)
    if not np.isfinite(ident):
        return []
    voters = [c for c in candidates[1:] if c.rejected is None and c.model != "consensus"
              and _clearly_better(criterion, c.scores.get(criterion, np.nan), ident, rel=margin_rel, absolute=0.0)]
    if len(voters) < 2:
        return voters
    dist = np.array([[spread_mm(a.matrix, b.matrix, points_mm) for b in voters] for a in voters])
    medoid = int(np.argmin(np.median(dist, axis=1)))
    return [c for c, d in zip(voters, dist[medoid]) if d <= trim_mm]


def select(candidates: list[Candidate], criterion: str) -> Candidate:
    """The kept candidate: the consensus for ``criterion`` (the candidate named ``consensus/<criterion>``,
    see :func:`consensus_members`) where there is one, it is valid and it beats the identity clearly
    (:func:`_clearly_better`); otherwise the ladder below.

    Why the consensus first: on 20 simulated development pairs (256^3, seeds 1-4) the ladder kept a
    single run that had gone wrong on 2 pairs (TRE 7.36 and 12.93 mm against the identity's 5.24 and
    10.10) because a 6-dof rung won and nothing with more freedom beat it by the margin; the mean of
    the agreeing runs gave mean TRE 3.81 mm against the ladder's 4.43, worst pair 6.05 against 12.93
    (docs/MEASUREMENTS.md, session 16).

    Ladder: best by ``criterion`` on each rung of growing freedom, and a
    rung above the current choice only where it beats it clearly (:func:`_clearly_better`).

    Rungs: degrees of freedom (identity 0 < rigid and baseline 6 < affine 12), and within each, the
    runs from the identity before those from another start (the global search's translation, the
    fit to a discrete search) and the fits themselves: the navigation's own
    alignment is the prior, a start 10-20 mm away needs evidence (rigid from the search start
    landed 12-24 mm off on 4 of 11 simulated 256^3 pairs, once kept for a 0.2 % better SSC-MSE).
    ``candidates`` must contain the identity (first); rejected ones (``rejected`` set) never win.
    """
    chosen = candidates[0]
    for c in candidates:
        if (c.name == f"consensus/{criterion}" and c.rejected is None
                and _clearly_better(criterion, c.scores.get(criterion, np.nan), chosen.scores[criterion])):
            return c
    rung = lambda c: (DOF[c.model], c.start != "identity")                  # noqa: E731
    for level in sorted({rung(c) for c in candidates} - {(0, False)}):
        pool = [c for c in candidates if rung(c) == level and c.rejected is None and c.model != "consensus"
                and np.isfinite(c.scores.get(criterion, np.nan))]
        if not pool:
            continue
        key = (lambda c: -c.scores[criterion]) if CRITERIA[criterion] else (lambda c: c.scores[criterion])
        best = min(pool, key=key)
        if _clearly_better(criterion, best.scores[criterion], chosen.scores[criterion]):
            chosen = best
    return chosen


def _translation(t_mm: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t_mm
    return m


def translation_search(scorers: list[_Scorer], range_mm: float = SEARCH_RANGE_MM,
                       steps_mm: tuple[float, ...] = SEARCH_STEPS_MM) -> tuple[np.ndarray, float]:
    """Best pure translation (world mm, fixed -> moving) by LC2, coarse to fine.

    Pass 1 tries every translation on a ``steps_mm[0]`` grid within +-``range_mm`` per axis; each
    later pass tries the 27 translations at its step around the best so far. Pass ``n`` scores on
    ``scorers[min(n, len(scorers) - 1)]`` (coarser grids first: 4 and 2 mm grids for the 4 and 2 mm
    steps), all translations of a pass in one batch. Returns the matrix and its LC2 on the
    last pass's grid. (LC2 whatever the stage's criterion: it is the only one batched.)
    """
    best_t, best = np.zeros(3), float("nan")
    for n, step in enumerate(steps_mm):
        scorer = scorers[min(n, len(scorers) - 1)]
        k = int(round(range_mm / step)) if n == 0 else 1
        offsets = np.arange(-k, k + 1) * step
        ts = [best_t + np.array(d) for d in itertools.product(offsets, repeat=3)]
        values = scorer.lc2_many([_translation(t) for t in ts])
        i = int(np.nanargmax(values))
        best_t, best = ts[i], float(values[i])
    return _translation(best_t), best


def discrete_start(fixed: Volume, moving: Volume, mask: np.ndarray, max_points: int = 50_000
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Rigid and affine starts (4x4 world, fixed -> moving, RAS mm) fitted to a dense discrete search.

    The moving image is resampled onto the fixed grid through the headers and
    :func:`brainshift.deform.discrete_field` (SSC cost volume, +-12 mm, coupled; pull field in fixed
    voxels) relates the two inside ``mask``; each masked fixed voxel ``p`` (at most ``max_points``,
    evenly strided) and its match ``p + u(p)`` are taken to world mm through the fixed affine, and a
    rigid (Procrustes) and an affine (least squares) map are fitted to the pairs. Unlike the
    translation search it sees rotation and the collapse's overall scaling; unlike block matching it
    cannot diverge far from the dense search's smooth field. The search runs without its prior
    (``prior=0``): the fits average the matches over the whole field of view, and the coarse stage was
    measured without it.
    """
    from .deform import discrete_field

    on_fixed = resample(moving, np.eye(4), fixed.affine, fixed.shape)
    disp = discrete_field(fixed.data, on_fixed, mask, spacing_mm=float(np.mean(fixed.spacing)), prior=0.0)
    p = np.argwhere(mask)
    p = p[:: max(1, len(p) // max_points)]
    q = p + disp[tuple(p.T)]
    to_world = lambda v: v @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]       # noqa: E731
    x, y = to_world(p.astype(np.float64)), to_world(q.astype(np.float64))
    affine = np.eye(4)
    affine[:3] = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0].T
    xc, yc = x.mean(0), y.mean(0)
    u, _, vt = np.linalg.svd((y - yc).T @ (x - xc))
    r = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    rigid = np.eye(4)
    rigid[:3, :3], rigid[:3, 3] = r, yc - r @ xc
    return rigid, affine


class _Aladin:
    """reg_aladin runs on volumes written once (uncompressed NIfTI) to a private folder.

    ``shared``: the reference mask, the moving image and its floating mask (the FOV carried to the
    moving grid), written once by :meth:`write_shared` for the runners of every fixed image.
    """

    def __init__(self, folder: Path, fixed: Volume, tag: str, shared: tuple[Path, Path, Path]):
        self.folder, self.tag = folder, tag
        self.ref = save_volume(folder / f"ref_{tag}.nii", fixed)
        self.rmask, self.flo, self.fmask = shared

    @staticmethod
    def write_shared(folder: Path, fixed: Volume, mask: np.ndarray, moving: Volume) -> tuple[Path, Path, Path]:
        """Write the reference mask, the moving image and its floating mask; return their paths."""
        return (save_volume(folder / "rmask.nii", fixed.like(mask.astype(np.float32))),
                save_volume(folder / "flo.nii", moving),
                save_volume(folder / "fmask.nii", moving.like(fov_on_moving(fixed, mask, moving))))

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


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def affine_stage(fixed: Volume, moving: Volume, fixed_mask: np.ndarray | None = None, *,
                 extra_fixed: dict[str, Volume] | None = None, shares: tuple[float, ...] | list[float] = DEFAULT_SHARES,
                 rigid_shares: tuple[float, ...] | list[float] = RIGID_SHARES,
                 models: tuple[str, ...] = DEFAULT_MODELS, criterion: str = DEFAULT_CRITERION,
                 search: bool = False, discrete: bool = True, all_criteria: bool = False, threads: int | None = None,
                 coarse_factor: int | None = None) -> AffineResult:
    """Choose a global transform per case among identity, rigid and affine candidates.

    ``fixed``: the raw iUS (the reference every candidate is scored against); ``extra_fixed``: other
    fixed images on the same grid that reg_aladin may register to (name -> volume, e.g. the
    synthetic T1); ``moving``: the MR. ``fixed_mask``: the iUS field of view on the fixed grid
    (default ``fixed.data > 0``). ``shares``: LTS ``-pi`` values (percent) of the ``affine`` runs on
    the iUS (extra fixed images: the middle one); ``rigid_shares``: those of the ``rigid`` runs; ``models``: which of :data:`MODELS` to run; ``criterion``: one of
    :data:`CRITERIA`; ``search``: run the global translation search (else start from the identity
    only); ``discrete``: also start runs from rigid and affine maps fitted to a dense discrete
    search (:func:`discrete_start`; the fits are candidates themselves); ``all_criteria``: score every candidate under every criterion (for ``bench-coarse``'s
    regret table; else only under ``criterion``). ``threads``: CPU cores (default all): that many reg_aladin processes at a time.
    ``coarse_factor``: pooling (default: to about 1 mm, see :func:`coarse_factor_for`).

    Returns an :class:`AffineResult` whose ``matrix`` (fixed world -> moving world, RAS mm) scores at
    least as well as the identity by ``criterion``; every candidate, its scores under every
    criterion and why any was rejected are in ``candidates`` and ``notes``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    t_start = time.perf_counter()
    if coarse_factor is None:
        coarse_factor = coarse_factor_for(fixed.spacing)
    threads = threads or _cpu_count()
    notes: list[str] = []
    mask = (fixed.data > 0) if fixed_mask is None else np.asarray(fixed_mask, dtype=bool)
    if mask.shape != fixed.shape:
        raise ValueError(f"fixed_mask {mask.shape} is not on the fixed grid {fixed.shape}")
    fixed_images = {"ius": fixed, **(extra_fixed or {})}
    for name, img in fixed_images.items():
        if img.shape != fixed.shape:
            raise ValueError(f"fixed image {name!r} {img.shape} is not on the iUS grid {fixed.shape}")

    identity = Candidate("identity", "ius", "identity", None, "identity", np.eye(4))
    mask_c = ssc.downsample_mask(mask, coarse_factor).numpy()
    if not mask_c.any():
        identity.scores = {c: float("nan") for c in CRITERIA}
        return AffineResult(np.eye(4), "identity", None, "ius", criterion, float("nan"), float("nan"), [identity],
                            np.eye(4), time.perf_counter() - t_start, 0.0, ["empty fixed mask: identity kept"])
    moving_c = pooled(moving, coarse_factor)
    pooled_fixed = {name: pooled(img, coarse_factor) for name, img in fixed_images.items()}
    scorer = _Scorer(pooled_fixed["ius"], moving_c, mask_c)
    wanted = tuple(CRITERIA) if all_criteria else (criterion,)
    identity.scores = scorer.scores(np.eye(4), wanted)
    centre = (fixed.affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]
    start = np.eye(4)
    if search:
        # LC2 only on these (patch // 2 erosion); grids of about 4 and 2 mm, as far as they are coarser
        factors = sorted({coarse_factor_for(scorer.fixed.spacing, mm) for mm in (4.0, 2.0)} - {1}, reverse=True)
        levels = [(f, p, ssc.downsample_mask(mask_c, f).numpy()) for f, p in zip(factors, (3, 5))]
        pyramid = [_Scorer(pooled(pooled_fixed["ius"], f), pooled(moving_c, f), m, patch=p, erode=p // 2)
                   for f, p, m in levels if m.any()]
        start, value = translation_search(pyramid + [scorer])
        notes.append(f"global start: translation {np.round(start[:3, 3], 1).tolist()} mm (LC2 {value:.4f} on "
                     "the search grid)")
    starts = {"identity": np.eye(4)}
    if not np.allclose(start, np.eye(4)):
        starts["search"] = start
    rigid_starts = dict(starts)          # where rigid runs start (a fitted start has a rigid version)
    fits: list[Candidate] = []
    if discrete:
        t0 = time.perf_counter()
        rigid_starts["discrete"], starts["discrete"] = discrete_start(pooled_fixed["ius"], moving_c, mask_c)
        sec = time.perf_counter() - t0
        fits = [Candidate(f"ius/{m}/discrete-fit", "ius", m, None, "discrete", d, seconds=sec)
                for m, d in (("rigid", rigid_starts["discrete"]), ("affine", starts["discrete"]))]
        notes.append(f"discrete start: fitted to a dense search in {sec:.1f} s")

    # the runs, cheap first: rigid and baseline before affine, each model from every start.
    # Extra fixed images (the synthetic T1) get the middle share only: their runs cost as much as the
    # iUS's and have not been picked more than occasionally (see the style issue).
    jobs: list[tuple[str, str, float | None, str]] = []    # (fixed image, model, share, start)
    for name in fixed_images:
        own = tuple(shares) if name == "ius" else (float(sorted(shares)[len(shares) // 2]),)
        if "rigid" in models:
            jobs += [(name, "rigid", float(p), s) for s in starts for p in rigid_shares]
        if "baseline" in models:
            jobs.append((name, "baseline", None, "identity"))
        if "affine" in models:
            jobs += [(name, "affine", float(p), s) for s in starts for p in own]

    candidates = [identity]
    with tempfile.TemporaryDirectory(prefix="brainshift_affine_") as tmp:
        shared = _Aladin.write_shared(Path(tmp), pooled_fixed["ius"], mask_c, moving_c)
        runners = {name: _Aladin(Path(tmp), img, name, shared) for name, img in pooled_fixed.items()}

        def one(job):
            name, model, share, s = job
            opts = replace(MODELS[model], threads=1)
            if share is not None:
                opts = replace(opts, percent_inliers=share)
            tag = f"{name}/{model}" + (f"/pi{share:g}" if share is not None else "") + f"/{s}"
            try:
                init = None if s == "identity" else (rigid_starts if model == "rigid" else starts)[s]
                matrix, sec = runners[name].run(opts, tag.replace("/", "_"), init=init)
                return Candidate(tag, name, model, share, s, matrix, seconds=sec)
            except (NiftyRegError, OSError, ValueError) as exc:
                return Candidate(tag, name, model, share, s, np.full((4, 4), np.nan), rejected=f"reg_aladin failed ({exc})")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
            runs = list(pool.map(one, jobs))
        aladin_seconds = time.perf_counter() - t0

    def sanity(matrix: np.ndarray) -> str | None:
        """Why a matrix cannot be kept (degenerate, or the field of view slid off the moving head), or None."""
        reason = check_matrix(matrix, centre)
        if reason is None:
            ov = scorer.overlap(matrix)
            if ov < MIN_OVERLAP_RATIO * scorer.identity_overlap:
                reason = (f"field of view lost: {ov:.0%} of it in the moving foreground "
                          f"(identity {scorer.identity_overlap:.0%})")
        return reason

    for cand in fits + runs:
        if cand.rejected is None:
            cand.rejected = sanity(cand.matrix)
        if cand.rejected:
            cand.scores = {c: float("nan") for c in CRITERIA}
            notes.append(f"{cand.name}: rejected, {cand.rejected}")
        else:
            cand.scores = scorer.scores(cand.matrix, wanted)
        candidates.append(cand)
    fov = (scorer.fixed.affine @ np.c_[np.argwhere(scorer.mask_np), np.ones(int(scorer.mask_np.sum()))].T).T[:, :3]
    fov = fov[np.linspace(0, len(fov) - 1, min(len(fov), 5000)).astype(int)]
    for crit in wanted:
        members = consensus_members(candidates, crit, fov)
        if not members:
            continue
        cons = Candidate(f"consensus/{crit}", "ius", "consensus", None, "consensus",
                         np.mean([c.matrix for c in members], axis=0))
        cons.rejected = sanity(cons.matrix)   # the same checks as every other candidate
        cons.scores = ({c: float("nan") for c in CRITERIA} if cons.rejected else scorer.scores(cons.matrix, wanted))
        notes.append(f"consensus/{crit}: mean of {len(members)} candidates ({', '.join(c.name for c in members)})"
                     + (f"; rejected, {cons.rejected}" if cons.rejected else ""))
        candidates.append(cons)
    best = select(candidates, criterion)
    if best is identity:
        notes.append(f"no candidate beats the identity by {criterion}: identity kept")
    else:
        notes.append(f"kept {best.name}: {criterion} {identity.scores[criterion]:.4f} -> {best.scores[criterion]:.4f}")
    return AffineResult(best.matrix, best.model, best.share, best.fixed_image, criterion,
                        identity.scores[criterion], best.scores[criterion], candidates, start,
                        time.perf_counter() - t_start, aladin_seconds, notes)


def result_dict(result: AffineResult) -> dict:
    """Every field of an :class:`AffineResult`, JSON-ready (matrices as nested lists, NaN as null)."""
    return json_ready({
        "matrix": result.matrix, "kept": result.kept, "share": result.share, "fixed_image": result.fixed_image,
        "criterion": result.criterion, "score_identity": result.score_identity, "score_final": result.score_final,
        "start": result.start, "candidates": [c.as_dict() for c in result.candidates], "curve": result.curve,
        "seconds": result.seconds, "aladin_seconds": result.aladin_seconds, "notes": list(result.notes)})


def save_curve(result: AffineResult, json_path: Path, png_path: Path) -> None:
    """Write the stage's candidates as JSON and their criterion vs LTS share as a PNG (cf. the paper's Fig. 3).

    One line per (fixed image, model, start) group of candidates; the identity's score is a dashed
    line, the kept candidate a star, rejected candidates grey crosses at the identity's level.
    """
    json_path, png_path = Path(json_path), Path(png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result_dict(result), indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crit = result.criterion
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    groups: dict[tuple[str, str, str], list[Candidate]] = {}
    for c in result.candidates:
        if c.share is not None:
            groups.setdefault((c.fixed_image, c.model, c.start), []).append(c)
    for (fimg, model, start), cs in groups.items():
        pts = sorted((c.share, c.scores.get(crit, np.nan)) for c in cs if np.isfinite(c.scores.get(crit, np.nan)))
        if pts:
            ax.plot(*zip(*pts), "o-", ms=4, label=f"{fimg} {model} from {start}")
        bad = [c.share for c in cs if not np.isfinite(c.scores.get(crit, np.nan))]
        if bad and np.isfinite(result.score_identity):
            ax.plot(bad, [result.score_identity] * len(bad), "x", color="grey")
    if np.isfinite(result.score_identity):
        ax.axhline(result.score_identity, color="k", ls="--", lw=1, label="identity")
    for c in result.candidates:
        if c.model == "baseline" and np.isfinite(c.scores.get(crit, np.nan)):
            ax.axhline(c.scores[crit], color="C7", ls=":", lw=1, label=f"{c.fixed_image} plain rigid baseline")
    if result.share is not None:
        ax.plot([result.share], [result.score_final], "*", ms=14, color="C3", label=f"kept: {result.kept}")
    ax.set_xlabel("LTS inlier share -pi (%)")
    ax.set_ylabel(f"{crit} vs the raw iUS ({'higher' if CRITERIA[crit] else 'lower'} is better)")
    ax.set_title(f"coarse stage: {result.kept} kept")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
