"""Thin wrapper around the official NiftyReg binaries (built from PyPI's ``niftyreg`` source package).

Binaries are looked up in ``$BRAINSHIFT_NIFTYREG_BIN``, then in ``site-packages/niftyreg/bin``,
then on ``PATH``. Volumes are written to a private temporary folder as NIfTI (sform = qform = the
volume's affine), so NiftyReg sees exactly the geometry brainshift sees.

Matrices returned are in NiftyReg's convention: reference (fixed) world -> floating (moving)
world, RAS mm (see :mod:`brainshift.fields`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import Volume, save_volume


class NiftyRegError(RuntimeError):
    """A NiftyReg binary is missing or failed; the message carries the end of its output."""


def binary(name: str) -> str:
    """Absolute path of a NiftyReg executable such as ``reg_aladin``."""
    candidates = []
    if os.environ.get("BRAINSHIFT_NIFTYREG_BIN"):
        candidates.append(Path(os.environ["BRAINSHIFT_NIFTYREG_BIN"]) / name)
    try:
        import niftyreg  # the PyPI package: only its bin/ folder is used

        candidates.append(Path(niftyreg.__file__).parent / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise NiftyRegError(f"NiftyReg binary {name!r} not found: install with "
                        "`CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install niftyreg` or set BRAINSHIFT_NIFTYREG_BIN")


@dataclass
class AladinOptions:
    """reg_aladin settings; ``None`` leaves NiftyReg's default. See ``reg_aladin -h``."""

    rigid_only: bool = False      # -rigOnly
    symmetric: bool = True        # False adds -noSym
    levels: int = 3               # -ln
    levels_to_perform: int | None = None  # -lp
    percent_blocks: float | None = None   # -pv, share of highest-variance blocks used
    percent_inliers: float | None = None  # -pi, LTS share of inlier blocks kept
    header_init: bool = False     # -nac: start from the headers instead of the image centres
    max_iterations: int | None = None     # -maxit per level
    threads: int | None = None    # -omp
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        a: list[str] = []
        if self.rigid_only:
            a.append("-rigOnly")
        if not self.symmetric:
            a.append("-noSym")
        a += ["-ln", str(self.levels)]
        if self.levels_to_perform is not None:
            a += ["-lp", str(self.levels_to_perform)]
        if self.percent_blocks is not None:
            a += ["-pv", f"{self.percent_blocks:g}"]
        if self.percent_inliers is not None:
            a += ["-pi", f"{self.percent_inliers:g}"]
        if self.header_init:
            a.append("-nac")
        if self.max_iterations is not None:
            a += ["-maxit", str(self.max_iterations)]
        if self.threads is not None:
            a += ["-omp", str(self.threads)]
        return a + list(self.extra)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise NiftyRegError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): " + " | ".join(tail))
    return proc.stdout


def run_aladin(ref: Path, flo: Path, aff: Path, options: AladinOptions, rmask: Path | None = None,
               fmask: Path | None = None, init: np.ndarray | None = None) -> np.ndarray:
    """reg_aladin on images already written (``ref`` = fixed, ``flo`` = moving); the matrix goes to ``aff``.

    For callers that run many registrations on the same images (the affine stage's grid). ``init``
    is a starting world matrix (``-inaff``). Returns the 4x4 world matrix, fixed -> moving.
    """
    cmd = [binary("reg_aladin"), "-ref", str(ref), "-flo", str(flo), "-aff", str(aff),
           "-res", str(aff.with_suffix(".res.nii")), "-voff"]
    if rmask is not None:
        cmd += ["-rmask", str(rmask)]
    if fmask is not None:
        cmd += ["-fmask", str(fmask)]
    if init is not None:
        init_path = aff.with_suffix(".init.txt")
        np.savetxt(init_path, np.asarray(init, dtype=np.float64))
        cmd += ["-inaff", str(init_path)]
    _run(cmd + options.args())
    matrix = np.loadtxt(aff)
    if matrix.shape != (4, 4):
        raise NiftyRegError(f"reg_aladin wrote a {matrix.shape} matrix")
    return matrix


def reg_aladin(fixed: Volume, moving: Volume, options: AladinOptions,
               fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
               init: np.ndarray | None = None) -> np.ndarray:
    """Run reg_aladin (fixed = -ref, moving = -flo); return the 4x4 world matrix (fixed -> moving).

    Masks are boolean arrays on each image's own grid. ``init`` is a starting world matrix in the
    same convention (``-inaff``).
    """
    with tempfile.TemporaryDirectory(prefix="brainshift_aladin_") as tmp:
        t = Path(tmp)
        rmask = fmask = None
        if fixed_mask is not None:
            rmask = save_volume(t / "rmask.nii.gz", fixed.like(fixed_mask.astype(np.float32)))
        if moving_mask is not None:
            fmask = save_volume(t / "fmask.nii.gz", moving.like(moving_mask.astype(np.float32)))
        matrix = run_aladin(save_volume(t / "ref.nii.gz", fixed), save_volume(t / "flo.nii.gz", moving),
                            t / "aff.txt", options, rmask, fmask, init)
    if not np.isfinite(matrix).all():
        raise NiftyRegError(f"reg_aladin returned an invalid matrix: {matrix!r}")
    return matrix


def reg_resample(fixed: Volume, moving: Volume, world_matrix: np.ndarray, order: int = 1) -> Volume:
    """Resample ``moving`` onto the fixed grid with a world matrix, using NiftyReg itself (reference check)."""
    with tempfile.TemporaryDirectory(prefix="brainshift_resample_") as tmp:
        t = Path(tmp)
        np.savetxt(t / "aff.txt", np.asarray(world_matrix, dtype=np.float64))
        _run([binary("reg_resample"), "-ref", str(save_volume(t / "ref.nii.gz", fixed)),
              "-flo", str(save_volume(t / "flo.nii.gz", moving)), "-trans", str(t / "aff.txt"),
              "-res", str(t / "res.nii.gz"), "-inter", str(order), "-pad", "0"])
        import nibabel as nib

        data = np.asarray(nib.load(str(t / "res.nii.gz")).dataobj, dtype=np.float32)
    return fixed.like(data)
