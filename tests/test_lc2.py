"""LC2 (Wein et al. 2013): the properties the coarse stage relies on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainshift.lc2 import lc2, lc2_batch


@pytest.fixture(scope="module")
def mr():
    rng = np.random.default_rng(0)
    return gaussian_filter(rng.standard_normal((40, 40, 40)), 2.0).astype(np.float32)


def test_affine_intensity_map_of_itself_scores_one(mr):
    assert lc2(3.0 * mr + 5.0, mr, factor=1) >= 0.99
    assert lc2(-2.0 * mr + 1.0, mr, factor=1) >= 0.99        # inverted contrast too


def test_noise_scores_about_zero(mr):
    rng = np.random.default_rng(1)
    assert lc2(rng.standard_normal(mr.shape).astype(np.float32), mr, factor=1) < 0.05


def test_gradient_term_explains_interface_echoes(mr):
    """An iUS made of the MR's edges only (no intensity relation) is still explained well."""
    g = np.sqrt(sum(d ** 2 for d in np.gradient(mr)))
    assert lc2(g, mr, factor=1) > 0.8


def test_misalignment_lowers_lc2_and_mask_restricts(mr):
    us = 2.0 * mr + 0.5 * np.sqrt(sum(d ** 2 for d in np.gradient(mr)))
    aligned = lc2(us, mr, factor=1)
    assert lc2(us, np.roll(mr, 3, axis=0), factor=1) < aligned - 0.2
    mask = np.zeros(mr.shape, bool)
    mask[10:30, 10:30, 10:30] = True
    assert lc2(us, mr, mask, factor=1) == pytest.approx(aligned, abs=0.05)


def test_batch_equals_one_by_one(mr):
    us = 2.0 * mr + np.abs(mr)
    mrs = np.stack([mr, np.roll(mr, 2, axis=1), np.roll(mr, -3, axis=2)])
    mask = np.ones(mr.shape, bool)
    got = lc2_batch(us, torch.from_numpy(mrs), torch.from_numpy(mask)).numpy()
    want = [lc2(us, m, mask, factor=1) for m in mrs]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
