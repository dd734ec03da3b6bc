"""Bad input and deterministic output, through the command line (``brainshift run``).

Every bad-input test runs ``main(["run", ...])`` on a folder with at least one good case plus the
bad one and checks: (a) one line on stderr naming the offending file, (b) the good case's field is
still written, (c) no partial or temporary file for the bad case in the output folder, (d) exit 1.
Fields are written through ``io._atomic_write`` (temporary name in the same folder, then
``os.replace``), so (c) holds for every kind; the tests list the whole output tree to prove it.

| kind | caught in (message) | test |
|---|---|---|
| missing modality (``_0000`` only) | ``io._discover_flat`` ("without any moving image") | ``test_bad_input[missing_modality]`` |
| json lists a moving file that is missing | ``io.load_volume`` ("file not found") | ``test_bad_input_dataset_json`` |
| moving without its fixed | ``io._discover_flat`` ("without its fixed image") | test_io_cli ``test_bad_inputs_each_named...`` |
| fixed mask shape != fixed shape | ``pipeline.check_inputs`` ("does not match") | ``test_bad_fixed_mask[shape]`` |
| empty fixed mask | ``pipeline.check_inputs`` ("fixed mask is empty") | ``test_bad_fixed_mask[empty]`` |
| 4D image (X,Y,Z,2) | ``io.load_volume`` ("expected a 3D image") | ``test_bad_input[moving_4d]`` |
| 2D image | ``io.load_volume`` ("expected a 3D image") | ``test_bad_input[moving_2d]`` |
| header says 3D, 4D voxel data stored | ``io.load_volume`` ("holds N more bytes of voxel data") | ``test_bad_input[header_3d_data_4d]`` |
| header promises more voxels than stored | ``io.load_volume`` ("cannot read image") | ``test_bad_input[short_payload]`` |
| NaN voxels | ``io.load_volume`` ("NaN or Inf") | test_io_cli ``test_bad_inputs_each_named...`` |
| Inf voxels | ``io.load_volume`` ("NaN or Inf") | ``test_bad_input[fixed_inf]`` |
| all-zero iUS | ``pipeline.check_inputs`` ("all zero") | test_io_cli ``test_bad_inputs_each_named...`` |
| all-zero MR | ``pipeline.check_inputs`` ("moving image is all zero") | ``test_bad_input[moving_all_zero]`` |
| truncated gzip | ``io.load_volume`` ("cannot read image (EOFError...)") | ``test_bad_input[truncated_gzip]`` |
| garbage bytes | ``io.load_volume`` ("cannot read image") | test_io_cli ``test_bad_inputs_each_named...`` |
| 0-byte file | ``io.load_volume`` ("empty (0 bytes)") | ``test_bad_input[zero_bytes]``, test_io_cli |
| wrong name: tag ``_0009`` | ``io._discover_flat`` ("does not follow") | test_io_cli ``test_bad_inputs_each_named...`` |
| wrong name: no case number | ``io._discover_flat`` ("does not follow") | ``test_bad_input[name_without_case]`` |
| ``.mha`` in the flat layout | ``io._discover_flat`` ("NIfTI images only") | ``test_bad_input[mha_in_flat_layout]`` |
| two files with the same case + tag | ``io._discover_flat`` ("same case and image number") | ``test_bad_input[duplicate_case_tag]`` |
| broken symlink | ``io.load_volume`` ("file not found") | ``test_bad_input[broken_symlink]`` |
| unwritable output folder | ``pipeline.check_writable`` ("output folder is not writable") | ``test_unwritable_output[*]`` |
| extra files: README.txt, .DS_Store, ``._x`` AppleDouble, csv, foreign json, sub-folders, our own ``disp_*`` fields | ``io._discover_flat`` / ``io._images_in``: ignored silently | ``test_extra_files_are_ignored`` (default method, ``--stages affine``, beside a truncated gzip), ``test_extra_files_grand_challenge_and_foreign_dataset_json`` |
| a ``*dataset*.json`` that is not a Learn2Reg one | ``io._discover_dataset``: one ``warning:`` line, exit 0, cases paired by name | ``test_extra_files_grand_challenge_and_foreign_dataset_json`` |

Unwritable output folder: the tests run as root here, and root ignores ``chmod 0o500`` (it holds
CAP_DAC_OVERRIDE). So, when run as root, the ``read_only_mode`` case runs the CLI in a forked child
that first clears CAP_DAC_OVERRIDE from its effective capabilities (``capset``); the
``parent_is_a_file`` and ``output_is_a_file`` cases fail for any user.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainshift.cli import main
from brainshift.io import Volume, save_volume
from brainshift.synth import simulate_dataset
from conftest import oblique_affine, smooth_volume

SHAPE = (24, 24, 24)
AFF = oblique_affine(spacing=(2.0, 2.0, 2.0))
GOOD_FIELD = "disp_0001_0000_0001_0001.nii.gz"


def put(path: Path, data: np.ndarray | None = None, seed: int = 0) -> Path:
    """Write a NIfTI volume (default: a smooth random one) at ``path``."""
    return save_volume(path, Volume(smooth_volume(SHAPE, seed=seed) if data is None else data, AFF))


def good_case(folder: Path, case: str = "0001") -> None:
    put(folder / f"ReMIND2Reg_{case}_0000.nii.gz", seed=1)
    put(folder / f"ReMIND2Reg_{case}_0001.nii.gz", seed=2)


def run(inp: Path, out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    """``brainshift run`` (identity unless ``extra`` says otherwise, no QC files unless ``--qc``); returns
    (exit code, stderr lines)."""
    method = [] if "--method" in extra or "--stages" in extra else ["--method", "identity"]
    code = main(["run", "--input", str(inp), "--output", str(out), "--quiet", "--no-qc", *method, *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def tree(folder: Path, bad: str = "_0002_") -> list[str]:
    """Every file under ``folder`` (hidden ones included), relative, sorted; the per-case QC files in
    ``qc/`` are left out, after checking that none of them belongs to the bad case (``bad`` in the name)."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []
    qc = [f for f in files if f.startswith("qc/")]
    assert not [f for f in qc if bad in f or ".tmp" in f or "/." in f], qc
    return [f for f in files if f not in qc]


