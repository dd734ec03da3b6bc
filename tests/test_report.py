"""QC report: the per-stage figure, the per-case report JSON, the HTML page, and their CLI wiring."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainshift import report
from brainshift.cli import main
from brainshift.io import Volume, save_volume
from brainshift.synth import simulate_dataset

from conftest import oblique_affine, smooth_volume

STEM = "disp_0001_0000_0001_0001"
PAIR = "0001_0000<--0001_0001"
REPORT_KEYS = {"case", "method", "field", "seconds", "ssc_mse", "final", "decisions", "guard"}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG header; asserts the file is a PNG."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    data = tmp_path_factory.mktemp("sim")
    simulate_dataset(data, 1, seed=11, shape=64, spacing=2.25, progress=False)
    return data


@pytest.fixture(scope="module")
def runs(small_case, tmp_path_factory):
    """`brainshift run` (QC on by default) with the affine stage, and with the identity method."""
    out = {}
    for name, extra in (("affine", ["--stages", "affine"]), ("identity", ["--method", "identity"])):
        out[name] = tmp_path_factory.mktemp(name)
        assert main(["run", "--input", str(small_case), "--output", str(out[name]), "--modality", "t1",
                     "--quiet", *extra]) == 0
    return out


def test_run_writes_stage_figure_and_report_by_default(runs):
    qc = runs["affine"] / "qc"
    width, height = png_size(qc / f"{STEM}_stages.png")
    id_width, id_height = png_size(runs["identity"] / "qc" / f"{STEM}_stages.png")
    assert width == id_width and height > 1.6 * id_height  # input + affine rows vs the input row alone
    doc = json.loads((qc / f"{STEM}_report.json").read_text())
    assert REPORT_KEYS <= set(doc) and doc["case"] == PAIR and doc["method"] == "brainshift"
    assert list(doc["ssc_mse"]) == ["input", "affine"] and set(doc["seconds"]) == {"affine", "total"}
    assert {"sdlogj", "sdlogj_plain", "folds", "max_disp_mm"} <= set(doc["final"]) and doc["final"]["folds"] == 0
    record = json.loads((qc / f"{STEM}_record.json").read_text())
    kept = record["stages"]["affine"]["kept"]
    assert doc["decisions"]["affine"].startswith(f"{kept} kept")
    if kept != "identity":
        assert doc["final"]["max_disp_mm"] > 0
    assert (qc / f"{STEM}_affine_curve.png").is_file()


def test_identity_report_has_no_stages(runs):
    doc = json.loads((runs["identity"] / "qc" / f"{STEM}_report.json").read_text())
    assert doc["method"] == "identity" and list(doc["ssc_mse"]) == ["input"] and list(doc["seconds"]) == ["total"]
    assert doc["final"] == {"sdlogj": 0.0, "sdlogj_plain": 0.0, "folds": 0, "max_disp_mm": 0.0}
    assert doc["decisions"] == {} and doc["guard"] == {}


def test_ssc_box_matches_whole_volume_ssc(small_case):
    """The bounding-box SSC-MSE is the whole-volume ssc_mse (up to the variance clamp)."""
    from brainshift.fields import warp
    from brainshift.io import load_volume
    from brainshift.ssc import ssc_mse

    fixed = load_volume(small_case / "imagesTr" / "ReMIND2Reg_0001_0000.nii.gz").data
    moving = load_volume(small_case / "imagesTr" / "ReMIND2Reg_0001_0001.nii.gz").data
    disp = np.zeros(fixed.shape + (3,), np.float32)
    disp[..., 0] = 1.5
    mask = fixed > 0
    measure = report.SSCBox(fixed, mask)
    assert measure(moving) == pytest.approx(ssc_mse(fixed, moving, mask), rel=2e-3)
    assert measure(moving, disp) == pytest.approx(ssc_mse(fixed, warp(moving, disp), mask), rel=2e-3)


def test_slice_panels_warp_only_the_slices_correctly():
    """A permuted, flipped grid (voxel axes S, -R, A) and a known translation: the warped slices equal the fixed."""
    shape = (30, 34, 38)
    fixed = smooth_volume(shape, seed=4)
    shift = np.array([2.0, -3.0, 1.0])  # voxels; moving(q) = fixed(q - shift) -> pull field +shift
    moving = np.zeros_like(fixed)
    moving[2:, :-3, 1:] = fixed[:-2, 3:, :-1]
    disp = np.broadcast_to(shift.astype(np.float32), shape + (3,))
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 1.5, -1.0, 2.0, 1.0  # i->S, j->-R, k->A
    mask = np.zeros(shape, bool)
    mask[6:24, 8:28, 8:30] = True
    panels = report.slice_panels(fixed, moving, [None, disp], mask, spacing=(1.5, 1.0, 2.0), affine=affine)
    assert [p["view"] for p in panels] == ["axial", "coronal", "sagittal"]
    for p in panels:
        inner = (slice(4, -4), slice(4, -4))
        np.testing.assert_allclose(p["moving"][1][inner], p["fixed"][inner], atol=1e-3)
        assert not np.allclose(p["moving"][0][inner], p["fixed"][inner], atol=1)
        np.testing.assert_allclose(p["mag"][1], np.linalg.norm(shift * [1.5, 1.0, 2.0]), rtol=1e-5)
        assert not p["mag"][0].any()
    axial = panels[0]  # horizontal = R = -j (34 + margins, 1 mm), vertical = A = k (2 mm)
    assert axial["fixed"].shape == (20 + 2 * 5, 22 + 2 * 3)
    assert axial["extent"] == pytest.approx((30 * 1.0, 28 * 2.0))
    # horizontal runs towards R = -j: the first column is the largest j of the crop
    np.testing.assert_array_equal(axial["fixed"][0], fixed[(6 + 24 - 1) // 2, 28 + 5 - 1, 8 - 3:30 + 3])


def test_case_figure_rows_and_speed(tmp_path):
    shape = (48, 48, 24)
    fixed = smooth_volume(shape, seed=1)
    moving = smooth_volume(shape, seed=2)
    disp = np.zeros(shape + (3,), np.float32)
    disp[..., 1] = 2.0
    mask = fixed > 300
    sizes = []
    for n in (0, 1, 3):
        steps = {f"stage{k}": disp * k for k in range(n)}
        path = report.case_figure(fixed, moving, steps, mask, tmp_path / f"f{n}.png", spacing=(1.0, 1.0, 2.5),
                                  title="t <&>", labels={"input": "x"})
        sizes.append(png_size(path))
    assert sizes[0][0] == sizes[1][0] == sizes[2][0] and sizes[0][1] < sizes[1][1] < sizes[2][1]
    assert (sizes[2][1] - sizes[1][1]) == pytest.approx(2 * (sizes[1][1] - sizes[0][1]), abs=2)


def test_report_html_is_self_contained_with_tre(runs, small_case, capsys):
    out = runs["affine"]
    assert main(["evaluate", "--input", str(small_case), "--output", str(out), "--modality", "t1", "--quiet"]) == 0
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "0001_0000&lt;--0001_0001" in page and PAIR not in page  # the pair name, escaped
    assert page.count("data:image/png;base64,") == 2  # stage figure + affine curve
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may spell anything
    assert "http" not in text and "src=" not in text.replace('src=""', "")  # no external resource
    assert "TRE mean mm" in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['cases'][PAIR]['TRE_lm']['mean']:.2f}" in page


def test_report_html_escapes_text(tmp_path):
    qc = tmp_path / "qc"
    qc.mkdir()
    bad = "<script>alert('x')</script>"
    (qc / "case_report.json").write_text(json.dumps({"case": bad, "method": "m&m", "seconds": {"total": 1.0},
                                                     "ssc_mse": {"input": 0.2}, "decisions": {"deform": "<b>"}}))
    page = report.build_html(tmp_path).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "m&amp;m" in page and "&lt;b&gt;" in page


def test_report_on_a_folder_without_reports_is_one_line_exit_1(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no QC reports" in err[0] and str(tmp_path) in err[0]
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "folder not found" in capsys.readouterr().err


def test_no_qc_writes_no_qc_folder(small_case, tmp_path):
    assert main(["run", "--input", str(small_case), "--output", str(tmp_path), "--modality", "t1",
                 "--method", "identity", "--no-qc", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{STEM}.nii.gz"]


@pytest.mark.parametrize("qc", ["", "1"])
def test_container_writes_qc_only_with_brainshift_qc(qc, tmp_path):
    aff = oblique_affine(spacing=(2.0, 2.0, 2.0))
    for tag, seed in (("0000", 1), ("0001", 2)):
        save_volume(tmp_path / "in" / f"ReMIND2Reg_0001_{tag}.nii.gz", Volume(smooth_volume((20, 20, 20), seed), aff))
    env = {**os.environ, "BRAINSHIFT_INPUT": str(tmp_path / "in"), "BRAINSHIFT_OUTPUT": str(tmp_path / "out"),
           "BRAINSHIFT_METHOD": "identity", "BRAINSHIFT_QC": qc}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "process.py"), "--quiet"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / f"{STEM}.nii.gz").is_file()
    assert (tmp_path / "out" / "qc" / f"{STEM}_stages.png").is_file() == (qc == "1")
