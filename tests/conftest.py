"""Shared test helpers: oblique grids, smooth random volumes, random world matrices."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation


def oblique_affine(spacing=(1.2, 0.9, 1.5), degrees=(17.0, -9.0, 23.0), origin=(-40.0, 25.0, 10.0)) -> np.ndarray:
    """Voxel -> RAS mm: a rotated (oblique), anisotropic grid."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def rigid_matrix(degrees, translation_mm, centre_mm) -> np.ndarray:
    """World (RAS mm) rigid matrix rotating by ``degrees`` (xyz Euler) about ``centre_mm``, then translating."""
    m = np.eye(4)
    r = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    m[:3, :3] = r
    m[:3, 3] = np.asarray(centre_mm) - r @ np.asarray(centre_mm) + np.asarray(translation_mm)
    return m


def smooth_volume(shape, seed=0, sigma=3.0) -> np.ndarray:
    """A smooth random volume in [0, 1000], zero near the border (like a head in air)."""
    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    v = (v - v.min()) / (v.max() - v.min()) * 1000
    border = np.zeros(shape, dtype=bool)
    border[3:-3, 3:-3, 3:-3] = True
    return np.where(border, v, 0).astype(np.float32)


def grid_centre_mm(affine: np.ndarray, shape) -> np.ndarray:
    return (affine @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0])[:3]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
