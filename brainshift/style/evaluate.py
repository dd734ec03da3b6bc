"""Evaluation of the style transfer on simulated cases (where the true brain shift is known).

For each case: the T1 is pulled onto the iUS grid with the true field (``fields.warp``), then,
inside the iUS field of view (``us > 0``), the global NCC of synthetic T1 vs aligned T1 is compared
with that of the raw iUS vs aligned T1 (the iUS intensities relate to T1 non-monotonically, so
the raw number is low). For T2: NCC(t2_to_t1_like(T2), T1) vs NCC(T2, T1) inside the head, on the
MR grid (T1 and T2 share it).
"""
from __future__ import annotations

import time

import numpy as np

from ..fields import warp
from .infer import StyleModel, load_style_model, synthesize_t1
from .t2 import t2_to_t1_like


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Global normalised cross-correlation of ``a`` and ``b`` over ``mask``."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum() + 1e-12))


def evaluate_case(case, model: StyleModel, device: str | None = None) -> dict[str, float]:
    """Numbers for one :class:`brainshift.synth.SimCase`-like object (``us``, ``t1``, ``t2``, ``truth``)."""
    fov = case.us > 0
    aligned = warp(case.t1, case.truth)
    t0 = time.perf_counter()
    synth = synthesize_t1(case.us, model, device)
    seconds = time.perf_counter() - t0
    head = case.t2 > 0
    return {"ncc_synth_t1": ncc(synth, aligned, fov), "ncc_us_t1": ncc(case.us, aligned, fov),
            "ncc_t2like_t1": ncc(t2_to_t1_like(case.t2), case.t1, head), "ncc_t2_t1": ncc(case.t2, case.t1, head),
            "inference_s": seconds}


def evaluate_seeds(seeds=range(5), model: StyleModel | None = None, shape: int = 96, spacing: float = 1.5,
                   device: str | None = None) -> dict[str, dict[str, float]]:
    """:func:`evaluate_case` for ``brainshift.synth.simulate_case(seed, shape, spacing)``, per seed."""
    from ..synth import simulate_case

    model = model or load_style_model(device=device)
    return {str(s): evaluate_case(simulate_case(s, shape, spacing), model, device) for s in seeds}
