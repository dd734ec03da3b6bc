"""Case discovery in the three layouts, bad input handling, and the run -> evaluate path end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainshift import fields, metrics
from brainshift.cli import main
from brainshift.io import InputError, Volume, discover_cases, load_landmarks, load_volume, save_landmarks, save_volume
from conftest import grid_centre_mm, oblique_affine, rigid_matrix, smooth_volume

SHAPE = (24, 24, 24)
AFF = oblique_affine(spacing=(2.0, 2.0, 2.0))


def write_case(folder: Path, case: str, tags=("0000", "0001", "0002"), landmarks: Path | None = None) -> None:
    for n, tag in enumerate(tags):
        save_volume(folder / f"ReMIND2Reg_{case}_{tag}.nii.gz", Volume(smooth_volume(SHAPE, seed=n), AFF))
        if landmarks is not None:
            save_landmarks(landmarks / f"ReMIND2Reg_{case}_{tag}.csv", np.full((10, 3), 12.0))


def test_flat_layout(tmp_path):
    write_case(tmp_path, "0001")
    write_case(tmp_path, "0002", tags=("0000", "0002"))
    (tmp_path / "notes.txt").write_text("unrelated")
    found = discover_cases(tmp_path)
    assert [c.output_name for c in found.cases] == [
        "disp_0001_0000_0001_0001.nii.gz", "disp_0001_0000_0001_0002.nii.gz", "disp_0002_0000_0002_0002.nii.gz"]
    assert [c.modality for c in found.cases] == ["t1", "t2", "t2"] and found.problems == []
    assert [c.moving_tag for c in discover_cases(tmp_path, "t1").cases] == ["0001"]


def test_dataset_layout_with_json_and_landmarks(tmp_path):
    write_case(tmp_path / "imagesTr", "0042", landmarks=tmp_path / "landmarksTr")
    write_case(tmp_path / "imagesTr", "0043", landmarks=tmp_path / "landmarksTr")  # not in the json
    pairs = [{"fixed": "./imagesTr/ReMIND2Reg_0042_0000.nii.gz", "moving": f"./imagesTr/ReMIND2Reg_0042_{t}.nii.gz"}
             for t in ("0001", "0002")]
    (tmp_path / "ReMIND2Reg_dataset.json").write_text(json.dumps({"registration_val": pairs}))
    cases = discover_cases(tmp_path).cases
    assert [c.pair_name for c in cases] == ["0042_0000<--0042_0001", "0042_0000<--0042_0002"]
    assert cases[0].fixed_landmarks == tmp_path / "landmarksTr" / "ReMIND2Reg_0042_0000.csv"
    assert cases[1].moving_landmarks == tmp_path / "landmarksTr" / "ReMIND2Reg_0042_0002.csv"
    (tmp_path / "ReMIND2Reg_dataset.json").unlink()  # without json: every case by name
    assert len(discover_cases(tmp_path).cases) == 4


def test_grand_challenge_layout(tmp_path):
    img = tmp_path / "images"
    save_volume(img / "fixed" / "case_a.mha", Volume(smooth_volume(SHAPE, 1), AFF))
    save_volume(img / "moving" / "case_a.mha", Volume(smooth_volume(SHAPE, 2), AFF))
    save_volume(img / "fixed-mask" / "case_a.mha", Volume(np.ones(SHAPE, np.float32), AFF))
    (case,) = discover_cases(tmp_path).cases
    assert case.output_name == "images/displacement-field/case_a.mha"
    assert case.fixed_mask == img / "fixed-mask" / "case_a.mha" and case.moving_mask is None
    out = tmp_path / "out"
    assert main(["run", "--input", str(tmp_path), "--output", str(out), "--method", "identity", "--quiet"]) == 0
    disp = fields.read_field(out / case.output_name)
    assert disp.shape == SHAPE + (3,) and not disp.any()


def test_bad_inputs_each_named_and_others_still_processed(tmp_path, capsys):
    write_case(tmp_path, "0001", tags=("0000", "0001"))                 # good
    write_case(tmp_path, "0002", tags=("0001",))                         # moving without fixed
    write_case(tmp_path, "0003", tags=("0000", "0001"))
    (tmp_path / "ReMIND2Reg_0003_0001.nii.gz").write_bytes(b"\x1f\x8b garbage")  # corrupt
    write_case(tmp_path, "0004", tags=("0000", "0001"))
    (tmp_path / "ReMIND2Reg_0004_0000.nii.gz").write_bytes(b"")        # 0-byte
    save_volume(tmp_path / "ReMIND2Reg_0005_0000.nii.gz", Volume(np.zeros(SHAPE, np.float32), AFF))  # all-zero iUS
    save_volume(tmp_path / "ReMIND2Reg_0005_0001.nii.gz", Volume(smooth_volume(SHAPE, 1), AFF))
    nan = smooth_volume(SHAPE, 2)
    nan[5, 5, 5] = np.nan
    write_case(tmp_path, "0006", tags=("0000",))
    save_volume(tmp_path / "ReMIND2Reg_0006_0001.nii.gz", Volume(nan, AFF))  # NaN voxels
    (tmp_path / "ReMIND2Reg_0007_0009.nii.gz").write_bytes(b"x")       # wrong file name
    out = tmp_path / "out"
    code = main(["run", "--input", str(tmp_path), "--output", str(out), "--method", "identity", "--quiet", "--no-qc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["disp_0001_0000_0001_0001.nii.gz"]  # only the good one
    expect = {"ReMIND2Reg_0002_0001.nii.gz": "without its fixed image", "ReMIND2Reg_0003_0001.nii.gz": "cannot read",
              "ReMIND2Reg_0004_0000.nii.gz": "empty (0 bytes)", "ReMIND2Reg_0005_0000.nii.gz": "all zero",
              "ReMIND2Reg_0006_0001.nii.gz": "NaN", "ReMIND2Reg_0007_0009.nii.gz": "does not follow"}
    for name, reason in expect.items():
        assert any(name in line and reason in line for line in err), (name, err)
    assert len(err) == len(expect)  # one line each


def test_unwritable_output_folder(tmp_path, capsys):
    write_case(tmp_path / "in", "0001", tags=("0000", "0001"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--input", str(tmp_path / "in"), "--output", str(blocker / "out"), "--quiet"]) == 1
    assert "output folder is not writable" in capsys.readouterr().err


def test_landmark_file_errors(tmp_path):
    (tmp_path / "two.csv").write_text("1,2\n3,4\n")
    with pytest.raises(InputError, match="2 columns, expected 3"):
        load_landmarks(tmp_path / "two.csv")
    with pytest.raises(InputError, match="not found"):
        load_landmarks(tmp_path / "missing.csv")
    (tmp_path / "text.csv").write_text("a,b,c\n")
    with pytest.raises(InputError, match="not a comma-separated table"):
        load_landmarks(tmp_path / "text.csv")


def test_evaluate_reports_bad_landmarks_and_missing_fields(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    for case in ("0001", "0002", "0003"):
        write_case(data, case, tags=("0000", "0001"), landmarks=data / "landmarks")
    (data / "landmarks" / "ReMIND2Reg_0002_0001.csv").write_text("1,2\n3,4\n")
    assert main(["run", "--input", str(data), "--output", str(out), "--method", "identity", "--quiet"]) == 0
    (out / "disp_0003_0000_0003_0001.nii.gz").unlink()
    assert main(["evaluate", "--input", str(data), "--output", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "ReMIND2Reg_0002_0001.csv: landmark file has 2 columns" in err
    assert "disp_0003_0000_0003_0001.nii.gz: displacement field not found" in err
    assert list(json.loads((out / "metrics.json").read_text())["cases"]) == ["0001_0000<--0001_0001"]


def test_niftyreg_rigid_recovers_known_rigid_shift(tmp_path):
    """The official rigid baseline, through `brainshift run`, recovers 5 deg / 6 mm to < 1 mm TRE."""
    shape, aff = (48, 48, 48), oblique_affine(spacing=(2.0, 2.0, 2.0), degrees=(10, -20, 5))
    fixed = smooth_volume(shape, seed=5, sigma=2.0)
    m = rigid_matrix([5.0, -3.0, 2.0], [6.0, -2.0, 3.0], grid_centre_mm(aff, shape))  # fixed world -> moving world
    # moving(q) = fixed(p) where q = M p  <=>  moving = fixed pulled through M^-1
    moving = fields.warp(fixed, fields.matrix_to_field(np.linalg.inv(m), aff, aff, shape), order=3)
    save_volume(tmp_path / "ReMIND2Reg_0001_0000.nii.gz", Volume(fixed, aff))
    save_volume(tmp_path / "ReMIND2Reg_0001_0001.nii.gz", Volume(np.clip(moving, 0, None), aff))
    lms = np.column_stack([np.random.default_rng(0).uniform(12, 36, 15) for _ in range(3)])
    v = fields.voxel_matrix(m, aff, aff)
    moving_lms = (v[:3, :3] @ lms.T).T + v[:3, 3]
    out = tmp_path / "out"
    assert main(["run", "--input", str(tmp_path), "--output", str(out), "--method", "niftyreg-rigid", "--quiet"]) == 0
    disp = fields.read_field(out / "disp_0001_0000_0001_0001.nii.gz")
    before = metrics.tre(np.zeros_like(disp), lms, moving_lms, [2, 2, 2]).mean()
    after = metrics.tre(disp, lms, moving_lms, [2, 2, 2]).mean()
    assert before > 5.0 and after < 1.0, (before, after)


def test_process_py_runs_the_same_pipeline(tmp_path):
    """The container entry point writes the same fields as `brainshift run`."""
    write_case(tmp_path / "in", "0001", tags=("0000", "0001"))
    env = {"BRAINSHIFT_INPUT": str(tmp_path / "in"), "BRAINSHIFT_OUTPUT": str(tmp_path / "out"),
           "BRAINSHIFT_METHOD": "identity", "PATH": ""}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "process.py"), "--quiet"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "disp_0001_0000_0001_0001.nii.gz").is_file()
