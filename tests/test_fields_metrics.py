"""Field conventions and official metrics: known transforms recovered, wrong conventions caught."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from brainshift import fields, metrics
from brainshift.io import Volume, load_volume, save_volume
from brainshift.niftyreg import reg_resample
from conftest import grid_centre_mm, oblique_affine, rigid_matrix, smooth_volume

FIXED_SHAPE = (40, 36, 32)
MOVING_SHAPE = (44, 30, 36)
A_FIXED = oblique_affine(spacing=(1.2, 0.9, 1.5), degrees=(17, -9, 23), origin=(-20, 15, 5))
A_MOVING = oblique_affine(spacing=(1.0, 1.3, 1.1), degrees=(-5, 12, 3), origin=(-18, 10, 8))


def random_affine_world(rng) -> np.ndarray:
    """A random affine (rotation, anisotropic scale, shear, translation) near identity, RAS mm."""
    m = rigid_matrix(rng.uniform(-8, 8, 3), rng.uniform(-6, 6, 3), grid_centre_mm(A_FIXED, FIXED_SHAPE))
    m[:3, :3] = m[:3, :3] @ (np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3)))
    return m


def true_moving_landmarks(m, fixed_lms):
    v = fields.voxel_matrix(m, A_FIXED, A_MOVING)
    return (v[:3, :3] @ fixed_lms.T).T + v[:3, 3]


def interior_landmarks(rng, n=25, margin=6):
    return np.column_stack([rng.uniform(margin, s - 1 - margin, n) for s in FIXED_SHAPE])


def test_matrix_field_and_tre_recover_known_affine(rng):
    """Oblique anisotropic grids, random affine: field + official TRE give < 1e-3 mm."""
    for _ in range(3):
        m = random_affine_world(rng)
        lms = interior_landmarks(rng)
        disp = fields.matrix_to_field(m, A_FIXED, A_MOVING, FIXED_SHAPE)
        assert disp.shape == FIXED_SHAPE + (3,) and disp.dtype == np.float32
        err = metrics.tre(disp, lms, true_moving_landmarks(m, lms), np.sqrt((A_MOVING[:3, :3] ** 2).sum(0)))
        assert err.max() < 1e-3


def test_wrong_conventions_give_large_tre(rng):
    """The test can fail: a transposed, sign-flipped or push-instead-of-pull field is caught."""
    m = random_affine_world(rng)
    lms = interior_landmarks(rng)
    moving_lms = true_moving_landmarks(m, lms)
    spacing = np.sqrt((A_MOVING[:3, :3] ** 2).sum(0))
    disp = fields.matrix_to_field(m, A_FIXED, A_MOVING, FIXED_SHAPE)
    inverse = fields.matrix_to_field(np.linalg.inv(m), A_FIXED, A_MOVING, FIXED_SHAPE)
    bad = {
        "channels reversed": disp[..., ::-1],
        "sign flipped": -disp,
        "push instead of pull": inverse,
        "mm instead of voxels": disp * 1.3,
    }
    for name, b in bad.items():
        assert metrics.tre(b, lms, moving_lms, spacing).mean() > 1.0, name


def test_warp_matches_niftyreg_resample(rng):
    """Warping with our field equals NiftyReg's own resampling with the matrix (convention check)."""
    moving = Volume(smooth_volume(MOVING_SHAPE, seed=3, sigma=2.5), A_MOVING)
    fixed = Volume(np.zeros(FIXED_SHAPE, np.float32), A_FIXED)
    m = random_affine_world(rng)
    ours = fields.warp(moving.data, fields.matrix_to_field(m, A_FIXED, A_MOVING, FIXED_SHAPE), order=1)
    ref = reg_resample(fixed, moving, m, order=1).data
    inside = (ours > 0) & (ref > 0)
    inside[:2], inside[-2:], inside[:, :2], inside[:, -2:], inside[..., :2], inside[..., -2:] = (False,) * 6
    assert inside.sum() > 0.15 * inside.size  # the two oblique grids overlap in part
    diff = np.abs(ours - ref)[inside]
    assert np.median(diff) < 0.01 and diff.max() < 0.1, (np.median(diff), diff.max())  # range 0..1000
    # and a wrong convention would not match: NiftyReg with the inverse matrix differs a lot
    wrong = reg_resample(fixed, moving, np.linalg.inv(m), order=1).data
    assert np.median(np.abs(ours - wrong)[inside]) > 10.0


def test_compose_equals_product_of_matrices(rng):
    """compose(first, second) = p -> p + first(p) -> ... equals the field of M2 @ M1 (same grids)."""
    a = A_FIXED
    m1, m2 = rigid_matrix([3, -2, 4], [2, 1, -3], grid_centre_mm(a, FIXED_SHAPE)), random_affine_world(rng)
    f1 = fields.matrix_to_field(m1, a, a, FIXED_SHAPE)
    f2 = fields.matrix_to_field(m2, a, a, FIXED_SHAPE)
    expected = fields.matrix_to_field(m2 @ m1, a, a, FIXED_SHAPE)
    got = fields.compose(f1, f2)
    core = (slice(8, -8),) * 3
    assert np.abs(got[core] - expected[core]).max() < 1e-3
    assert np.abs(fields.compose(f2, f1)[core] - expected[core]).max() > 0.05  # order matters


