"""The brainshift method end to end on a small simulated case: stages, records, QC files, robustness."""
from __future__ import annotations

import json

import numpy as np
import pytest

from brainshift import fields, pipeline
from brainshift.cli import main
from brainshift.io import discover_cases, load_volume
from brainshift.metrics import evaluate_case
from brainshift.synth import simulate_dataset


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    data = tmp_path_factory.mktemp("sim")
    simulate_dataset(data, 1, seed=11, shape=64, spacing=2.25, progress=False)
    return data


@pytest.fixture(scope="module")
def affine_run(small_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("affine") / "out"
    assert main(["run", "--input", str(small_case), "--output", str(out), "--modality", "t1",
                 "--stages", "affine", "--qc", "--quiet"]) == 0
    return out


def test_affine_stage_does_not_diverge(small_case, affine_run):
    """Issue 15: on this small case (2.25 mm voxels, a 75 ml sweep) block matching returns 43-130 deg
    rotations; the old selection kept a diverged affine (TRE 9.6 mm vs identity 4.1). The stage must
    not make the case worse than the images' own alignment."""
    (case,) = discover_cases(small_case, "t1").cases
    tre_affine = evaluate_case(case, fields.read_field(affine_run / case.output_name))["tre_mean"]
    tre_identity = evaluate_case(case, np.zeros(load_volume(case.fixed).shape + (3,), np.float32))["tre_mean"]
    assert tre_affine < tre_identity + 0.5, (tre_affine, tre_identity)


def test_affine_stage_through_cli_writes_qc(affine_run):
    out = affine_run
    stem = "disp_0001_0000_0001_0001"
    record = json.loads((out / "qc" / f"{stem}_record.json").read_text())
    assert list(record["stages"]) == ["affine"]
    assert record["stages"]["affine"]["kept"] in ("identity", "rigid", "affine", "baseline", "consensus")
    assert (out / "qc" / f"{stem}_affine_curve.png").stat().st_size > 0


def test_full_method_records_every_stage_and_guard(small_case):
    """style -> affine -> deform (+refine) on T2: every stage is recorded; the result is no worse than affine."""
    (case,) = discover_cases(small_case, "t2").cases
    fixed, moving = load_volume(case.fixed), load_volume(case.moving)
    result = pipeline.register(fixed, moving, modality="t2", refine=True)
    st = result.record["stages"]
    assert list(st) == ["style", "affine", "deform"] and st["style"]["t2_remapped"]
    assert st["affine"]["fixed_image"] in ("synthetic_t1", "ius")
    assert {c["fixed_image"] for c in st["affine"]["candidates"]} == {"synthetic_t1", "ius"}  # both were tried
    assert {"kept", "reason", "ssc_before", "ssc_after", "folds"} <= set(st["deform"])
    assert st["deform"]["ssc_margin"] == 0.05        # a refined field is fitted on SSC: it must beat affine by 5%
    steps = result.stage_outputs["fields"]
    assert np.array_equal(result.disp, steps["deform"])
    tre = {k: evaluate_case(case, v) for k, v in steps.items()}
    assert tre["deform"]["folds"] == 0
    if not st["deform"]["kept"]:  # the guard's fallback is exactly the affine field
        assert np.array_equal(steps["deform"], steps["affine"])


def test_one_failing_case_does_not_stop_the_others(small_case, tmp_path, monkeypatch):
    """An unexpected error inside one case is reported; the next case is still written."""
    cases = discover_cases(small_case).cases
    calls = []

    def flaky(fixed, moving, **kw):
        calls.append(kw["modality"])
        if len(calls) == 1:
            raise RuntimeError("simulated crash")
        return pipeline.Result(fields.identity_field(fixed.shape), {"method": "identity", "stages": {}, "seconds": 0.0})

    monkeypatch.setattr(pipeline, "register", flaky)
    records, errors = pipeline.run_cases(cases, tmp_path, progress=False)
    assert len(records) == 1 and len(errors) == 1 and "RuntimeError: simulated crash" in errors[0]
    assert (tmp_path / cases[1].output_name).is_file() and not (tmp_path / cases[0].output_name).exists()