def assert_one_line_naming(err: list[str], name: str, reason: str) -> None:
    """stderr is exactly one ``error:`` line, and it names ``name`` and says ``reason``."""
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert name in err[0] and reason in err[0], err


# --------------------------------------------------------------------------------------------
# bad inputs, flat layout, one kind per folder
# --------------------------------------------------------------------------------------------
def _moving(folder: Path) -> Path:
    put(folder / "ReMIND2Reg_0002_0000.nii.gz", seed=3)
    return folder / "ReMIND2Reg_0002_0001.nii.gz"


def _missing_modality(folder: Path) -> tuple[str, str]:
    put(folder / "ReMIND2Reg_0002_0000.nii.gz", seed=3)   # iUS, no _0001 / _0002
    return "ReMIND2Reg_0002_0000.nii.gz", "without any moving image"


def _moving_4d(folder: Path) -> tuple[str, str]:
    nib.save(nib.Nifti1Image(np.ones(SHAPE + (2,), np.float32), AFF), str(_moving(folder)))
    return "ReMIND2Reg_0002_0001.nii.gz", "expected a 3D image, got shape (24, 24, 24, 2)"


def _moving_2d(folder: Path) -> tuple[str, str]:
    nib.save(nib.Nifti1Image(np.ones(SHAPE[:2], np.float32), AFF), str(_moving(folder)))
    return "ReMIND2Reg_0002_0001.nii.gz", "expected a 3D image, got shape (24, 24)"


def _header_3d_data_4d(folder: Path) -> tuple[str, str]:
    """dim[0] = 3 in the header, but two volumes of voxel data stored (nibabel alone reads the first)."""
    raw = bytearray(nib.Nifti1Image(np.ones(SHAPE + (2,), np.float32), AFF).to_bytes())
    raw[40:42] = (3).to_bytes(2, "little")                 # dim[0]: the number of dimensions
    _moving(folder).write_bytes(gzip.compress(bytes(raw)))
    return "ReMIND2Reg_0002_0001.nii.gz", "holds 55296 more bytes of voxel data"