def test_write_field_is_atomic_float32_with_moving_affine(tmp_path, rng):
    disp = rng.standard_normal(FIXED_SHAPE + (3,)).astype(np.float64)
    path = fields.write_field(tmp_path / "disp_0001_0000_0001_0001.nii.gz", disp, A_MOVING)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.float32 and img.shape == FIXED_SHAPE + (3,)
    assert np.allclose(img.affine, A_MOVING, atol=1e-5)
    assert np.allclose(fields.read_field(path), disp, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind
    with pytest.raises(ValueError, match="NaN"):
        bad = disp.copy()
        bad[0, 0, 0, 0] = np.nan
        fields.write_field(tmp_path / "bad.nii.gz", bad, A_MOVING)
    assert not (tmp_path / "bad.nii.gz").exists() and len(list(tmp_path.iterdir())) == 1


def test_mha_round_trip_keeps_ras_geometry(tmp_path):
    """.mha is stored in LPS; reading it back gives the same RAS affine and voxel order."""
    vol = Volume(smooth_volume((12, 10, 8), seed=1), A_FIXED)
    back = load_volume(save_volume(tmp_path / "x.mha", vol))
    assert np.allclose(back.affine, vol.affine, atol=1e-5) and np.array_equal(back.data, vol.data)
    disp = np.random.default_rng(0).standard_normal((12, 10, 8, 3)).astype(np.float32)
    assert np.allclose(fields.read_field(fields.write_field(tmp_path / "d.mha", disp, A_FIXED)), disp)


def test_jacobian_statistics():
    shape = (20, 20, 20)
    zero = np.zeros(shape + (3,), np.float32)
    assert metrics.jacobian_stats(zero) == {"sdlogj": 0.0, "sdlogj_plain": 0.0, "folds": 0}
    # uniform scaling by s: J = s^3 everywhere inside
    s = 1.1
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    jac = metrics.jacobian_determinant((s - 1) * grid)
    assert jac.shape == (16, 16, 16) and np.allclose(jac, s ** 3)
    # a field that reverses one axis in a slab folds there
    fold = zero.copy()
    fold[:, :, 8:12, 2] = -3.0 * (np.arange(8, 12) - 8)[None, None, :]
    st = metrics.jacobian_stats(fold)
    assert st["folds"] > 0 and st["sdlogj"] > 0


def official_scorer(disp_path, fixed_csv, moving_csv, moving_image):
    """Independent transcription of the official ReMIND2Reg TRE (nibabel + np.loadtxt + map_coordinates)."""
    disp = nib.load(str(disp_path)).get_fdata()
    fix, mov = np.loadtxt(fixed_csv, delimiter=","), np.loadtxt(moving_csv, delimiter=",")
    spacing = nib.load(str(moving_image)).header.get_zooms()[:3]
    sampled = np.stack([map_coordinates(disp[..., c], fix.transpose()) for c in range(3)], axis=1)
    return np.linalg.norm((fix + sampled - mov) * spacing, axis=1)


def test_evaluate_folder_agrees_with_official_scorer(tmp_path, rng):
    """`brainshift evaluate` and an independent official-formula scorer agree to 1e-3 mm."""
    from brainshift.cli import main
    from brainshift.io import save_landmarks

    a = oblique_affine(spacing=(1.5, 1.5, 1.5))
    shape = (32, 32, 32)
    data, out = tmp_path / "data", tmp_path / "out"
    for case in ("0001", "0002"):
        save_volume(data / f"ReMIND2Reg_{case}_0000.nii.gz", Volume(smooth_volume(shape, 1), a))
        save_volume(data / f"ReMIND2Reg_{case}_0001.nii.gz", Volume(smooth_volume(shape, 2), a))
        lms = np.column_stack([rng.uniform(4, 27, 12) for _ in range(3)])
        save_landmarks(data / "landmarks" / f"ReMIND2Reg_{case}_0000.csv", lms)
        save_landmarks(data / "landmarks" / f"ReMIND2Reg_{case}_0001.csv", lms + rng.normal(0, 2, lms.shape))
        fields.write_field(out / f"disp_{case}_0000_{case}_0001.nii.gz",
                           rng.normal(0, 1, shape + (3,)), a)
    assert main(["evaluate", "--input", str(data), "--output", str(out), "--quiet"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) == {"name", "aggregates", "cases", "eval_version"}
    for case in ("0001", "0002"):
        ours = report["cases"][f"{case}_0000<--{case}_0001"]["TRE_lm"]["detailed"]
        ref = official_scorer(out / f"disp_{case}_0000_{case}_0001.nii.gz", data / "landmarks" / f"ReMIND2Reg_{case}_0000.csv",
                              data / "landmarks" / f"ReMIND2Reg_{case}_0001.csv", data / f"ReMIND2Reg_{case}_0001.nii.gz")
        assert np.abs(np.array(ours) - ref).max() < 1e-3
