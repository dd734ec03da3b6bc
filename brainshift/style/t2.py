"""T2 -> T1-like contrast by a monotone-decreasing intensity remapping (no learning).

In T2 CSF is brightest and white matter darkest; in (ce)T1 the order is reversed (WM bright,
grey matter intermediate, CSF dark). Inverting the T2 intensities inside the head therefore gives
a T1-like ordering of the tissues, after which T1 and T2 cases share the rest of the pipeline
(as the paper does). Two variants:

* default: robust linear inversion, ``clip((p99 - t2) / (p99 - p1), 0, 1)`` with the percentiles
  taken inside ``mask``;
* ``reference`` given (ascending T1 intensity quantiles): histogram matching with reversed ranks,
  ``out = Q_ref(1 - F_t2(t2))`` (``F_t2`` the empirical CDF inside ``mask``), so the output has the
  reference T1 histogram.

Both are monotone non-increasing in the T2 intensity inside ``mask``; outside it the output is 0.
The default ``mask`` is the tissue: ``t2 > 0.1 * p99(t2[t2 > 0])``. Background, air and bone are
dark in T2 and in T1 alike, so they must not be inverted: they stay 0 (dark, as in a T1).
"""
from __future__ import annotations

import numpy as np


def tissue_mask(t2: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Voxels brighter than ``fraction`` x the 99th percentile of the non-zero T2 voxels."""
    t2 = np.asarray(t2, dtype=np.float32)
    if not (t2 > 0).any():
        return np.zeros(t2.shape, dtype=bool)
    return t2 > fraction * float(np.percentile(t2[t2 > 0], 99))


def t2_to_t1_like(t2: np.ndarray, mask: np.ndarray | None = None, reference: np.ndarray | None = None,
                  low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """T1-like image (float32, same shape, values in ``[0, 1]`` for the default variant) from a T2.

    ``mask`` (bool, same shape) is the tissue to invert; default :func:`tissue_mask`. Outside it the
    output is exactly 0 (so zeros stay zeros). ``low``/``high`` are the percentiles (%) of the linear variant.
    """
    t2 = np.asarray(t2, dtype=np.float32)
    mask = tissue_mask(t2) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != t2.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {t2.shape}")
    mask = mask & (t2 > 0)
    out = np.zeros(t2.shape, dtype=np.float32)
    if not mask.any():
        return out
    vals = t2[mask]
    if reference is None:
        lo, hi = np.percentile(vals, [low, high])
        if hi <= lo:
            return out
        out[mask] = np.clip((hi - vals) / (hi - lo), 0.0, 1.0)
        return out
    ref = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    srt = np.sort(vals)
    cdf = (np.searchsorted(srt, vals, side="right") - 0.5) / len(srt)   # in (0, 1)
    q = np.linspace(0.0, 1.0, len(ref))
    out[mask] = np.interp(1.0 - cdf, q, ref).astype(np.float32)
    return out


def quantiles(image: np.ndarray, mask: np.ndarray | None = None, n: int = 101) -> np.ndarray:
    """``n`` ascending intensity quantiles inside ``mask`` (default ``image > 0``): a ``reference``
    for :func:`t2_to_t1_like`."""
    image = np.asarray(image, dtype=np.float32)
    mask = image > 0 if mask is None else np.asarray(mask, dtype=bool)
    return np.percentile(image[mask], np.linspace(0, 100, n)).astype(np.float32)
