"""`brainshift bench`: outputs, scoring, failures, and the peers' field conventions on known transforms."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from brainshift import bench, fields, peers
from brainshift.cli import main
from brainshift.io import Volume, discover_cases, load_volume
from brainshift.metrics import evaluate_case
from brainshift.synth import simulate_dataset

from conftest import grid_centre_mm, oblique_affine, rigid_matrix, smooth_volume


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = tmp_path_factory.mktemp("tiny")
    simulate_dataset(data, 2, seed=3, shape=48, spacing=3.0, progress=False)
    return data


def test_bench_writes_outputs_and_scores_like_evaluate(tiny, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--cases", str(tiny), "--out", str(out), "--methods", "identity,niftyreg-rigid",
                 "--threads", "1", "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "identity" in table and "niftyreg-rigid" in table
    for name in ("bench.md", "bench.json", "bench_tre.png"):
        assert (out / name).stat().st_size > 0
    payload = json.loads((out / "bench.json").read_text())
    cases = discover_cases(tiny, "t1").cases
    assert payload["cases"] == [c.pair_name for c in cases] and not payload["errors"]
    rows = {(r["method"], r["case"]): r for r in payload["results"]}
    for case in cases:
        zero = evaluate_case(case, np.zeros((48, 48, 48, 3), np.float32))
        row = rows[("identity", case.pair_name)]
        assert row["tre_mean"] == pytest.approx(zero["tre_mean"], abs=1e-9)
        assert row["peak_rss_gb"] > 0.01 and row["seconds"] >= 0 and row["cpu_seconds"] >= 0
        assert row["peak_rss_gb"] < 0.35  # the child's own memory, not the (larger) test process's
        field = out / "fields" / "niftyreg-rigid" / case.output_name
        assert field.is_file()  # where `brainshift evaluate --output OUT/fields/niftyreg-rigid` looks
        # the row scores the rigid field the run recorded: its matrix, turned into a field, gives the same TRE
        rigid = rows[("niftyreg-rigid", case.pair_name)]
        matrix = np.array(rigid["record"]["stages"]["rigid"]["matrix"])
        f, m = load_volume(case.fixed), load_volume(case.moving)
        expect = evaluate_case(case, fields.matrix_to_field(matrix, f.affine, m.affine, f.shape))["tre_mean"]
        assert rigid["tre_mean"] == pytest.approx(expect, abs=1e-3) and rigid["tre_mean"] != row["tre_mean"]
    md = (out / "bench.md").read_text()
    assert "## Summary" in md and "## TRE per pair" in md and "## Settings" in md and "reg_aladin" in md
    assert not list(out.rglob(".*.tmp*"))  # no temporary file left behind


def test_unknown_method_is_one_line_error(tiny, tmp_path, capsys):
    assert main(["bench", "--cases", str(tiny), "--out", str(tmp_path), "--methods", "identity,nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0]


def test_failing_case_and_missing_method_are_recorded(tiny, tmp_path, monkeypatch):
    """A (method, case) that fails is an error row; the other cases and methods still run."""
    monkeypatch.setitem(bench.METHODS, "broken", "test only")
    monkeypatch.setattr(bench, "unavailable", lambda name: "not here (test)" if name == "elastix" else None)
    monkeypatch.setattr(bench, "method_settings", lambda name: {})
    real = bench.run_isolated

    def run_isolated(spec, work, log):
        return {"error": "RuntimeError: boom"} if spec["method"] == "broken" else real(spec, work, log)

    monkeypatch.setattr(bench, "run_isolated", run_isolated)
    payload = bench.run_bench(tiny, ["identity", "broken", "elastix"], tmp_path, progress=False)
    assert len(payload["errors"]) == 2 and all(e.startswith("broken: ") for e in payload["errors"])
    assert payload["methods"]["elastix"]["summary"] is None
    assert payload["methods"]["identity"]["summary"]["ok"] == 2
    md = (tmp_path / "bench.md").read_text()
    assert "not available: not here (test)" in md and "failed" in md


def test_resume_reuses_saved_runs_and_reruns_failed_ones(tiny, tmp_path, monkeypatch):
    """Each finished run is saved at once; --resume runs only what is missing or failed."""
    real, calls, interrupt = bench.run_isolated, [], [True]

    def run_isolated(spec, work, log):
        calls.append((spec["method"], spec["field"]))
        if spec["method"] == "niftyreg-rigid" and "0002" in spec["field"] and interrupt[0]:
            return {"error": "RuntimeError: interrupted (test)"}
        return real(spec, work, log)

    monkeypatch.setattr(bench, "run_isolated", run_isolated)
    first = bench.run_bench(tiny, ["identity", "niftyreg-rigid"], tmp_path, threads=1, progress=False)
    assert len(calls) == 4 and len(first["errors"]) == 1
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 4
    calls.clear()
    interrupt[0] = False
    second = bench.run_bench(tiny, ["identity", "niftyreg-rigid"], tmp_path, threads=1, progress=False, resume=True)
    assert [c[0] for c in calls] == ["niftyreg-rigid"] and "0002" in calls[0][1]  # only the failed run again
    assert not second["errors"] and second["methods"]["niftyreg-rigid"]["summary"]["ok"] == 2
    before = {(r["method"], r["case"]): r["tre_mean"] for r in first["results"] if "error" not in r}
    after = {(r["method"], r["case"]): r["tre_mean"] for r in second["results"]}
    assert all(after[k] == v for k, v in before.items())


# ------------------------------------------------------------------------------------------------
# peers recover a known transform: catches channel order, sign, mm vs voxel, LPS vs RAS errors
# ------------------------------------------------------------------------------------------------
def _known_pair(n: int, moving_affine: np.ndarray | None = None, spacing: float = 1.5):
    """Fixed smooth volume on an oblique grid; moving = the same tissue moved by a world rigid matrix.

    Returns (fixed, moving, truth voxel pull field, header-only field). ``truth - header`` is the
    part a registration has to find (the world motion).
    """
    shape = (n, n, n)
    af = oblique_affine(spacing=(spacing,) * 3)
    am = af if moving_affine is None else moving_affine
    image = smooth_volume(shape, seed=1, sigma=3.0)
    world = rigid_matrix((3.0, -2.0, 4.0), (4.0, -3.0, 2.5), grid_centre_mm(af, shape))  # fixed world -> moving world
    # moving(q) shows the tissue at fixed world inv(world) @ Am q
    moving = fields.warp(image, fields.matrix_to_field(np.linalg.inv(world), am, af, shape), order=3)
    truth = fields.matrix_to_field(world, af, am, shape)
    header = fields.matrix_to_field(np.eye(4), af, am, shape)
    return Volume(image, af), Volume(moving, am), truth, header


def _endpoint_errors(disp, truth, header, spacing, border=10):
    inner = (slice(border, -border),) * 3
    err = np.linalg.norm((disp - truth)[inner], axis=-1) * spacing
    motion = np.linalg.norm((truth - header)[inner], axis=-1) * spacing
    return float(err.mean()), float(motion.mean())


@pytest.mark.skipif(importlib.util.find_spec("convexAdam") is None, reason="convexadam not installed")
def test_convexadam_recovers_known_rigid_motion():
    fixed, moving, truth, header = _known_pair(48)
    disp, record = peers.convexadam_register(fixed, moving, fixed_mask=np.ones(fixed.shape, bool), threads=2,
                                             selected_niter=20)
    assert disp.shape == fixed.shape + (3,) and disp.dtype == np.float32
    err, motion = _endpoint_errors(disp, truth, header, 1.5)
    assert motion > 4.0 and err < 0.3 * motion, (err, motion)
    assert record["settings"]["mind_r"] == 3 and record["settings"]["selected_niter"] == 20


@pytest.mark.skipif(shutil.which("elastix") is None or shutil.which("transformix") is None,
                    reason="elastix not installed (Debian package elastix)")
def test_elastix_recovers_known_rigid_motion_between_different_oblique_grids():
    """Moving on another oblique, anisotropic grid: the LPS/RAS and world->voxel conversions must hold."""
    am = oblique_affine(spacing=(1.4, 1.6, 1.5), degrees=(10.0, 5.0, -12.0), origin=(-35.0, 20.0, 12.0))
    fixed, moving, truth, header = _known_pair(48, moving_affine=am)
    disp, record = peers.elastix_register(fixed, moving, fixed_mask=fixed.data > 0, threads=2,
                                          overrides={"MaximumNumberOfIterations": 100, "NumberOfResolutions": 2,
                                                     "NumberOfSpatialSamples": 1024})
    err, motion = _endpoint_errors(disp, truth, header, 1.5)
    assert motion > 4.0 and err < 0.3 * motion, (err, motion)
    assert record["parameters"]["bspline"]["Transform"] == "BSplineTransform"


def test_lps_displacement_conversion_matches_matrix_field():
    """A pure world translation given as an LPS displacement equals matrix_to_field of that translation."""
    af = oblique_affine()
    am = oblique_affine(spacing=(1.0, 1.1, 0.9), degrees=(5.0, 0.0, 30.0), origin=(-30.0, 10.0, 0.0))
    t_ras = np.array([3.0, -2.0, 5.0])
    shape = (6, 7, 8)
    d_lps = np.broadcast_to(t_ras * np.array([-1.0, -1.0, 1.0]), shape + (3,))
    m = np.eye(4)
    m[:3, 3] = t_ras
    expected = fields.matrix_to_field(m, af, am, shape)
    np.testing.assert_allclose(peers.lps_displacement_to_voxel_field(d_lps, af, am), expected, atol=1e-4)


def test_elastix_parameter_text_quotes_strings_only():
    text = peers.elastix_parameter_text({"Metric": ["A", "B"], "NumberOfResolutions": 2, "ErodeMask": "false",
                                         "GridSpacingSchedule": [2, 1], "FinalGridSpacingInPhysicalUnits": 15.0})
    assert '(Metric "A" "B")' in text and "(NumberOfResolutions 2)" in text and "(GridSpacingSchedule 2 1)" in text
    assert '(ErodeMask "false")' in text and "(FinalGridSpacingInPhysicalUnits 15.0)" in text
