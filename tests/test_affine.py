"""Affine stage: geometry helpers, sanity checks, recovery of a known rigid offset, fall-backs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import affine_transform, gaussian_filter
from scipy.spatial.transform import Rotation

from brainshift import affine as aff
from brainshift.affine import (OFFICIAL_RIGID, AffineResult, affine_stage, check_matrix, coarse_factor_for,
                               pooled, resample, save_curve)
from brainshift.fields import matrix_to_field, voxel_matrix, warp
from brainshift.io import Volume
from brainshift.niftyreg import NiftyRegError

try:
    from brainshift.metrics import tre
except ImportError:  # pragma: no cover - metrics.py not there yet
    from scipy.ndimage import map_coordinates

    def tre(disp, fixed_lms, moving_lms, moving_spacing):
        sampled = np.stack([map_coordinates(disp[..., c], fixed_lms.T, order=3) for c in range(3)], axis=1)
        return np.linalg.norm((fixed_lms + sampled - moving_lms) * moving_spacing, axis=1)


N, SPACING = 64, 1.5


def rigid(degrees: float, axis, shift_mm, centre_mm) -> np.ndarray:
    """World matrix (fixed -> moving): rotate ``degrees`` about ``axis`` through ``centre_mm``, then shift."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(np.deg2rad(degrees) * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
    m[:3, 3] = centre_mm - m[:3, :3] @ centre_mm + np.asarray(shift_mm)
    return m


def toy_case(seed: int = 0, degrees: float = 5.0, shift_mm=(4.0, -3.0, 3.0)):
    """A 64^3 1.5 mm pair: "MR" = smooth blobs in an ellipsoidal head; "iUS" = a non-monotone map
    of the MR pulled through a known rigid matrix, with multiplicative speckle, 0 outside a
    spherical field of view. Returns fixed, moving, true matrix, fixed and moving landmarks (voxels)."""
    rng = np.random.default_rng(seed)
    a = np.diag([SPACING] * 3 + [1.0])
    a[:3, 3] = (-N * SPACING / 2, -N * SPACING / 2 + 3, -N * SPACING / 2 - 2)
    g = np.indices((N,) * 3).astype(np.float32) / N - 0.5
    head = (g[0] / 0.42) ** 2 + (g[1] / 0.45) ** 2 + (g[2] / 0.4) ** 2 < 1
    tissue = gaussian_filter(rng.standard_normal((N,) * 3).astype(np.float32), 3.0)
    detail = np.tanh(8 * gaussian_filter(rng.standard_normal((N,) * 3).astype(np.float32), 1.2))
    mr = np.where(head, np.clip(0.6 + 0.2 * tissue / tissue.std() + 0.1 * detail, 0.05, None), 0).astype(np.float32)
    centre = (a @ np.r_[N / 2, N / 2, N / 2, 1])[:3]
    truth = rigid(degrees, (0.3, 1, 0.5), shift_mm, centre)
    v = voxel_matrix(truth, a, a)
    warped = affine_transform(mr, v[:3, :3], v[:3, 3], order=1, cval=0.0)
    fov = (g[0] - 0.05) ** 2 + (g[1] + 0.02) ** 2 + (g[2] - 0.03) ** 2 < 0.3 ** 2
    us = 4 * (warped - 0.55) ** 2 + 0.03 * N * np.abs(np.gradient(gaussian_filter(warped, 1.0))[0])
    us = us * (1 + 0.2 * rng.standard_normal(us.shape))
    us = np.where(fov, np.clip(us, 0.01, None), 0).astype(np.float32)
    pts = rng.uniform(0.3, 0.7, size=(30, 3)) * N
    pts = pts[fov[tuple(np.round(pts).astype(int).T)]]
    return Volume(us, a.copy()), Volume(mr, a.copy()), truth, pts, pts @ v[:3, :3].T + v[:3, 3]


def mean_tre(matrix, fixed: Volume, moving: Volume, f_lms, m_lms) -> float:
    disp = matrix_to_field(matrix, fixed.affine, moving.affine, fixed.shape)
    return float(tre(disp, f_lms, m_lms, moving.spacing).mean())


@pytest.fixture(scope="module")
def case():
    return toy_case()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def test_resample_matches_fields_warp_on_oblique_grids():
    from conftest import oblique_affine, smooth_volume

    moving = Volume(smooth_volume((20, 22, 18), seed=3), oblique_affine())
    fixed_affine = oblique_affine(spacing=(1.0, 1.1, 1.3), degrees=(5, 12, -7), origin=(-35, 28, 12))
    m = rigid(7, (1, 2, 0.5), (2.0, -1.5, 3.0), np.array([-25.0, 35.0, 20.0]))
    expected = warp(moving.data, matrix_to_field(m, fixed_affine, moving.affine, (19, 21, 17)), order=1)
    got = resample(moving, m, fixed_affine, (19, 21, 17))
    np.testing.assert_allclose(got, expected, atol=1e-3 * float(moving.data.max()))


def test_pooled_keeps_world_coordinates():
    a = np.array([[0.5, 0.1, 0, -20], [0, 0.5, 0, 10], [0, 0, 0.5, 3], [0, 0, 0, 1]])
    idx = np.indices((16, 16, 16)).reshape(3, -1)
    world_x = (a[:3, :3] @ idx + a[:3, 3:])[0].reshape(16, 16, 16).astype(np.float32)
    p = pooled(Volume(world_x, a), 2)
    idx2 = np.indices((8, 8, 8)).reshape(3, -1)
    expected = (p.affine[:3, :3] @ idx2 + p.affine[:3, 3:])[0].reshape(8, 8, 8)
    np.testing.assert_allclose(p.data, expected, atol=1e-4)   # a linear ramp averages to its centre value
    assert coarse_factor_for(np.array([0.5] * 3)) == 2 and coarse_factor_for(np.array([1.5] * 3)) == 1