def _fixed_inf(folder: Path) -> tuple[str, str]:
    v = smooth_volume(SHAPE, seed=3)
    v[4, 5, 6] = np.inf
    put(folder / "ReMIND2Reg_0002_0000.nii.gz", v)
    put(folder / "ReMIND2Reg_0002_0001.nii.gz", seed=4)
    return "ReMIND2Reg_0002_0000.nii.gz", "NaN or Inf"


def _moving_all_zero(folder: Path) -> tuple[str, str]:
    put(_moving(folder), np.zeros(SHAPE, np.float32))
    return "ReMIND2Reg_0002_0001.nii.gz", "moving image is all zero"


def _truncated_gzip(folder: Path) -> tuple[str, str]:
    path = put(_moving(folder), seed=4)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return "ReMIND2Reg_0002_0001.nii.gz", "cannot read image"


def _short_payload(folder: Path) -> tuple[str, str]:
    """A valid gzip stream whose header promises more voxels than it holds."""
    path = put(_moving(folder), seed=4)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return "ReMIND2Reg_0002_0001.nii.gz", "cannot read image"


def _zero_bytes(folder: Path) -> tuple[str, str]:
    _moving(folder).write_bytes(b"")
    return "ReMIND2Reg_0002_0001.nii.gz", "empty (0 bytes)"


def _name_without_case(folder: Path) -> tuple[str, str]:
    put(folder / "brain_t1.nii.gz", seed=4)
    return "brain_t1.nii.gz", "does not follow"


def _mha_in_flat_layout(folder: Path) -> tuple[str, str]:
    save_volume(folder / "ReMIND2Reg_0002_0000.mha", Volume(smooth_volume(SHAPE, seed=3), AFF))
    return "ReMIND2Reg_0002_0000.mha", "NIfTI images only"


def _duplicate_case_tag(folder: Path) -> tuple[str, str]:
    put(folder / "ReMIND2Reg_0001_0001.nii", seed=5)      # same as the good case's .nii.gz
    return "ReMIND2Reg_0001_0001.nii.gz", "same case and image number"


def _broken_symlink(folder: Path) -> tuple[str, str]:
    _moving(folder).symlink_to(folder / "gone.nii.gz")
    return "ReMIND2Reg_0002_0001.nii.gz", "file not found"


