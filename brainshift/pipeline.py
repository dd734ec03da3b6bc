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
from .io import Case, InputError, Volume, load_volume, one_line, write_json
from .niftyreg import NiftyRegError

METHODS = ("brainshift", "niftyreg-rigid", "identity")
STAGES = ("style", "affine", "deform")


@dataclass
class Result:
    """A registration: the pull field (X,Y,Z,3, voxels, fixed grid) and a per-stage record."""

    disp: np.ndarray
    record: dict = field(default_factory=dict)   # JSON-ready: times, metrics, decisions per stage
    stage_outputs: dict = field(default_factory=dict)  # in-memory stage results (e.g. AffineResult) for QC


def register(fixed: Volume, moving: Volume, method: str = "brainshift", stages: tuple[str, ...] = STAGES,
             modality: str = "t1", refine: bool = True, regularisation: float = 0.5,
             threads: int | None = None, fixed_mask: np.ndarray | None = None, large_shift: bool = True,
             network: bool = False) -> Result:
    """Register the moving MR to the fixed iUS; return the pull field and a per-stage record.

    * ``identity``: the zero field (the images' own alignment).
    * ``niftyreg-rigid``: the official ReMIND2Reg NiftyReg baseline, rigid (reg_aladin).
    * ``brainshift``: this project's stages, in order, each switchable through ``stages``:
      ``style`` (iUS -> synthetic T1; a T2 moving image is mapped to a T1-like contrast),
      ``affine`` (the coarse stage: identity, rigid and affine reg_aladin candidates, from the
      identity and from maps fitted to a dense discrete search
      (the fits are candidates too), on the raw iUS and, with ``style``, on the
      synthetic T1; scored by SSC-MSE against the raw iUS; kept: the mean of those that agree, else
      the best with a model-selection margin), ``deform``
      (with ``network``, the trained network inside the iUS field of view, else a zero start; then,
      with ``large_shift``, a discrete search over displacements up to 12 mm for what the network
      left; then instance ``refine``ment on the pair;
      kept only if the guard accepts it: SSC-MSE (by 5% when refined or searched) and LC2 against
      the raw iUS must both improve, the
      discrete search run backward must find the same shift, and the field must be plausible).

    ``modality``: 't1', 't2' or 'mr' (moving contrast). ``fixed_mask``: the iUS field of view on the
    fixed grid (default ``fixed > 0``). ``stage_outputs['fields']`` holds the field after each stage.
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
        disp = _brainshift(fixed, moving, stages, modality, refine, regularisation, threads,
                           fixed.data > 0 if fixed_mask is None else fixed_mask.astype(bool), record, outputs,
                           large_shift, network)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    record["seconds"] = time.perf_counter() - t0
    return Result(disp, record, outputs)


def _brainshift(fixed: Volume, moving: Volume, stages: tuple[str, ...], modality: str, refine: bool,
                regularisation: float, threads: int | None, mask: np.ndarray, record: dict,
                outputs: dict, large_shift: bool = True, network: bool = False) -> np.ndarray:
    """The stages of the ``brainshift`` method; fills ``record['stages']`` and ``outputs``."""
    steps = outputs.setdefault("fields", {})
    candidates = {"ius": fixed}          # fixed images the registration may use
    moving_reg = moving                  # the moving image as the registration sees it
    if "style" in stages:
        from .style import synthesize_t1, t2_to_t1_like

        t = time.perf_counter()
        candidates = {"synthetic_t1": fixed.like(synthesize_t1(fixed.data, spacing=fixed.spacing)), "ius": fixed}
        if modality == "t2":
            moving_reg = moving.like(t2_to_t1_like(moving.data))
        record["stages"]["style"] = {"seconds": time.perf_counter() - t, "t2_remapped": modality == "t2"}
    chosen = next(iter(candidates))
    matrix = np.eye(4)
    if "affine" in stages:
        from .affine import affine_stage, result_dict

        t = time.perf_counter()
        res = affine_stage(fixed, moving_reg, mask, extra_fixed={k: v for k, v in candidates.items() if k != "ius"},
                           threads=threads)
        chosen, matrix = res.fixed_image, res.matrix
        outputs["affine"] = res
        record["stages"]["affine"] = {**result_dict(res), "seconds": time.perf_counter() - t}
    disp = fields.matrix_to_field(matrix, fixed.affine, moving.affine, fixed.shape)
    steps["affine"] = disp
    if "deform" in stages:
        from .deform import discrete_field, guard, inverse_consistency, predict_field, refine_field
        from .deform.guard import FITTED_MARGIN, UNFITTED_MARGIN

        t = time.perf_counter()
        fixed_reg = candidates[chosen].data
        aligned = fields.warp(moving_reg.data, disp)  # the MR after the affine stage, on the fixed grid
        local = (predict_field(fixed_reg, aligned, mask, regularisation=regularisation) if network
                 else np.zeros(fixed_reg.shape + (3,), np.float32))   # without the network: from zero
        times = {"network": time.perf_counter() - t}
        inconsistency = None
        if large_shift:  # discrete search for what the network left, composed after it
            t1 = time.perf_counter()
            moved, step = fields.warp(aligned, local), float(np.mean(fixed.spacing))
            residual = discrete_field(fixed_reg, moved, mask, spacing_mm=step)
            # the same search the other way round (MR fixed): the guard's check that the shift is real
            backward = discrete_field(moved, fixed_reg, mask, spacing_mm=step)
            inconsistency = inverse_consistency(residual, backward, mask, fixed.spacing)
            local = fields.compose(residual, local)
            times["discrete"] = time.perf_counter() - t1
        if refine:
            t1 = time.perf_counter()
            local = refine_field(fixed_reg, aligned, mask, init=local)
            times["refine"] = time.perf_counter() - t1
        # a field fitted on this case's SSC must beat the affine result by a margin; the network's alone need not
        margin = FITTED_MARGIN if (refine or large_shift) else UNFITTED_MARGIN
        decision = guard(fixed_reg, aligned, mask, local, fixed.spacing, ius=fixed.data, inconsistency=inconsistency,
                         margin=margin)
        outputs["deform_candidate"] = fields.compose(local, disp)   # kept or not (the bench scores both)
        if decision.kept:
            disp = outputs["deform_candidate"]
        steps["deform"] = disp
        record["stages"]["deform"] = {**decision.as_dict(), "network": network, "refine": refine, "large_shift": large_shift,
                                      "regularisation": regularisation, "ssc_margin": margin, "step_seconds": times,
                                      "seconds": time.perf_counter() - t}
    return disp


def check_inputs(fixed: Volume, moving: Volume, case: Case, fixed_mask: Volume | None = None) -> None:
    """Reject inputs no method can register, naming the file (NaN/Inf, non-3D, unreadable: load_volume)."""
    if not (fixed.data != 0).any():
        raise InputError(f"{case.fixed}: fixed image is all zero (no ultrasound field of view)")
    if not (moving.data != 0).any():
        raise InputError(f"{case.moving}: moving image is all zero")
    if fixed_mask is not None:
        if fixed_mask.shape != fixed.shape:
            raise InputError(f"{case.fixed_mask}: fixed mask shape {fixed_mask.shape} does not match "
                             f"the fixed image {case.fixed.name} {fixed.shape}")
        if not (fixed_mask.data > 0).any():
            raise InputError(f"{case.fixed_mask}: fixed mask is empty (no voxel > 0)")


def run_case(case: Case, out_dir: str | os.PathLike, method: str = "brainshift", stages: tuple[str, ...] = STAGES,
             refine: bool = True, threads: int | None = None, qc: bool = False, large_shift: bool = True,
             network: bool = False) -> dict:
    """Load one pair, register it, write ``out_dir/case.output_name`` atomically; return the record.

    With ``qc``, per-stage diagnostics go to ``out_dir/qc/``: the coarse stage's candidates and criterion curve
    (JSON + PNG), the case record (JSON), and :mod:`brainshift.report`'s per-stage figure
    (``<stem>_stages.png``) and numbers (``<stem>_report.json``).
    """
    fixed = load_volume(case.fixed)
    moving = load_volume(case.moving)
    mask_vol = load_volume(case.fixed_mask) if case.fixed_mask is not None else None
    check_inputs(fixed, moving, case, mask_vol)
    fixed_mask = mask_vol.data > 0 if mask_vol is not None else None
    result = register(fixed, moving, method=method, stages=stages, modality=case.modality, refine=refine,
                      large_shift=large_shift, network=network, threads=threads, fixed_mask=fixed_mask)
    path = fields.write_field(Path(out_dir) / case.output_name, result.disp, moving.affine)
    record = {**result.record, "case": case.pair_name, "field": str(path)}
    if qc:
        stem = Path(case.output_name).name.split(".")[0]
        qc_dir = Path(out_dir) / "qc"
        if "affine" in result.stage_outputs:
            from .affine import save_curve

            save_curve(result.stage_outputs["affine"], qc_dir / f"{stem}_affine_curve.json", qc_dir / f"{stem}_affine_curve.png")
        write_json(qc_dir / f"{stem}_record.json", record, indent=2)
        try:  # the field is written: a QC failure is a warning, not a failed case
            from .report import write_case_qc

            write_case_qc(qc_dir, stem, record, fixed, moving, result.stage_outputs, result.disp, fixed_mask)
        except Exception as exc:
            import logging

            logging.getLogger(__name__).warning("warning: %s: QC report not written (%s: %s)", case.pair_name,
                                                type(exc).__name__, one_line(str(exc)))
    return record


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
              stages: tuple[str, ...] = STAGES, refine: bool = True, large_shift: bool = True,
              threads: int | None = None, network: bool = False,
              qc: bool = False, progress: bool = True) -> tuple[list[dict], list[str]]:
    """Run every case; one failing case never stops the others. Returns (records, error lines)."""
    from tqdm import tqdm

    check_writable(out_dir)
    records, errors = [], []
    for case in tqdm(cases, desc=method, unit="pair", disable=not progress):
        try:
            records.append(run_case(case, out_dir, method=method, stages=stages, refine=refine, threads=threads, qc=qc,
                                    large_shift=large_shift, network=network))
        except (InputError, NiftyRegError, ValueError) as exc:
            errors.append(one_line(f"{case.pair_name}: {exc}", limit=500))
        except Exception as exc:  # an unexpected failure in one case must not stop the others
            errors.append(one_line(f"{case.pair_name}: {case.moving}: {type(exc).__name__}: {exc}", limit=500))
    return records, errors