def test_check_matrix():
    c = np.array([10.0, -20.0, 30.0])
    assert check_matrix(rigid(5, (0, 0, 1), (6, 0, 0), c), c) is None
    assert "finite" in check_matrix(np.full((4, 4), np.nan), c)
    scaled = np.diag([1.3, 1.0, 1.0, 1.0])
    assert "determinant" in check_matrix(scaled, c)
    squeezed = np.diag([1.2, 1.2, 0.7, 1.0])  # det 1.008 but one axis squeezed by 30 %
    assert "axis scale" in check_matrix(squeezed, c)
    assert "centre" in check_matrix(rigid(0, (0, 0, 1), (45, 0, 0), c), c)
    # a large translation entry that only compensates a rotation about a far centre is fine
    far = rigid(10, (0, 0, 1), (1, 0, 0), np.array([300.0, 0, 0]))
    assert check_matrix(far, np.array([300.0, 0, 0])) is None


def test_official_rigid_settings_unchanged():
    assert OFFICIAL_RIGID.args() == ["-rigOnly", "-noSym", "-ln", "2", "-lp", "2", "-nac"]


def test_stage_defaults_are_the_measured_ones():
    """Issue 4 measurements: symmetric 12-dof (-affDirect) at 1 mm, -pv 25, shares 30/50/70."""
    args = aff.STAGE_OPTIONS.args()
    assert "-rigOnly" not in args and "-noSym" not in args and "-affDirect" in args and "-nac" in args
    assert args[args.index("-pv") + 1] == "25"
    assert tuple(aff.DEFAULT_SHARES) == (30, 50, 70)


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def test_recovers_known_rigid_offset(case, tmp_path):
    """Issue acceptance: 5 deg / 6 mm rigid offset recovered to < 1.5 mm mean TRE (official formula)."""
    fixed, moving, truth, f_lms, m_lms = case
    assert mean_tre(np.eye(4), fixed, moving, f_lms, m_lms) > 5.0
    result = affine_stage(fixed, moving, shares=(30, 50, 70), threads=2)
    assert isinstance(result, AffineResult)
    assert result.kept == "affine" and result.share in (30, 50, 70)
    assert mean_tre(result.matrix, fixed, moving, f_lms, m_lms) < 1.5
    assert result.ssc_final < result.ssc_identity
    assert len(result.curve) == 3 and 0 < result.aladin_seconds <= result.seconds
    save_curve(result, tmp_path / "curve.json", tmp_path / "curve.png")
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert doc["share"] == result.share and len(doc["curve"]) == 3
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_identity_kept_on_pure_noise(case):
    fixed, moving, _, _, _ = case
    rng = np.random.default_rng(5)
    noise = fixed.like(np.where(fixed.data > 0, rng.uniform(1, 2, fixed.shape), 0))
    result = affine_stage(noise, moving, shares=(30, 70), threads=2)
    assert result.kept == "identity" and result.share is None
    np.testing.assert_array_equal(result.matrix, np.eye(4))
    assert result.ssc_final == result.ssc_identity


def planted(matrices: dict):
    """A stand-in for reg_aladin's runs: ``-pi`` share -> matrix, or an exception to raise."""
    def run(self, options, name, init=None):
        out = matrices[options.percent_inliers]
        if isinstance(out, Exception):
            raise out
        return np.asarray(out, dtype=float), 0.01
    return run


def test_degenerate_candidates_rejected(case, monkeypatch):
    fixed, moving, truth, f_lms, m_lms = case
    shift = np.eye(4)
    shift[:3, 3] = (60, 0, 0)
    lost = np.eye(4)
    lost[:3, 3] = (0, 0, 38)  # sane numbers, but the field of view leaves the head
    monkeypatch.setattr(aff._Aladin, "run", planted({
        10: np.full((4, 4), np.nan), 20: np.diag([1.5, 1.5, 1.5, 1.0]), 30: NiftyRegError("boom"),
        40: shift, 50: lost, 60: truth}))
    result = affine_stage(fixed, moving, shares=(10, 20, 30, 40, 50, 60), threads=1)
    assert result.kept == "affine" and result.share == 60
    np.testing.assert_allclose(result.matrix, truth)
    curve = dict(result.curve)
    assert all(np.isnan(curve[s]) for s in (10, 20, 30, 40, 50)) and np.isfinite(curve[60])
    text = " ".join(result.notes)
    for word in ("finite", "determinant", "failed", "centre", "field of view lost"):
        assert word in text


def test_never_worse_than_identity(case, monkeypatch):
    """A sane-looking but wrong matrix (10 deg off) scores worse than the identity: identity kept."""
    fixed, moving, truth, _, _ = case
    centre = (fixed.affine @ np.r_[np.argwhere(fixed.data > 0).mean(axis=0), 1])[:3]
    wrong = rigid(-10, (1, 0, 0), (-6, 5, 0), centre)
    monkeypatch.setattr(aff._Aladin, "run", planted({50: wrong}))
    result = affine_stage(fixed, moving, shares=(50,), threads=1)
    assert result.kept == "identity" and result.share is None
    assert np.isfinite(result.curve[0][1]) and result.curve[0][1] > result.ssc_identity