BAD = {f.__name__[1:]: f for f in (_missing_modality, _moving_4d, _moving_2d, _header_3d_data_4d, _fixed_inf, _moving_all_zero,
                                   _truncated_gzip, _short_payload, _zero_bytes, _name_without_case,
                                   _mha_in_flat_layout, _duplicate_case_tag, _broken_symlink)}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input(kind, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    good_case(inp)
    name, reason = BAD[kind](inp)
    code, err = run(inp, out, capsys)
    assert_one_line_naming(err, name, reason)
    assert tree(out) == [GOOD_FIELD]          # the good case is written; nothing else, no temp file
    assert code == 1


@pytest.mark.parametrize("kind", ["shape", "empty"])
def test_bad_fixed_mask(kind, tmp_path, capsys):
    """Grand-challenge layout: a fixed mask whose shape differs from its fixed image, or an empty one."""
    img, out = tmp_path / "in" / "images", tmp_path / "out"
    for n, stem in enumerate(("a", "b")):
        save_volume(img / "fixed" / f"{stem}.mha", Volume(smooth_volume(SHAPE, seed=n), AFF))
        save_volume(img / "moving" / f"{stem}.mha", Volume(smooth_volume(SHAPE, seed=n + 5), AFF))
    save_volume(img / "fixed-mask" / "a.mha", Volume(np.ones(SHAPE, np.float32), AFF))
    bad = np.ones((20, 24, 24), np.float32) if kind == "shape" else np.zeros(SHAPE, np.float32)
    save_volume(img / "fixed-mask" / "b.mha", Volume(bad, AFF))
    code, err = run(tmp_path / "in", out, capsys)
    reason = "fixed mask shape (20, 24, 24) does not match the fixed image b.mha (24, 24, 24)" if kind == "shape" \
        else "fixed mask is empty"
    assert_one_line_naming(err, str(img / "fixed-mask" / "b.mha"), reason)
    assert tree(out, bad="b_") == ["images/displacement-field/a.mha"]
    assert code == 1


def test_bad_input_dataset_json(tmp_path, capsys):
    """Dataset layout: a json pair whose moving file is missing is named; the listed good pair runs."""
    inp, out = tmp_path / "in", tmp_path / "out"
    good_case(inp / "imagesTr")
    put(inp / "imagesTr" / "ReMIND2Reg_0002_0000.nii.gz", seed=3)
    pairs = [{"fixed": f"./imagesTr/ReMIND2Reg_{c}_0000.nii.gz", "moving": f"./imagesTr/ReMIND2Reg_{c}_0001.nii.gz"}
             for c in ("0001", "0002")]
    (inp / "ReMIND2Reg_dataset.json").write_text(json.dumps({"registration_val": pairs + ["junk", {"fixed": 3}]}))
    code, err = run(inp, out, capsys)
    assert_one_line_naming(err, "imagesTr/ReMIND2Reg_0002_0001.nii.gz", "file not found")
    assert tree(out) == [GOOD_FIELD] and code == 1


def _drop_dac_override() -> None:  # pragma: no cover - runs in a forked child
    """Clear CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this process's effective set (capset(2)),
    so that root obeys file mode bits like any user, while still owning (and reading) its files."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                  # 2 x {effective, permitted, inheritable}
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0] &= ~((1 << 1) | (1 << 2))               # CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _run_without_dac_override(inp: str, out: str, queue) -> None:  # pragma: no cover - forked child
    import contextlib
    import io

    _drop_dac_override()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--input", inp, "--output", out, "--quiet", "--method", "identity"])
    queue.put((code, err.getvalue()))


@pytest.mark.parametrize("kind", ["parent_is_a_file", "output_is_a_file", "read_only_mode"])
def test_unwritable_output(kind, tmp_path, capsys):
    """Nothing can be written: one line naming the output folder, exit 1, nothing created."""
    inp = tmp_path / "in"
    good_case(inp)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    if kind != "read_only_mode":
        out = blocker / "out" if kind == "parent_is_a_file" else blocker
        code, err = run(inp, out, capsys)
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
        if os.geteuid() != 0:
            code, err = run(inp, out, capsys)
        else:  # root ignores mode bits: run the CLI in a forked child without CAP_DAC_OVERRIDE
            ctx = multiprocessing.get_context("fork")
            queue = ctx.Queue()
            child = ctx.Process(target=_run_without_dac_override, args=(str(inp), str(out), queue))
            child.start()
            code, text = queue.get(timeout=60)
            child.join(timeout=10)
            err = text.strip().splitlines()
    assert_one_line_naming(err, str(out), "output folder is not writable")
    assert code == 1
    assert blocker.read_text() == "" and not any(tmp_path.glob("ro/*"))


# --------------------------------------------------------------------------------------------
# extra files next to good cases: ignored, the case still runs (exit 0)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_case(tmp_path_factory) -> Path:
    """One small simulated case (dataset layout): the images have a realistic iUS field of view."""
    data = tmp_path_factory.mktemp("sim")
    simulate_dataset(data, 1, seed=2, shape=64, spacing=2.25, progress=False)
    return data


def _litter(folder: Path) -> None:
    """Files a real case folder picks up: notes, OS metadata, someone else's json, a folder."""
    (folder / "README.txt").write_text("pre-op MR and post-resection iUS\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._ReMIND2Reg_0001_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    (folder / "notes.json").write_text('{"surgeon": "x"}')
    (folder / "scan_params.csv").write_text("a,b\n1,2\n")
    (folder / "old_runs").mkdir()
    (folder / "old_runs" / "ReMIND2Reg_0001_0001.nii.gz").write_bytes(b"")


def test_extra_files_are_ignored(sim_case, tmp_path, capsys):
    """Flat layout, the default method's affine stage: litter (and an old field of ours, as when
    --output was --input) is ignored silently; a bad case beside it is named; the good case runs."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for tag in ("0000", "0001"):
        shutil.copy(sim_case / "imagesTr" / f"ReMIND2Reg_0001_{tag}.nii.gz", inp)
    _litter(inp)
    (inp / GOOD_FIELD).write_bytes(b"an old field of ours")
    name, reason = _truncated_gzip(inp)
    code, err = run(inp, out, capsys, "--stages", "affine", "--modality", "t1")
    assert_one_line_naming(err, name, reason)
    assert tree(out) == [GOOD_FIELD] and code == 1


def test_extra_files_grand_challenge_and_foreign_dataset_json(tmp_path, capsys):
    """Litter in the grand-challenge folders is ignored silently; a ``*dataset*.json`` that is not a
    Learn2Reg one gives a warning line (not an error) and the cases are paired by name."""
    img = tmp_path / "gc" / "images"
    save_volume(img / "fixed" / "a.mha", Volume(smooth_volume(SHAPE, seed=1), AFF))
    save_volume(img / "moving" / "a.mha", Volume(smooth_volume(SHAPE, seed=2), AFF))
    for sub in ("fixed", "moving"):
        (img / sub / ".DS_Store").write_bytes(b"\x00")
        (img / sub / "._a.mha").write_bytes(b"\x00\x05\x16\x07")
        (img / sub / "README.txt").write_text("x")
    code, err = run(tmp_path / "gc", tmp_path / "gc_out", capsys)
    assert (code, err) == (0, []) and tree(tmp_path / "gc_out") == ["images/displacement-field/a.mha"]

    ds = tmp_path / "ds"
    good_case(ds / "imagesTr")
    _litter(ds / "imagesTr")
    (ds / "old_dataset_list.json").write_text("[1, 2, 3]")
    code, err = run(ds, tmp_path / "ds_out", capsys)
    assert code == 0 and tree(tmp_path / "ds_out") == [GOOD_FIELD]
    assert len(err) == 1 and err[0].startswith("warning: ") and "old_dataset_list.json" in err[0], err


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
def test_same_inputs_give_the_same_field_bytes(sim_case, tmp_path, capsys):
    """The full default method (style, affine, deform + refine, guard) twice: byte-identical fields.

    Nothing had to be fixed. Measured on the 64^3 case: the style generator, the SynthMorph
    prediction and the Adam refinement give bit-identical arrays with 1 and 2 torch CPU threads
    (no random numbers are drawn at inference; every module is in eval mode); reg_aladin gives
    bit-identical matrices with -omp 1, 2 and 4 and on repeats; the affine grid's results are
    collected in share order, not completion order. The gzip header has no time stamp or file
    name (nibabel writes mtime 0 and an empty name), see ``test_field_file_bytes_do_not_depend_on_time``.
    """
    from brainshift.fields import read_field

    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        code, err = run(sim_case, out, capsys, "--method", "brainshift", "--modality", "t1")
        assert (code, err) == (0, [])
    a, b = (read_field(out / GOOD_FIELD) for out in outs)
    assert np.array_equal(a, b) and np.abs(a).max() > 0.5    # a real (non-trivial) field, twice
    assert (outs[0] / GOOD_FIELD).read_bytes() == (outs[1] / GOOD_FIELD).read_bytes()


@pytest.mark.parametrize("name", ["disp.nii.gz", "disp.mha"])
def test_field_file_bytes_do_not_depend_on_time(name, tmp_path, monkeypatch):
    """The written bytes carry no clock time and no (temporary) file name."""
    import time

    from brainshift.fields import write_field

    disp = np.random.default_rng(0).normal(size=SHAPE + (3,)).astype(np.float32)
    clock = iter([1.0e9, 2.0e9])
    paths = []
    for folder in ("a", "b"):
        now = next(clock)
        monkeypatch.setattr(time, "time", lambda: now)
        paths.append(write_field(tmp_path / folder / name, disp, AFF))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_written_files_are_readable_by_others(tmp_path):
    """Atomic writes go through mkstemp (mode 0o600); the final file has the umask's usual mode."""
    from brainshift.fields import write_field
    from brainshift.io import _UMASK

    path = write_field(tmp_path / "disp.nii.gz", np.zeros(SHAPE + (3,), np.float32), AFF)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_UMASK
