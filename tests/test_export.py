"""ITK / 3D Slicer export: the exported transform resamples like brainshift's own warp, maps landmarks
like the official TRE formula, and the command line writes it (or says why not)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from brainshift import fields, metrics
from brainshift.cli import main
from brainshift.io import LPS_RAS, Volume, load_volume, save_volume
from conftest import grid_centre_mm, oblique_affine, rigid_matrix, smooth_volume

FIXED_SHAPE = (30, 26, 22)
MOVING_SHAPE = (34, 30, 28)
FIXED_AFF = oblique_affine(spacing=(1.5, 1.3, 1.7), degrees=(17.0, -9.0, 23.0), origin=(-20.0, 15.0, 5.0))
MOVING_AFF = oblique_affine(spacing=(1.4, 1.5, 1.6), degrees=(-8.0, 12.0, -30.0), origin=(0.0, 0.0, 0.0))
MOVING_AFF[:3, 3] = grid_centre_mm(FIXED_AFF, FIXED_SHAPE) - MOVING_AFF[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2)


def _field() -> np.ndarray:
    """A rigid world motion (both grids oblique, and different) plus a smooth non-linear part: voxels."""
    centre = grid_centre_mm(FIXED_AFF, FIXED_SHAPE)
    disp = fields.matrix_to_field(rigid_matrix((4.0, -3.0, 6.0), (2.0, -1.5, 1.0), centre), FIXED_AFF, MOVING_AFF,
                                  FIXED_SHAPE)
    rng = np.random.default_rng(5)
    for c in range(3):
        smooth = gaussian_filter(rng.standard_normal(FIXED_SHAPE), 4.0)
        disp[..., c] += (1.5 * smooth / np.abs(smooth).max()).astype(np.float32)
    return disp


def _sitk_image(vol: Volume) -> sitk.Image:
    """The volume as SimpleITK sees it after a round trip through an ITK file format (LPS geometry)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vol.data, (2, 1, 0))))
    lps = LPS_RAS @ vol.affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


def _interior(disp: np.ndarray, shape) -> np.ndarray:
    """Fixed voxels whose moving point lies at least 1 voxel inside the moving grid (no border rules)."""
    q = fields._grid_plus(disp)
    return np.all([(q[c] > 1) & (q[c] < shape[c] - 2) for c in range(3)], axis=0)


def test_itk_displacement_maps_fixed_world_to_moving_world():
    disp = _field()
    d = fields.itk_displacement(disp, FIXED_AFF, MOVING_AFF)
    p = np.array([7, 11, 3])
    x_fixed_ras = FIXED_AFF @ np.r_[p, 1.0]
    x_moving_ras = MOVING_AFF @ np.r_[p + disp[tuple(p)].astype(np.float64), 1.0]
    expected_lps = (LPS_RAS @ x_moving_ras - LPS_RAS @ x_fixed_ras)[:3]
    assert d.dtype == np.float64 and d.shape == disp.shape
    np.testing.assert_allclose(d[tuple(p)], expected_lps, atol=1e-9)


