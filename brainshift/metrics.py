"""Accuracy and plausibility of a displacement field, computed exactly as the ReMIND2Reg evaluation does.

* TRE (mm): each channel of the voxel pull field is sampled at the fixed landmarks with cubic-spline
  interpolation (``scipy.ndimage.map_coordinates``, order 3, its defaults otherwise), the warped
  landmark is ``fixed_lm + sampled``, and ``TRE = ||(warped - moving_lm) * moving_spacing||``.
* SDlogJ: the Jacobian determinant ``J`` of ``p -> p + disp(p)`` by central differences
  (``scipy.ndimage.correlate`` with [-0.5, 0, 0.5], zero padding), cropped to the interior
  ``[2:-2]^3``; official value = std of ``log(clip(J + 3, 1e-9, 1e9))`` (the +3 is the official
  quirk). Also reported: the plain std of ``log J`` over voxels with ``J > 0``, and the number of
  folded voxels ``J <= 0`` (the official fold count is taken after the +3 and clip, so it is 0).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from scipy.ndimage import correlate, map_coordinates

from .io import Case, InputError, discover_cases, load_landmarks, load_volume
from .fields import read_field


def tre(disp: np.ndarray, fixed_lms: np.ndarray, moving_lms: np.ndarray, moving_spacing) -> np.ndarray:
    """Per-landmark target registration error in mm (official formula); landmarks in voxels."""
    fixed_lms = np.asarray(fixed_lms, dtype=np.float64)
    sampled = np.stack([map_coordinates(disp[..., c], fixed_lms.T, order=3) for c in range(3)], axis=1)
    warped = fixed_lms + sampled
    return np.linalg.norm((warped - np.asarray(moving_lms)) * np.asarray(moving_spacing, dtype=np.float64), axis=1)


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``p -> p + disp(p)`` on the interior ``[2:-2]^3`` (official stencil)."""
    d = np.asarray(disp, dtype=np.float64)
    kernel = np.array([-0.5, 0.0, 0.5])
    # grad[a][c] = d disp_c / d x_a
    grad = [[correlate(d[..., c], kernel.reshape([3 if ax == a else 1 for ax in range(3)]), mode="constant", cval=0.0)
             [2:-2, 2:-2, 2:-2] for c in range(3)] for a in range(3)]
    j = [[grad[a][c] + (1.0 if a == c else 0.0) for c in range(3)] for a in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def jacobian_stats(disp: np.ndarray) -> dict[str, float]:
    """``sdlogj`` (official, +3 quirk), ``sdlogj_plain`` (std log J over J > 0) and ``folds`` (J <= 0)."""
    jac = jacobian_determinant(disp)
    positive = jac[jac > 0]
    return {
        "sdlogj": float(np.log(np.clip(jac + 3.0, 1e-9, 1e9)).std()),
        "sdlogj_plain": float(np.log(positive).std()) if positive.size else float("nan"),
        "folds": int((jac <= 0).sum()),
    }


def evaluate_case(case: Case, disp: np.ndarray) -> dict:
    """TRE (if the case has landmarks) and Jacobian statistics of one field."""
    out: dict = dict(jacobian_stats(disp))
    if case.fixed_landmarks is None or case.moving_landmarks is None:
        return out
    fixed_lms = load_landmarks(case.fixed_landmarks)
    moving_lms = load_landmarks(case.moving_landmarks)
    if fixed_lms.shape != moving_lms.shape:
        raise InputError(f"{case.moving_landmarks}: {len(moving_lms)} landmarks, but the fixed file "
                         f"{case.fixed_landmarks.name} has {len(fixed_lms)}")
    spacing = load_volume(case.moving).spacing
    errors = tre(disp, fixed_lms, moving_lms, spacing)
    out.update(tre=errors.tolist(), tre_mean=float(errors.mean()), tre_max=float(errors.max()))
    return out


def official_metrics_json(results: dict[str, dict], name: str = "ReMIND2Reg") -> dict:
    """Shape of the official ``metrics.json``: per-case {mean, detailed} and aggregates {mean, std, 30}."""
    cases = OrderedDict()
    for pair, r in results.items():
        c = OrderedDict()
        c["LogJacDetStd"] = {"mean": r["sdlogj"], "detailed": r["sdlogj"]}
        c["num_foldings"] = {"mean": 0.0, "detailed": 0.0}  # official count is after +3 and clip: always 0
        if "tre" in r:
            c["TRE_lm"] = {"mean": r["tre_mean"], "detailed": r["tre"]}
        c["num_folds_plain"] = {"mean": float(r["folds"]), "detailed": float(r["folds"])}
        c["LogJacDetStd_plain"] = {"mean": r["sdlogj_plain"], "detailed": r["sdlogj_plain"]}
        cases[pair] = c
    aggregates = OrderedDict()
    if cases:
        for metric in next(iter(cases.values())):
            vals = np.array([c[metric]["mean"] for c in cases.values() if metric in c], dtype=np.float64)
            aggregates[metric] = {"mean": float(vals.mean()), "std": float(vals.std()), "30": float(np.quantile(vals, 0.3))}
    return OrderedDict(name=name, aggregates=aggregates, cases=cases, eval_version="2.0")


def evaluate_folder(data_dir: str | os.PathLike, field_dir: str | os.PathLike, modality: str = "both",
                    progress: bool = True) -> tuple[dict[str, dict], list[str]]:
    """Score every field in ``field_dir`` against the cases (and landmarks) of ``data_dir``.

    Returns (per-pair results keyed 'XXXX_0000<--XXXX_000M', problems). A missing or unreadable
    field, or bad landmarks, is a problem for that pair; the other pairs are still scored.
    """
    from tqdm import tqdm

    found = discover_cases(data_dir, modality)
    results: dict[str, dict] = {}
    problems = list(found.problems)
    for case in tqdm(found.cases, desc="evaluate", unit="pair", disable=not progress):
        try:
            disp = read_field(Path(field_dir) / case.output_name)
            results[case.pair_name] = evaluate_case(case, disp)
        except InputError as exc:
            problems.append(str(exc))
    return results, problems


def write_metrics_json(path: str | os.PathLike, results: dict[str, dict]) -> Path:
    """Write :func:`official_metrics_json` atomically."""
    from .io import _atomic_write

    payload = json.dumps(official_metrics_json(results), indent=4, allow_nan=True)
    return _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(payload))
