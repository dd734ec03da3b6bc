"""The simulator: deterministic cases whose truth field, landmarks, fan and files obey the conventions."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from brainshift import synth, ultrasound
from brainshift.fields import read_field
from brainshift.io import discover_cases, load_landmarks, load_volume
from brainshift.metrics import jacobian_determinant, tre

SHAPE, SPACING = 64, 2.25          # same 144 mm cube as 96^3 at 1.5 mm, cheaper


@pytest.fixture(scope="module")
def case() -> synth.SimCase:
    return synth.simulate_case(7, SHAPE, SPACING)


def test_shapes_types_and_grid(case):
    for img in (case.us, case.t1, case.t2):
        assert img.shape == (SHAPE,) * 3 and img.dtype == np.float32
    assert case.truth.shape == (SHAPE,) * 3 + (3,) and case.truth.dtype == np.float32
    assert np.allclose(np.linalg.norm(case.affine[:3, :3], axis=0), SPACING)
    rot = case.affine[:3, :3] / SPACING
    assert np.allclose(rot.T @ rot, np.eye(3), atol=1e-9)
    assert np.abs(rot - np.diag(np.diag(rot))).max() > 0.1          # oblique
    assert 0 <= case.us.min() and case.us.max() <= 255
    assert case.us.max() > 2 * np.median(case.us[case.fov_mask])        # bright echoes over mid-grey tissue
    assert np.percentile(case.t1, 99) > 300 and np.percentile(case.t2, 99) > 300
    json.dumps(case.params)


def test_deterministic_per_seed(case):
    again = synth.simulate_case(7, SHAPE, SPACING)
    for name in ("us", "t1", "t2", "truth", "affine", "fixed_landmarks", "moving_landmarks", "fov_mask", "labels"):
        assert np.array_equal(getattr(case, name), getattr(again, name)), name
    assert again.params == case.params
    other = synth.simulate_case(8, SHAPE, SPACING)
    assert not np.array_equal(other.truth, case.truth)
    assert not np.array_equal(other.us, case.us)


def test_truth_scores_zero_and_zero_field_does_not(case):
    sp = np.full(3, SPACING)
    assert tre(case.truth, case.fixed_landmarks, case.moving_landmarks, sp).max() < 1e-3
    zero = tre(np.zeros_like(case.truth), case.fixed_landmarks, case.moving_landmarks, sp)
    assert 2.0 < zero.mean() < 15.0


def test_shift_is_not_rigid(case):
    """The best rigid fit of the landmark pairs (mm) leaves a residual: the local shift is real."""
    a = case.fixed_landmarks * SPACING
    b = case.moving_landmarks * SPACING
    ac, bc = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(ac.T @ bc)
    r = (u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt).T
    residual = np.linalg.norm(ac @ r.T - bc, axis=1)
    assert residual.mean() > 0.5


def test_landmarks_inside_fov_and_spread(case):
    f = case.fixed_landmarks
    assert 10 <= len(f) <= 20 and f.shape == case.moving_landmarks.shape
    assert np.array_equal(f, np.round(f))
    assert case.fov_mask[tuple(f.astype(int).T)].all()
    assert ((case.moving_landmarks >= 0) & (case.moving_landmarks <= SHAPE - 1)).all()
    dist = np.linalg.norm((f[:, None] - f[None]) * SPACING, axis=-1) + np.eye(len(f)) * 1e9
    assert dist.min() >= 5.0
    assert np.allclose(case.moving_landmarks, f + case.truth[tuple(f.astype(int).T)])


def test_us_zero_outside_fan(case):
    """Exactly 0 outside the sweep, never 0 inside; a sweep the size of the real ones (61-125 ml at
    0.5 mm; lengths scale with the cube, here 144/128 mm, so the volume by up to 1.42x)."""
    assert (case.us[~case.fov_mask] == 0).all()
    assert (case.us[case.fov_mask] > 0).all()
    fov_ml = case.fov_mask.sum() * SPACING ** 3 / 1000
    assert 30 < fov_ml < 300 and np.isclose(fov_ml, case.params["fov_ml"])


def test_labels_cavity_and_echogenicity(case):
    """The label map holds the post-resection classes; the cavity is anechoic against parenchyma."""
    lab = case.labels
    assert lab.shape == case.us.shape and lab.dtype == np.uint8
    assert set(np.unique(lab)) <= set(ultrasound.LABELS.values())
    seen = np.bincount(lab[case.fov_mask], minlength=len(ultrasound.LABELS))
    for name in ("csf", "gm", "wm", "cavity"):
        assert seen[ultrasound.LABELS[name]] > 0, name
    us = case.us
    interior = case.fov_mask & ndi.binary_erosion(lab == ultrasound.LABELS["cavity"])   # off its bright wall
    wm = case.fov_mask & (lab == ultrasound.LABELS["wm"])
    assert interior.sum() > 10 and np.median(us[interior]) < 0.7 * np.median(us[wm])


def test_pre_resection_tumour_in_place_and_hyperechoic():
    """Before resection: the tumour class and no cavity; the tumour brighter than white matter, as
    low-grade gliomas are in the real (RESECT) volumes; no collapse in the shift."""
    pre = synth.simulate_case(7, SHAPE, SPACING, resected=False)
    lab, fov = pre.labels, pre.fov_mask
    assert not (lab == ultrasound.LABELS["cavity"]).any()
    tumour = fov & (lab == ultrasound.LABELS["tumour"])
    assert tumour.sum() > 50
    wm = fov & (lab == ultrasound.LABELS["wm"])
    assert np.median(pre.us[tumour]) > np.median(pre.us[wm])
    assert pre.params["collapse_peak_mm"] == 0 and pre.params["resected"] is False


def test_remnant_is_drawn_with_a_probability():
    """Over a few seeds, some resected cases keep a tumour remnant (label 'tumour') and some do not."""
    flags = [synth.simulate_case(s, 48, 3.0).params["remnant"] for s in range(6)]
    assert any(flags) and not all(flags)


def test_truth_has_no_folds(case):
    jac = jacobian_determinant(case.truth)
    assert jac.min() > 0.1


def test_write_layout_discovered(tmp_path):
    paths = synth.simulate_dataset(tmp_path, 1, seed=3, shape=SHAPE, spacing=SPACING, preview=True, progress=False)
    assert all(p.is_file() for p in paths)
    assert (tmp_path / "preview" / "ReMIND2Reg_0001.png").is_file()
    labels = load_volume(tmp_path / "labels" / "ReMIND2Reg_0001_0000.nii.gz")
    assert labels.data.shape == (SHAPE,) * 3
    meta = json.loads((tmp_path / "ReMIND2Reg_dataset.json").read_text())
    assert len(meta["registration_val"]) == 2
    found = discover_cases(tmp_path)
    assert not found.problems and len(found.cases) == 2
    assert {c.modality for c in found.cases} == {"t1", "t2"}
    case = synth.simulate_case(int(np.random.SeedSequence([3, 1]).generate_state(1)[0]), SHAPE, SPACING)
    for c in found.cases:
        assert c.fixed_landmarks is not None and c.moving_landmarks is not None
        f, m = load_landmarks(c.fixed_landmarks), load_landmarks(c.moving_landmarks)
        disp = read_field(tmp_path / "truth" / c.output_name)
        assert disp.shape == (SHAPE,) * 3 + (3,)
        assert np.array_equal(disp.astype(np.float32), case.truth)
        assert tre(disp, f, m, np.full(3, SPACING)).max() < 1e-3
        moving = load_volume(c.moving)
        assert np.allclose(moving.affine, case.affine) and moving.data.dtype == np.float32
    assert np.array_equal(load_volume(found.cases[0].fixed).data, case.us)


def test_small_case_is_fast():
    """A small case (48^3 at 3 mm) simulates in a few seconds on 2 cores (generous bound for loaded CI)."""
    import time

    t = time.perf_counter()
    synth.simulate_case(11, 48, 3.0)
    assert time.perf_counter() - t < 15.0
