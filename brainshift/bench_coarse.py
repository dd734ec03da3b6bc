"""Coarse-stage benchmark (``brainshift bench-coarse``): every candidate's TRE, what each criterion picks.

For each case with landmarks, :func:`brainshift.affine.affine_stage` runs with the shipped settings on
the raw iUS, and every candidate it made (identity, rigid, affine, the plain rigid baseline; from the
identity and from the global start) is scored with the landmarks. Then, for every criterion in
:data:`brainshift.affine.CRITERIA`, :func:`brainshift.affine.select` (the same rule the stage uses)
picks a candidate, and its **regret** is the TRE of that pick minus the best valid candidate's TRE.
The organisers' rigid NiftyReg baseline (``niftyreg-rigid``: full resolution, two levels) runs beside
it, as the stage's reference.

TRE of a matrix: the world matrix (fixed -> moving, RAS mm) taken to voxels and applied to the fixed
landmarks, error scaled by the moving spacing: the official formula, exactly (a spline of a linear
field is that linear field).

Outputs: ``OUT/coarse.md`` (tables) and ``OUT/coarse.json`` (everything), written atomically.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .affine import CRITERIA, DEFAULT_CRITERION, affine_stage, official_rigid_baseline, select
from .fields import voxel_matrix
from .io import InputError, _atomic_write, discover_cases, json_ready, load_landmarks, load_volume, write_json


def matrix_tre(matrix: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray, fixed_lms: np.ndarray,
               moving_lms: np.ndarray, moving_spacing) -> float:
    """Mean TRE (mm) of a world matrix (fixed -> moving, RAS mm) at voxel landmarks."""
    v = voxel_matrix(matrix, fixed_affine, moving_affine)
    warped = np.asarray(fixed_lms, np.float64) @ v[:3, :3].T + v[:3, 3]
    return float(np.linalg.norm((warped - moving_lms) * np.asarray(moving_spacing, np.float64), axis=1).mean())


def run_coarse_bench(cases_dir: str | os.PathLike, out_dir: str | os.PathLike, modality: str = "t1",
                     threads: int | None = None, progress: bool = True) -> dict:
    """Run the coarse stage and the rigid baseline on every case of ``cases_dir``; write and return the tables."""
    from tqdm import tqdm

    cases = [c for c in discover_cases(cases_dir, modality).cases if c.fixed_landmarks and c.moving_landmarks]
    if not cases:
        raise InputError(f"{cases_dir}: no case with landmarks")
    rows = []
    for case in tqdm(cases, desc="coarse stage", unit="pair", disable=not progress):
        fixed, moving = load_volume(case.fixed), load_volume(case.moving)
        fl, ml = load_landmarks(case.fixed_landmarks), load_landmarks(case.moving_landmarks)

        def tre(m):
            return matrix_tre(m, fixed.affine, moving.affine, fl, ml, moving.spacing)

        t = time.perf_counter()
        res = affine_stage(fixed, moving, threads=threads, all_criteria=True)
        stage_s = time.perf_counter() - t
        t = time.perf_counter()
        rigid = official_rigid_baseline(fixed, moving, threads=threads)
        rigid_s = time.perf_counter() - t
        cands = [{**c.as_dict(), "tre": tre(c.matrix) if c.rejected is None else None} for c in res.candidates]
        best = min(c["tre"] for c in cands if c["tre"] is not None)
        picks = {}
        for crit in CRITERIA:
            chosen = select(res.candidates, crit)
            value = tre(chosen.matrix)
            picks[crit] = {"name": chosen.name, "tre": value, "regret": value - best}
        rows.append({"case": case.pair_name, "tre_identity": tre(np.eye(4)), "tre_niftyreg_rigid": tre(rigid),
                     "tre_stage": tre(res.matrix), "kept": res.kept, "kept_name": next(
                         c.name for c in res.candidates if c.matrix is res.matrix), "tre_best": best,
                     "picks": picks, "candidates": cands, "stage_seconds": stage_s, "rigid_seconds": rigid_s,
                     "notes": res.notes})
    payload = json_ready({"cases_dir": str(cases_dir), "criterion": DEFAULT_CRITERION, "threads": threads, "rows": rows,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "coarse.json", payload, indent=1)
    _atomic_write(out / "coarse.md", lambda tmp: Path(tmp).write_text(markdown(payload)))
    return payload


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else float("nan")


def markdown(payload: dict) -> str:
    """The tables of a coarse bench: per case, the criteria's regret, every candidate."""
    rows, crits = payload["rows"], list(CRITERIA)
    lines = [f"# Coarse stage: candidates and selection ({len(rows)} pairs from `{payload['cases_dir']}`)", "",
             f"Written by `brainshift bench-coarse` on {payload['created']}. TRE in mm (official formula, "
             "mean over the pair's landmarks). *stage*: what `affine_stage` kept (criterion "
             f"`{payload['criterion']}`); *best*: the best valid candidate; *regret*: TRE of a criterion's pick "
             "minus *best*. Times: wall seconds on this machine.", "",
             "| pair | identity | niftyreg-rigid | stage | kept | best | "
             + " | ".join(f"{c} pick | {c} regret" for c in crits) + " | stage s | rigid s |",
             "|---|" + "---:|" * (5 + 2 * len(crits) + 2)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['tre_identity']:.2f} | {r['tre_niftyreg_rigid']:.2f} | {r['tre_stage']:.2f} | "
                     f"{r['kept_name']} | {r['tre_best']:.2f} | "
                     + " | ".join(f"{r['picks'][c]['name']} | {r['picks'][c]['regret']:.3f}" for c in crits)
                     + f" | {r['stage_seconds']:.1f} | {r['rigid_seconds']:.1f} |")
    better = sum(r["tre_stage"] < r["tre_niftyreg_rigid"] for r in rows)
    lines.append(f"| **mean** | {_mean(r['tre_identity'] for r in rows):.2f} | "
                 f"{_mean(r['tre_niftyreg_rigid'] for r in rows):.2f} | {_mean(r['tre_stage'] for r in rows):.2f} | "
                 f"better than niftyreg-rigid on {better}/{len(rows)} | {_mean(r['tre_best'] for r in rows):.2f} | "
                 + " | ".join(f" | {_mean(r['picks'][c]['regret'] for r in rows):.3f}" for c in crits)
                 + f" | {_mean(r['stage_seconds'] for r in rows):.1f} | {_mean(r['rigid_seconds'] for r in rows):.1f} |")
    lines += ["", "## Every candidate (TRE mm; criteria against the raw iUS; rejected: why)", ""]
    for r in rows:
        lines += [f"### {r['case']}", "", "| candidate | TRE | " + " | ".join(crits) + " | reg_aladin s | rejected |",
                  "|---|---:|" + "---:|" * len(crits) + "---:|---|"]
        for c in r["candidates"]:
            tre = "-" if c["tre"] is None else f"{c['tre']:.2f}"
            sc = " | ".join("-" if c["scores"].get(k) is None else f"{c['scores'][k]:.4f}" for k in crits)
            lines.append(f"| {c['name']} | {tre} | {sc} | {c['seconds']:.1f} | {c['rejected'] or ''} |")
        lines += ["", "notes: " + "; ".join(r["notes"]), ""]
    return "\n".join(lines) + "\n"
