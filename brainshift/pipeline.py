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

METHODS = ("identity", "niftyreg-rigid")


@dataclass
class Result:
    """A registration: the pull field (X,Y,Z,3, voxels, fixed grid) and a per-stage record."""

    disp: np.ndarray
    record: dict = field(default_factory=dict)


def register(fixed: Volume, moving: Volume, method: str = "niftyreg-rigid",
             threads: int | None = None) -> Result:
    """Register the moving MR to the fixed iUS with ``method``; see :data:`METHODS`.

    * ``identity``: the zero field (the images' own alignment).
    * ``niftyreg-rigid``: the official ReMIND2Reg NiftyReg baseline, rigid (reg_aladin).
    """
    t0 = time.perf_counter()
    record: dict = {"method": method, "stages": {}}
    if method == "identity":
        disp = fields.identity_field(fixed.shape)
    elif method == "niftyreg-rigid":
        from .affine import official_rigid_baseline

        matrix = official_rigid_baseline(fixed, moving, threads=threads)
        disp = fields.matrix_to_field(matrix, fixed.affine, moving.affine, fixed.shape)
        record["stages"]["rigid"] = {"matrix": matrix.tolist(), "seconds": time.perf_counter() - t0}
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    record["seconds"] = time.perf_counter() - t0
    return Result(disp, record)


def check_inputs(fixed: Volume, moving: Volume, case: Case) -> None:
    """Reject inputs no method can register, naming the file."""
    if not (fixed.data != 0).any():
        raise InputError(f"{case.fixed}: fixed image is all zero (no ultrasound field of view)")
    if not (moving.data != 0).any():
        raise InputError(f"{case.moving}: moving image is all zero")


def run_case(case: Case, out_dir: str | os.PathLike, method: str = "niftyreg-rigid",
             threads: int | None = None) -> dict:
    """Load one pair, register it, write ``out_dir/case.output_name`` atomically; return the record."""
    fixed = load_volume(case.fixed)
    moving = load_volume(case.moving)
    check_inputs(fixed, moving, case)
    result = register(fixed, moving, method=method, threads=threads)
    path = fields.write_field(Path(out_dir) / case.output_name, result.disp, moving.affine)
    return {**result.record, "case": case.pair_name, "field": str(path)}


def check_writable(out_dir: str | os.PathLike) -> None:
    """Create ``out_dir`` if needed and prove a file can be written there, or raise InputError."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise InputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from exc


def run_cases(cases: list[Case], out_dir: str | os.PathLike, method: str = "niftyreg-rigid",
              threads: int | None = None, progress: bool = True) -> tuple[list[dict], list[str]]:
    """Run every case; one failing case never stops the others. Returns (records, error lines)."""
    from tqdm import tqdm

    check_writable(out_dir)
    records, errors = [], []
    for case in tqdm(cases, desc=method, unit="pair", disable=not progress):
        try:
            records.append(run_case(case, out_dir, method=method, threads=threads))
        except (InputError, NiftyRegError, ValueError) as exc:
            errors.append(f"{case.pair_name}: {exc}")
    return records, errors
