"""SSC descriptor: shape and range, intensity invariance, growth with misalignment, CPU/CUDA agreement."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, shift

from brainshift.ssc import PAIRS, auto_factor, descriptor_mse, downsample, ssc_descriptor, ssc_mse


def blobs(n: int = 48, seed: int = 0) -> np.ndarray:
    """Smooth random structure, positive, like a small MR."""
    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.standard_normal((n, n, n)).astype(np.float32), 2.5)
    return ((v - v.min()) / (v.max() - v.min()) * 100 + 10).astype(np.float32)


def inner_mask(n: int = 48, margin: int = 10) -> np.ndarray:
    m = np.zeros((n, n, n), dtype=bool)
    m[margin:-margin, margin:-margin, margin:-margin] = True
    return m


def test_pairs_are_the_twelve_sqrt2_pairs_of_the_six_neighbourhood():
    assert len(PAIRS) == 12 and len(set(PAIRS)) == 12
    for a, b in PAIRS:
        assert sum(abs(x) for x in a) == 1 and sum(abs(x) for x in b) == 1
        assert sum((x - y) ** 2 for x, y in zip(a, b)) == 2


def test_descriptor_shape_range_dtype_and_numpy_torch_agree():
    v = blobs(32)
    d = ssc_descriptor(v)
    assert d.shape == (12, 32, 32, 32) and d.dtype == torch.float32
    assert float(d.min()) > 0 and float(d.max()) <= 1.0 + 1e-6
    assert torch.equal(d, ssc_descriptor(torch.from_numpy(v)))
    # at every voxel the smallest distance was subtracted: one channel is exactly exp(0) = 1
    assert torch.allclose(d.max(dim=0).values, torch.ones(32, 32, 32))
    # constant image: no structure, all ones, no NaN
    assert torch.equal(ssc_descriptor(np.full((8, 8, 8), 3.0)), torch.ones(12, 8, 8, 8))
    # Gaussian patch weighting runs and differs from the box
    g = ssc_descriptor(v, radius=2, kernel="gauss")
    assert torch.isfinite(g).all() and not torch.allclose(g, ssc_descriptor(v, radius=2))


def test_exactly_invariant_to_affine_intensity_maps_including_inversion():
    """D and V both scale by s**2 under I -> s*I + c, so the descriptor is unchanged (s < 0: inverted)."""
    v, mask = blobs(), inner_mask()
    for s, c in ((3.0, 50.0), (-1.0, 0.0), (-0.25, 500.0)):
        assert ssc_mse(v, s * v + c, mask) < 1e-6


def test_nearly_invariant_to_a_nonlinear_monotone_map_compared_with_a_shift():
    """A smooth monotone (gamma) remap is only locally affine: small, far below a 1-voxel shift."""
    v, mask = blobs(), inner_mask()
    remapped = 100 * (v / v.max()) ** 2.0  # monotone increasing on v > 0
    inverted = v.max() + 10 - remapped     # monotone decreasing
    one_voxel = ssc_mse(v, shift(v, (1, 0, 0), order=1, mode="nearest"), mask)
    assert ssc_mse(v, remapped, mask) < 0.1 * one_voxel
    assert ssc_mse(v, inverted, mask) < 0.1 * one_voxel


def test_grows_with_misalignment():
    v, mask = blobs(), inner_mask()
    inverted = v.max() - v  # a different "modality": compare across the inversion
    values = [ssc_mse(v, shift(inverted, (s, 0.6 * s, 0), order=1, mode="nearest"), mask) for s in (0, 2, 4)]
    assert values[0] < 1e-6
    assert values[0] < values[1] < values[2]


def test_mask_factor_and_shape_checks():
    v = blobs()
    assert auto_factor((256, 256, 256)) == 2 and auto_factor((64, 64, 64)) == 1 and auto_factor((300, 10, 10)) == 4
    assert downsample(v, 2).shape == (24, 24, 24)
    w = shift(v, (2, 0, 0), order=1, mode="nearest")
    # pooled comparison runs and still sees the shift
    assert ssc_mse(v, w, inner_mask(), factor=2) > 0.0
    # the mask restricts the mean: a difference only outside the mask does not count
    far = v.copy()
    far[:5] = 0  # 5 voxels + dilation 2 + patch radius 1 stays clear of the mask (from voxel 10)
    assert ssc_mse(v, far, inner_mask()) < 1e-6 < ssc_mse(v, far)
    with pytest.raises(ValueError):
        ssc_mse(v, v[:24], None)
    with pytest.raises(ValueError):
        descriptor_mse(ssc_descriptor(v), ssc_descriptor(v), np.zeros(v.shape, bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    v = blobs(48)
    cpu = ssc_descriptor(v)
    gpu = ssc_descriptor(torch.from_numpy(v).cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)
