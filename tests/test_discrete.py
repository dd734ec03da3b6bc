"""Discrete large-displacement search of the deformable stage (deform.discrete_field)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainshift import deform, fields, metrics

torch.set_num_threads(1)


def texture(n: int, seed: int) -> np.ndarray:
    """Gaussian-smoothed noise in [0, 1]: structure at every location, no flat regions."""
    v = gaussian_filter(np.random.default_rng(seed).standard_normal((n,) * 3).astype(np.float32), 1.5)
    return (v - v.min()) / (v.max() - v.min())


def box_mask(n: int, lo: int, hi: int) -> np.ndarray:
    mask = np.zeros((n,) * 3, bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return mask


def push_pair(n: int = 48, spacing: float = 2.0, peak_mm: float = 8.0, sigma_mm: float = 12.0, seed: int = 0,
              direction=(1.0, 0.0, 0.0), centre=None):
    """(fixed, moving, mask, truth): a smooth local push (Gaussian bump, voxel pull field) and a new contrast.

    fixed = 1 - warp(moving, truth)^0.7: inverted and non-linearly remapped, as between MR and iUS."""
    moving = texture(n, seed)
    grid = np.indices((n,) * 3).astype(np.float32)
    c = np.full(3, (n - 1) / 2) if centre is None else np.asarray(centre, float)
    r2_mm = ((grid - c[:, None, None, None]) ** 2).sum(0) * spacing ** 2
    bump = peak_mm / spacing * np.exp(-r2_mm / (2 * sigma_mm ** 2))                  # voxels
    unit = np.asarray(direction, np.float32) / np.linalg.norm(direction)
    truth = (bump[..., None] * unit).astype(np.float32)
    fixed = 1 - fields.warp(moving, truth) ** 0.7
    return fixed, moving, box_mask(n, n // 4, n - n // 4), truth


def epe_mm(disp: np.ndarray, truth: np.ndarray, sel: np.ndarray, spacing: float) -> float:
    return float(np.linalg.norm(disp - truth, axis=-1)[sel].mean() * spacing)


CASES = {"centre_x": {}, "offcentre_oblique": {"seed": 2, "direction": (0.0, 1.0, -1.0), "centre": (20, 26, 22)}}


@pytest.fixture(scope="module", params=list(CASES))
def push(request):
    fixed, moving, mask, truth = push_pair(**CASES[request.param])
    disp = deform.discrete_field(fixed, moving, mask, spacing_mm=2.0)
    return request.param, fixed, moving, mask, truth, disp


def test_large_smooth_push_is_recovered(push):
    """An 8 mm push (sigma 12 mm, 2 mm voxels) is recovered to under a third of its size (identity: all of it)."""
    name, _, _, mask, truth, disp = push
    sel = mask & (np.linalg.norm(truth, axis=-1) * 2.0 > 2.0)          # where |truth| > 2 mm
    size = float(np.linalg.norm(truth, axis=-1)[sel].mean() * 2.0)
    before, after = epe_mm(np.zeros_like(truth), truth, sel, 2.0), epe_mm(disp, truth, sel, 2.0)
    print(f"\n{name}: mean |truth| {size:.2f} mm, EPE identity {before:.2f} mm -> discrete {after:.2f} mm")
    assert after < size / 3 and after < before / 3


def test_push_field_is_smooth_and_zero_outside_the_crop(push):
    _, fixed, _, mask, _, disp = push
    assert disp.shape == fixed.shape + (3,) and disp.dtype == np.float32
    jac = metrics.jacobian_determinant(disp)
    print(f"\nmin Jacobian determinant inside the mask {jac[mask[2:-2, 2:-2, 2:-2]].min():.2f}")
    assert int((jac[mask[2:-2, 2:-2, 2:-2]] <= 0).sum()) == 0
    crop = deform.mask_crop(mask, 8)
    inside = np.zeros(mask.shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(crop.box_lo, crop.box_hi))] = True
    assert (~inside).any() and np.abs(disp[~inside]).max() == 0
    assert np.abs(disp[inside]).max() > 1


def test_identical_images_give_exactly_zero():
    moving = texture(40, 3)
    mask = box_mask(40, 12, 28)
    disp = deform.discrete_field(moving, moving, mask, spacing_mm=2.0)
    assert disp.shape == (40, 40, 40, 3) and np.abs(disp).max() == 0


@pytest.mark.parametrize("n,spacing,shift", [(40, 2.0, (3.0, -2.0, 1.0)), (64, 1.0, (6.0, -4.0, 3.0))])
def test_constant_translation_is_recovered(n, spacing, shift):
    """Integer shifts at the level (2 mm voxels; 1 mm voxels pooled by 2, shift 3 -> 1.5 level voxels)."""
    moving = texture(n, 4)
    truth = np.broadcast_to(np.asarray(shift, np.float32), (n,) * 3 + (3,)).copy()
    fixed = 1 - fields.warp(moving, truth)                                    # inverted contrast
    mask = box_mask(n, n // 4, n - n // 4)
    disp = deform.discrete_field(fixed, moving, mask, spacing_mm=spacing)
    err = np.linalg.norm(disp - truth, axis=-1)
    print(f"\n{n}^3 at {spacing} mm, shift {shift} vox: EPE identity {np.linalg.norm(shift):.2f} vox -> "
          f"mean {err[mask].mean():.3f} vox, median {np.median(err[mask]):.3f} vox")
    assert err[mask].mean() < 1.0




@pytest.mark.xfail(strict=True, reason="open (issue 18): on the simulator's raw iUS the SSC cost volume is too noisy: "
                   "EPE 4.0 mm against a 3.8 mm mean push (identity), and 4.1 mm of spurious displacement where "
                   "nothing moved; a longer coupling schedule gave 3.1 / 2.5 mm, SSC dilation 2 worse (4.8 / 4.5)")
def test_push_on_a_simulated_case_is_recovered():
    """An 8 mm push on a simulated MR-iUS case (128^3 at 1 mm: the simulator's speckle, fan and contrasts) is
    recovered to under a third of its size. The MR is moved so that exactly the push is left to find:
    ``moving(q) = t1(q + h(q))`` with ``h = compose(inverse(push), truth)``, hence ``moving(p + push(p)) =
    t1(p + truth(p))``, what the iUS shows at ``p``."""
    from brainshift.synth import simulate_case

    case = simulate_case(5, shape=128, spacing=1.0)
    mask = case.fov_mask
    grid = np.indices(mask.shape).astype(np.float32)
    c = np.argwhere(mask).mean(0)
    bump = 8.0 * np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / (2 * 12.0 ** 2))   # 8 mm peak, sigma 12 mm
    push = (bump[..., None] * np.array([0.6, 0.8, 0.0], np.float32)).astype(np.float32)
    inverse = -push
    for _ in range(30):                                      # fixed point: inverse(q) = -push(q + inverse(q))
        inverse = inverse - fields.compose(inverse, push)
    assert np.abs(fields.compose(inverse, push)).max() < 1e-3
    moving = fields.warp(case.t1, fields.compose(inverse, case.truth))
    disp = deform.discrete_field(case.us, moving, mask, spacing_mm=1.0)
    sel = mask & (np.linalg.norm(push, axis=-1) > 2.0)
    size = float(np.linalg.norm(push, axis=-1)[sel].mean())
    after = epe_mm(disp, push, sel, 1.0)
    print(f"\nsimulated case: mean |push| {size:.2f} mm, EPE identity {size:.2f} -> discrete {after:.2f} mm")
    assert after < size / 3
