"""Orchestration: one function registers one pair, one function runs a folder of cases.

The CLI (``brainshift run``), the container entry point (``process.py``), the demo and the tests
all go through :func:`register` / :func:`run_case` / :func:`run_cases`.

Every method returns a voxel pull field on the fixed grid (see :mod:`brainshift.fields`).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import fields
from .io import Case, InputError, Volume, load_volume
from .niftyreg import NiftyRegError

METHODS = ("brainshift", "niftyreg-rigid", "identity")
STAGES = ("affine",)


@dataclass
class Result:
    """A registration: the pull field (X,Y,Z,3, voxels, fixed grid) and a per-stage record."""

    disp: np.ndarray
    record: dict = field(default_factory=dict)   # JSON-ready: times, metrics, decisions per stage
    stage_outputs: dict = field(default_factory=dict)  # in-memory stage results (e.g. AffineResult) for QC


def register(fixed: Volume, moving: Volume, method: str = "brainshift", stages: tuple[str, ...] = STAGES,
             threads: int | None = None, fixed_mask: np.ndarray | None = None) -> Result:
    """Register the moving MR to the fixed iUS; return the pull field and a per-stage record.

    * ``identity``: the zero field (the images' own alignment).
    * ``niftyreg-rigid``: the official ReMIND2Reg NiftyReg baseline, rigid (reg_aladin).
    * ``brainshift``: this project's stages, in order, each switchable through ``stages``:
      ``affine`` (block matching with a per-case LTS share chosen by SSC-MSE, guarded).
    ``fixed_mask``: the iUS field of view on the fixed grid (default: ``fixed > 0``).
    """
    t0 = time.perf_counter()
    record: dict = {"method": method, "stages": {}}
    outputs: dict = {}
    if method == "identity":
        disp = fields.identity_field(fixed.shape)
    elif method == "niftyreg-rigid":
        from .affine import official_rigid_baseline

        matrix = official_rigid_baseline(fixed, moving, threads=threads)
        disp = fields.matrix_to_field(matrix, fixed.affine, moving.affine, fixed.shape)
        record["stages"]["rigid"] = {"matrix": matrix.tolist(), "seconds": time.perf_counter() - t0}
    elif method == "brainshift":
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
        mask = fixed.data > 0 if fixed_mask is None else fixed_mask.astype(bool)
        matrix = np.eye(4)
        if "affine" in stages:
            from .affine import affine_stage

            res = affine_stage(fixed, moving, mask, threads=threads)
            matrix = res.matrix
            record["stages"]["affine"] = {
                "matrix": matrix.tolist(), "share": res.share, "kept": res.kept, "ssc_identity": res.ssc_identity,
                "ssc_final": res.ssc_final, "curve": res.curve, "seconds": res.seconds,
                "aladin_seconds": res.aladin_seconds, "notes": res.notes}
            outputs["affine"] = res
        disp = fields.matrix_to_field(matrix, fixed.affine, moving.affine, fixed.shape)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    record["seconds"] = time.perf_counter() - t0
    return Result(disp, record, outputs)


def check_inputs(fixed: Volume, moving: Volume, case: Case) -> None:
    """Reject inputs no method can register, naming the file."""
    if not (fixed.data != 0).any():
        raise InputError(f"{case.fixed}: fixed image is all zero (no ultrasound field of view)")
    if not (moving.data != 0).any():
        raise InputError(f"{case.moving}: moving image is all zero")


def run_case(case: Case, out_dir: str | os.PathLike, method: str = "brainshift", stages: tuple[str, ...] = STAGES,
             threads: int | None = None, qc: bool = False) -> dict:
    """Load one pair, register it, write ``out_dir/case.output_name`` atomically; return the record.

    With ``qc``, per-stage diagnostics go to ``out_dir/qc/`` (the SSC-MSE curve of the affine stage
    as JSON + PNG, and the case record as JSON).
    """
    fixed = load_volume(case.fixed)
    moving = load_volume(case.moving)
    fixed_mask = load_volume(case.fixed_mask).data > 0 if case.fixed_mask is not None else None
    check_inputs(fixed, moving, case)
    result = register(fixed, moving, method=method, stages=stages, threads=threads, fixed_mask=fixed_mask)
    path = fields.write_field(Path(out_dir) / case.output_name, result.disp, moving.affine)
    record = {**result.record, "case": case.pair_name, "field": str(path)}
    if qc:
        stem = Path(case.output_name).name.split(".")[0]
        qc_dir = Path(out_dir) / "qc"
        if "affine" in result.stage_outputs:
            from .affine import save_curve

            save_curve(result.stage_outputs["affine"], qc_dir / f"{stem}_affine_curve.json", qc_dir / f"{stem}_affine_curve.png")
        _write_json(qc_dir / f"{stem}_record.json", record)
    return record


def _write_json(path: Path, payload: dict) -> None:
    import json

    from .io import _atomic_write

    text = json.dumps(payload, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(out_dir: str | os.PathLike) -> None:
    """Create ``out_dir`` if needed and prove a file can be written there, or raise InputError."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise InputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from exc


def run_cases(cases: list[Case], out_dir: str | os.PathLike, method: str = "brainshift",
              stages: tuple[str, ...] = STAGES, threads: int | None = None, qc: bool = False,
              progress: bool = True) -> tuple[list[dict], list[str]]:
    """Run every case; one failing case never stops the others. Returns (records, error lines)."""
    from tqdm import tqdm

    check_writable(out_dir)
    records, errors = [], []
    for case in tqdm(cases, desc=method, unit="pair", disable=not progress):
        try:
            records.append(run_case(case, out_dir, method=method, stages=stages, threads=threads, qc=qc))
        except (InputError, NiftyRegError, ValueError) as exc:
            errors.append(f"{case.pair_name}: {exc}")
    return records, errors
