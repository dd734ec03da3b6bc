"""T1 + T2 fusion: exact conversion between moving grids, and the rules' contracts."""
from __future__ import annotations

import numpy as np
import pytest

from brainshift import fields
from brainshift.fusion import convert_field, fuse
from brainshift.io import Volume

from conftest import grid_centre_mm, oblique_affine, rigid_matrix, smooth_volume


def _world(affine: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """World (RAS mm) point each fixed voxel pulls from: ``affine @ (p + disp[p])``."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in disp.shape[:3]], indexing="ij"), -1)
    q = grid + disp
    return q @ affine[:3, :3].T + affine[:3, 3]


def test_convert_field_keeps_the_world_points_and_round_trips():
    """A field re-expressed for another (oblique, anisotropic) moving grid pulls from the same mm points."""
    fixed_aff = oblique_affine()
    t1_aff = oblique_affine(spacing=(1.0, 1.0, 1.0), degrees=(0, 0, 0), origin=(-30, 20, 5))
    t2_aff = oblique_affine(spacing=(0.8, 1.1, 2.0), degrees=(5, -12, 30), origin=(-25, 28, 0))
    shape = (20, 18, 16)
    m = rigid_matrix((4, -3, 6), (3, -2, 1), grid_centre_mm(fixed_aff, shape))
    u1 = fields.matrix_to_field(m, fixed_aff, t1_aff, shape)
    u2 = convert_field(u1, t1_aff, t2_aff)
    assert np.abs(_world(t1_aff, u1) - _world(t2_aff, u2)).max() < 1e-3
    assert np.abs(convert_field(u2, t2_aff, t1_aff) - u1).max() < 1e-3
    assert np.abs(u2 - u1).max() > 1.0  # the grids really differ


def test_average_of_one_field_seen_from_both_grids_is_that_field():
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    t2_aff = aff.copy()
    t2_aff[:3, 3] = (4.0, -3.0, 1.5)  # same spacing, shifted origin
    shape = (24, 24, 24)
    fixed = Volume(smooth_volume(shape, seed=1), aff)
    u1 = fields.matrix_to_field(rigid_matrix((0, 0, 5), (2, 0, 0), grid_centre_mm(aff, shape)), aff, aff, shape)
    fused, rec = fuse(fixed, Volume(fixed.data, aff), Volume(fixed.data, t2_aff), u1, convert_field(u1, aff, t2_aff),
                      rule="average")
    assert rec["chosen"] == "average" and np.abs(fused - u1).max() < 1e-4


def test_vote_prefers_the_field_that_aligns_both_images():
    """T1 and T2 are the fixed image shifted by 3 voxels; the T1 field is right, the T2 field is zero."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (40, 40, 40)
    img = smooth_volume(shape, seed=4, sigma=2.0)
    truth = np.zeros(shape + (3,), np.float32)
    truth[..., 0] = 3.0
    moving = fields.warp(img, -truth)  # moving(q) = img(q - 3): pulling p + 3 recovers img(p)
    fixed = Volume(img, aff)
    fused, rec = fuse(fixed, Volume(moving, aff), Volume(moving, aff), truth, np.zeros_like(truth), rule="vote")
    assert rec["chosen"] == "t1", rec
    assert rec["ssc_sum"]["t1"] < rec["ssc_sum"]["average"] < rec["ssc_sum"]["t2"]
    assert np.array_equal(fused, truth)


def test_unknown_rule_is_rejected():
    aff = np.eye(4)
    v = Volume(np.ones((8, 8, 8), np.float32), aff)
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse(v, v, v, np.zeros((8, 8, 8, 3), np.float32), np.zeros((8, 8, 8, 3), np.float32), rule="max")
