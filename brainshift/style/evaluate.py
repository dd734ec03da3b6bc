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


def evaluate_dataset(cases_dir: str, threads: int | None = None, progress: bool = True,
                     affine: bool = True) -> dict[str, dict]:
    """Issue-6 acceptance numbers on a simulated dataset folder (``brainshift simulate`` output, ceT1 pairs).

    Per case: NCC and SSC-MSE inside the iUS field of view of (synthetic T1 | raw iUS) against the
    T1 pulled onto the iUS grid with the TRUE field ``truth/<field>`` (lower SSC-MSE / higher NCC =
    closer to the T1's appearance); the affine stage's TRE with fixed = raw iUS, with fixed =
    synthetic T1, and the pipeline's pick between the two (lower SSC-MSE of the resampled MR against
    the raw iUS); style inference and affine times (s). ``affine=False``: appearance numbers only
    (``brainshift bench`` records the affine candidates' TRE of the full pipeline).
    """
    from tqdm import tqdm

    from .. import fields
    from ..affine import affine_stage, resample
    from ..io import discover_cases, load_volume
    from ..metrics import evaluate_case as tre_of
    from ..ssc import ssc_mse

    model = load_style_model()
    out = {}
    for case in tqdm(discover_cases(cases_dir, "t1").cases, disable=not progress, desc="style eval"):
        fixed, moving = load_volume(case.fixed), load_volume(case.moving)
        fov = fixed.data > 0
        aligned = warp(moving.data, fields.read_field(case.fixed.parent.parent / "truth" / case.output_name))
        t0 = time.perf_counter()
        synth = synthesize_t1(fixed.data, model)
        style_s = time.perf_counter() - t0
        row = {"ncc_synth_t1": ncc(synth, aligned, fov), "ncc_us_t1": ncc(fixed.data, aligned, fov),
               "ssc_synth_t1": ssc_mse(synth, aligned, fov), "ssc_us_t1": ssc_mse(fixed.data, aligned, fov),
               "style_s": style_s}
        out[case.case_id] = row
        if not affine:
            continue
        vs_ius = {}
        for name, img in (("ius", fixed), ("synthetic_t1", fixed.like(synth))):
            t0 = time.perf_counter()
            res = affine_stage(img, moving, fov, threads=threads)
            row[f"affine_s_{name}"] = time.perf_counter() - t0
            row[f"tre_affine_{name}"] = tre_of(case, fields.matrix_to_field(res.matrix, fixed.affine, moving.affine,
                                                                            fixed.shape))["tre_mean"]
            vs_ius[name] = ssc_mse(fixed.data, resample(moving, res.matrix, fixed.affine, fixed.shape), fov)
        pick = min(vs_ius, key=vs_ius.get)
        row.update({"picked": pick, "tre_affine_picked": row[f"tre_affine_{pick}"],
                    "tre_identity": tre_of(case, fields.identity_field(fixed.shape))["tre_mean"]})
    return out


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Style-transfer acceptance numbers (issue 6) on a simulated dataset.")
    ap.add_argument("--cases", required=True, help="brainshift simulate output folder (needs truth/)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--no-affine", action="store_true", help="appearance numbers only (no affine runs)")
    a = ap.parse_args()
    res = evaluate_dataset(a.cases, affine=not a.no_affine)
    keys = list(next(iter(res.values())))
    mean = {k: float(np.mean([r[k] for r in res.values()])) for k in keys if k != "picked"}
    text = json.dumps({"cases": res, "mean": mean}, indent=2)
    print(text)
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(text + "\n")