@pytest.mark.parametrize("suffix", [".h5", ".nii.gz"])
def test_exported_transform_resamples_like_warp(tmp_path, suffix):
    disp = _field()
    moving = Volume(smooth_volume(MOVING_SHAPE, seed=3, sigma=2.0), MOVING_AFF)
    path = fields.write_itk_transform(tmp_path / f"t{suffix}", disp, FIXED_AFF, MOVING_AFF)
    if suffix == ".h5":
        tx = sitk.ReadTransform(str(path))
    else:  # the vector image as ANTs / ITK-SNAP read it
        img = sitk.ReadImage(str(path))
        assert img.GetNumberOfComponentsPerPixel() == 3 and img.GetSize() == FIXED_SHAPE
        tx = sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    reference = _sitk_image(Volume(np.zeros(FIXED_SHAPE, np.float32), FIXED_AFF))
    itk_warped = sitk.Resample(_sitk_image(moving), reference, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    itk_warped = np.transpose(sitk.GetArrayFromImage(itk_warped), (2, 1, 0))
    ours = fields.warp(moving.data, disp, order=1)
    inside = _interior(disp, MOVING_SHAPE)
    assert inside.mean() > 0.5
    # same field, same trilinear interpolation: equal up to float32 rounding of the vectors and the index maths
    np.testing.assert_allclose(itk_warped[inside], ours[inside], atol=0.01)  # intensities span 0..1000; measured max 8e-4
    # ... and nowhere near a wrong convention (e.g. the inverse direction or RAS vectors)
    wrong = fields.warp(moving.data, -disp, order=1)
    assert np.abs(itk_warped[inside] - ours[inside]).max() < 0.01 * np.abs(wrong[inside] - ours[inside]).max()


def test_landmarks_through_exported_transform_give_official_tre(tmp_path):
    """Fixed landmarks mapped by the ITK transform (linear vectors) ~ the official formula (cubic vectors)."""
    disp = _field()
    rng = np.random.default_rng(9)
    fixed_lm = rng.uniform(5, np.array(FIXED_SHAPE) - 6, size=(12, 3))
    moving_lm = fixed_lm + rng.normal(0, 2.0, size=(12, 3))
    spacing = np.sqrt((MOVING_AFF[:3, :3] ** 2).sum(axis=0))
    official = metrics.tre(disp, fixed_lm, moving_lm, spacing)

    tx = sitk.ReadTransform(str(fields.write_itk_transform(tmp_path / "t.h5", disp, FIXED_AFF, MOVING_AFF)))
    mapped = []
    for lm in fixed_lm:
        x_lps = (LPS_RAS @ FIXED_AFF @ np.r_[lm, 1.0])[:3]
        y_lps = np.array(tx.TransformPoint(x_lps.tolist()))
        mapped.append((np.linalg.inv(MOVING_AFF) @ LPS_RAS @ np.r_[y_lps, 1.0])[:3])
    via_itk = np.linalg.norm((np.array(mapped) - moving_lm) * spacing, axis=1)
    np.testing.assert_allclose(via_itk, official, atol=0.05)


def _write_inputs(tmp_path):
    disp = _field()
    fixed = tmp_path / "fixed.nii.gz"
    save_volume(fixed, Volume(smooth_volume(FIXED_SHAPE, seed=1), FIXED_AFF))
    field = fields.write_field(tmp_path / "disp_0001_0000_0001_0001.nii.gz", disp, MOVING_AFF)
    return disp, fixed, field


def test_cli_export_transform(tmp_path, capsys):
    disp, fixed, field = _write_inputs(tmp_path)
    assert main(["export-transform", str(field), "--fixed", str(fixed), "--to", "slicer"]) == 0
    out = tmp_path / "disp_0001_0000_0001_0001_slicer.h5"
    assert str(out) in capsys.readouterr().out
    tx = sitk.ReadTransform(str(out))
    x = (LPS_RAS @ FIXED_AFF @ np.r_[4.0, 5.0, 6.0, 1.0])[:3]
    expected = x + fields.itk_displacement(disp, FIXED_AFF, MOVING_AFF)[4, 5, 6]
    np.testing.assert_allclose(tx.TransformPoint(x.tolist()), expected, atol=1e-4)
    # --to itk: a vector image; --moving gives the moving grid explicitly (same answer here)
    moving = tmp_path / "moving.nii.gz"
    save_volume(moving, Volume(smooth_volume(MOVING_SHAPE, seed=2), MOVING_AFF))
    assert main(["export-transform", str(field), "--fixed", str(fixed), "--moving", str(moving),
                 "-o", str(tmp_path / "x.nii.gz")]) == 0
    img = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    vec = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0, 3))
    np.testing.assert_allclose(vec, fields.itk_displacement(disp, FIXED_AFF, MOVING_AFF), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_cli_export_transform_bad_input(tmp_path, capsys):
    _, fixed, field = _write_inputs(tmp_path)
    other = tmp_path / "other.nii.gz"
    save_volume(other, Volume(smooth_volume((20, 20, 20), seed=1), FIXED_AFF))
    assert main(["export-transform", str(field), "--fixed", str(other)]) == 1
    assert "not the fixed image's grid" in capsys.readouterr().err
    assert main(["export-transform", str(tmp_path / "missing.nii.gz"), "--fixed", str(fixed)]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    assert main(["export-transform", str(field), "--fixed", str(tmp_path / "broken.nii.gz")]) == 1
    assert "broken.nii.gz" in capsys.readouterr().err
    assert not list(tmp_path.glob("*_itk.nii.gz")) and not list(tmp_path.glob(".*"))
    with pytest.raises(SystemExit):
        main(["export-transform", str(field)])  # --fixed is required
