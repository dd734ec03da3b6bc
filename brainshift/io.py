"""Reading images and landmarks, and finding (fixed iUS, moving MR) pairs in an input folder.

Conventions used everywhere in brainshift:

* A :class:`Volume` holds ``data`` indexed ``[i, j, k]`` (NIfTI voxel order, *not* SimpleITK's
  ``[k, j, i]``) and ``affine``, the 4x4 matrix from voxel index to world millimetres in RAS, as
  nibabel reports it (sform if set, else qform). ``.mha`` files (LPS world) are converted to this
  on read and back on write.
* The fixed image is always the intra-operative ultrasound (``_0000``); the moving image is the
  pre-operative MR (``_0001`` ceT1, ``_0002`` T2). The fixed grid defines the output grid.
* Landmarks are ``(N, 3)`` voxel coordinates in ``[i, j, k]`` order (official ReMIND2Reg csv:
  comma separated, no header).

Three input layouts are accepted (see :func:`discover_cases`):

* flat challenge layout: ``DIR/ReMIND2Reg_XXXX_0000.nii.gz`` + ``_0001`` and/or ``_0002``;
* dataset layout: ``DIR/imagesTr/...`` (+ ``landmarksTr/``, optional ``ReMIND2Reg_dataset.json``);
* grand-challenge layout: ``DIR/images/fixed/*.mha``, ``DIR/images/moving/*.mha``, optional
  ``images/fixed-mask/`` and ``images/moving-mask/``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # flips x and y: ITK's LPS world <-> NIfTI's RAS world
MODALITY_OF_TAG = {"0001": "t1", "0002": "t2"}
TAG_OF_MODALITY = {"t1": "0001", "t2": "0002"}
_NAME = re.compile(r"^(?P<prefix>.+)_(?P<case>\d{4})_(?P<tag>\d{4})\.nii(\.gz)?$")
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)          # ... and put back at once
_OUTPUT_NAME = re.compile(r"^disp_\d{4}_\d{4}_\d{4}_\d{4}\.nii(\.gz)?$")  # fields we write (output = input)
_OTHER_IMAGE = (".mha", ".mhd", ".nrrd", ".nhdr", ".img", ".hdr")  # images the flat layout does not read


class InputError(Exception):
    """A problem with one input file; the message names the file and the reason."""


def one_line(text: str, limit: int = 300) -> str:
    """Collapse a (library) message to one line of at most ``limit`` characters, for stderr."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Volume:
    """A 3D image: ``data[i, j, k]`` (float32) and ``affine`` (4x4, voxel index -> RAS mm)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def like(self, data: np.ndarray) -> "Volume":
        """Same grid, other voxels."""
        return Volume(np.asarray(data, dtype=np.float32), self.affine.copy())


@dataclass
class Case:
    """One registration pair. Paths are absolute; landmark/mask paths are None when absent."""

    case_id: str                     # '0001' (ReMIND2Reg) or the file stem (grand-challenge)
    fixed: Path                      # iUS
    moving: Path                     # MR
    modality: str                    # 't1', 't2' or 'mr' (unknown, grand-challenge layout)
    output_name: str                 # relative path of the field inside the output folder
    fixed_tag: str = "0000"
    moving_tag: str = "0001"
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None

    @property
    def pair_name(self) -> str:
        """Key used in metrics.json, as in the official evaluation: 'XXXX_0000<--XXXX_0001'."""
        return f"{self.case_id}_{self.fixed_tag}<--{self.case_id}_{self.moving_tag}"


@dataclass
class Discovery:
    """What :func:`discover_cases` found: the cases, one message per file it could not use
    (``problems``: the run exits 1), and notes on files it ignored but the user may care about
    (``warnings``: e.g. a dataset json it could not use; the run still exits 0)."""

    cases: list[Case] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def load_volume(path: str | os.PathLike) -> Volume:
    """Read a ``.nii``/``.nii.gz`` (nibabel) or ``.mha``/``.nrrd`` (SimpleITK) scalar volume.

    Raises :class:`InputError` naming the file for a missing, empty, unreadable or non-3D file, a
    NIfTI holding more voxel data than its header's shape (e.g. 4D data under a 3D header), or one
    with NaN/Inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    extra = 0  # bytes of voxel data the header does not account for (NIfTI only)
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
            affine = np.asarray(img.affine, dtype=np.float64)
            extra = _nifti_extra_bytes(path, img)
        else:
            data, affine = _read_itk(path)
    except Exception as exc:  # nibabel/SimpleITK raise many types for corrupt files
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {one_line(str(exc))})") from exc
    if extra > 0:
        raise InputError(f"{path}: the header says shape {data.shape} but the file holds {extra} more bytes "
                         "of voxel data (a 4D image under a 3D header?)")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D image, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: contains NaN or Inf voxels")
    return Volume(data, affine)


def _nifti_extra_bytes(path: Path, img) -> int:
    """Bytes of voxel data beyond what the NIfTI header's shape accounts for (0 when they agree).

    ``.nii``: from the file size; ``.nii.gz``: from the gzip trailer (uncompressed size mod 2^32 of the
    last member), checked only below 4 GiB; a multi-member gzip can only under-count, never flag.
    """
    hdr = img.header
    offset = int(getattr(img.dataobj, "offset", hdr["vox_offset"]))
    expected = offset + int(np.prod(hdr.get_data_shape(), dtype=np.int64)) * hdr.get_data_dtype().itemsize
    if path.name.endswith(".nii"):
        return max(0, path.stat().st_size - expected)
    if expected >= 2 ** 32:
        return 0
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        stored = int.from_bytes(fh.read(4), "little")
    return max(0, stored - expected)


def save_volume(path: str | os.PathLike, vol: Volume) -> Path:
    """Write a volume (NIfTI with sform = qform = affine, code 1; or .mha), atomically."""
    return _atomic_write(Path(path), lambda tmp: _write_image(tmp, vol.data, vol.affine))


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)                      # [k, j, i] (+ components)
    arr = np.transpose(arr, (2, 1, 0) + tuple(range(3, arr.ndim))).astype(np.float32)
    return arr, _itk_affine(img)


def _itk_affine(img) -> np.ndarray:
    """Voxel index (i, j, k) -> RAS mm for a SimpleITK image (which stores LPS geometry)."""
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return LPS_RAS @ lps


def _write_image(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write an image of shape (X,Y,Z) or a vector image (X,Y,Z,C) on a grid with ``affine``."""
    name = path.name
    if name.endswith((".nii", ".nii.gz")):
        img = nib.Nifti1Image(np.asarray(data), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(path))
        return
    import SimpleITK as sitk

    sitk.WriteImage(itk_image(data, affine), str(path), useCompression=True)


def itk_image(data: np.ndarray, affine: np.ndarray):
    """SimpleITK image of an (X,Y,Z) array or an (X,Y,Z,C) vector array on the grid ``affine``
    (voxel -> RAS mm); SimpleITK stores the geometry in LPS."""
    import SimpleITK as sitk

    arr = np.asarray(data)
    vector = arr.ndim == 4
    itk = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0, 3) if vector else (2, 1, 0)), isVector=vector)
    lps = LPS_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    itk.SetSpacing(spacing.tolist())
    itk.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    itk.SetOrigin(lps[:3, 3].tolist())
    return itk


def _atomic_write(path: Path, writer) -> Path:
    """Call ``writer(tmp_path)`` then rename onto ``path``: a reader never sees a partial file.

    The file gets the usual mode of a new file (0o666 minus the umask), not mkstemp's private 0o600,
    so that another user (e.g. the challenge's evaluation reading a container's /output) can read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_ready(x):
    """Nested JSON-ready copy: numpy -> Python, NaN / inf -> None, dict keys -> str."""
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_ready(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def write_json(path: str | os.PathLike, payload, indent: int | None = None) -> Path:
    """Write ``payload`` as JSON atomically; numpy arrays and scalars become lists and numbers, other
    unknown objects their ``str``."""
    text = json.dumps(payload, indent=indent, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


# --------------------------------------------------------------------------------------------
# landmarks
# --------------------------------------------------------------------------------------------
def load_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Read an official landmark csv: one ``i,j,k`` voxel coordinate per line, no header."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: landmark file not found")
    try:
        lms = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{path}: not a comma-separated table of numbers ({exc})") from exc
    if lms.shape[0] == 0:
        raise InputError(f"{path}: no landmarks")
    if lms.shape[1] != 3:
        raise InputError(f"{path}: landmark file has {lms.shape[1]} columns, expected 3 (i,j,k voxel)")
    if not np.isfinite(lms).all():
        raise InputError(f"{path}: landmark file contains NaN or Inf")
    return lms


def save_landmarks(path: str | os.PathLike, lms: np.ndarray) -> Path:
    """Write landmarks in the official csv format (voxel coordinates, no header), atomically."""
    lms = np.asarray(lms, dtype=np.float64).reshape(-1, 3)
    return _atomic_write(Path(path), lambda tmp: np.savetxt(tmp, lms, delimiter=",", fmt="%.6f"))


# --------------------------------------------------------------------------------------------
# case discovery
# --------------------------------------------------------------------------------------------
def discover_cases(root: str | os.PathLike, modality: str = "both") -> Discovery:
    """Find every (fixed iUS, moving MR) pair under ``root`` in any of the three layouts.

    ``modality`` is 't1', 't2' or 'both' (ReMIND2Reg layouts; the grand-challenge layout has no
    modality tag and is always used). Files that cannot form a pair (a moving image without its
    fixed image, a name that does not follow the convention) are reported in ``problems``.
    """
    if modality not in ("t1", "t2", "both"):
        raise ValueError(f"modality must be t1, t2 or both, not {modality!r}")
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: input folder not found")
    if (root / "images" / "fixed").is_dir():
        return _discover_grand_challenge(root)
    for sub in ("imagesTr", "imagesVal", "imagesTs"):
        if (root / sub).is_dir():
            return _discover_dataset(root, modality)
    return _discover_flat(root, root, modality)


def _landmark_dirs(root: Path) -> list[Path]:
    return [root / d for d in ("landmarks", "landmarksTr", "landmarksVal", "landmarksTs") if (root / d).is_dir()]


def _find_landmarks(root: Path, stem: str) -> Path | None:
    for d in _landmark_dirs(root):
        if (d / f"{stem}.csv").is_file():
            return d / f"{stem}.csv"
    return None


def _make_case(root: Path, fixed: Path, moving: Path, case_id: str, tag: str) -> Case:
    return Case(
        case_id=case_id,
        fixed=fixed,
        moving=moving,
        modality=MODALITY_OF_TAG.get(tag, "mr"),
        output_name=f"disp_{case_id}_0000_{case_id}_{tag}.nii.gz",
        moving_tag=tag,
        fixed_landmarks=_find_landmarks(root, _stem(fixed)),
        moving_landmarks=_find_landmarks(root, _stem(moving)),
    )


def _stem(path: Path) -> str:
    return path.name.split(".nii")[0]


def _wanted(tag: str, modality: str) -> bool:
    return modality == "both" or MODALITY_OF_TAG.get(tag) == modality


def _discover_flat(root: Path, image_dir: Path, modality: str) -> Discovery:
    """ReMIND2Reg naming: ``<prefix>_XXXX_0000.nii.gz`` fixed, ``_0001``/``_0002`` moving."""
    found = Discovery()
    by_case: dict[str, dict[str, Path]] = {}
    for path in sorted(image_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir() or _OUTPUT_NAME.match(path.name):
            continue  # hidden files (.DS_Store, ._* AppleDouble, our temp files), folders, our own fields
        if path.name.lower().endswith(_OTHER_IMAGE):
            found.problems.append(f"{path}: this layout reads NIfTI images only (<prefix>_XXXX_000M.nii.gz); skipped")
            continue
        if not path.name.endswith((".nii", ".nii.gz")):
            continue  # unrelated files (csv, json, txt, readme) are ignored
        m = _NAME.match(path.name)
        if m is None or m["tag"] not in ("0000", "0001", "0002"):
            found.problems.append(f"{path}: name does not follow <prefix>_XXXX_000M.nii.gz (M = 0, 1 or 2); skipped")
            continue
        files = by_case.setdefault(m["case"], {})
        if m["tag"] in files:
            found.problems.append(f"{path}: same case and image number as {files[m['tag']].name}; skipped")
            continue
        files[m["tag"]] = path
    for case_id, files in sorted(by_case.items()):
        movings = [t for t in ("0001", "0002") if t in files and _wanted(t, modality)]
        if "0000" not in files:
            for t in movings:
                found.problems.append(f"{files[t]}: moving image without its fixed image {case_id}_0000; skipped")
            continue
        if not any(t in files for t in ("0001", "0002")):
            found.problems.append(f"{files['0000']}: fixed image without any moving image (_0001 or _0002); skipped")
        for t in movings:
            found.cases.append(_make_case(root, files["0000"], files[t], case_id, t))
    return found


def _discover_dataset(root: Path, modality: str) -> Discovery:
    """Dataset layout; pairs come from ``*_dataset.json`` when it lists them, else from the names.

    A json that cannot be read or lists no usable pair is ignored with a warning (pairing by name).
    """
    jsons = sorted(root.glob("*dataset*.json"), key=lambda p: (p.name != "ReMIND2Reg_dataset.json", p.name))
    pairs: list[tuple[Path, Path]] = []
    warnings: list[str] = []
    for js in jsons:
        pairs, why = _json_pairs(root, js)
        if pairs:
            break
        warnings.append(f"{js}: {why}; ignored")
    if not pairs:  # no json or no pairs listed: pair by file name in every images* folder
        found = Discovery(warnings=warnings)
        for sub in ("imagesTr", "imagesVal", "imagesTs"):
            if (root / sub).is_dir():
                part = _discover_flat(root, root / sub, modality)
                found.cases += part.cases
                found.problems += part.problems
        return found
    found = Discovery()
    seen: set[tuple[Path, Path]] = set()
    for fixed, moving in pairs:
        if (fixed, moving) in seen:
            continue
        seen.add((fixed, moving))
        m = _NAME.match(moving.name)
        if m is None:
            found.problems.append(f"{moving}: name does not follow <prefix>_XXXX_000M.nii.gz; skipped")
            continue
        if not _wanted(m["tag"], modality):
            continue
        if not fixed.is_file():
            found.problems.append(f"{moving}: moving image without its fixed image {fixed.name}; skipped")
            continue
        found.cases.append(_make_case(root, fixed, moving, m["case"], m["tag"]))
    return found


def _json_pairs(root: Path, path: Path) -> tuple[list[tuple[Path, Path]], str]:
    """(fixed, moving) pairs listed in a Learn2Reg dataset json, or ([], why not)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [], f"cannot read dataset json ({one_line(str(exc))})"
    if not isinstance(meta, dict):
        return [], "not a Learn2Reg dataset json (not a JSON object)"
    pairs = []
    for key in ("registration_val", "registration_test", "training_paired_images", "eval_pairs"):
        listed = meta.get(key)
        for p in listed if isinstance(listed, list) else []:
            if isinstance(p, dict) and isinstance(p.get("fixed"), str) and isinstance(p.get("moving"), str):
                pairs.append(((root / p["fixed"]).resolve(), (root / p["moving"]).resolve()))
    return pairs, "lists no (fixed, moving) pair"


def _discover_grand_challenge(root: Path) -> Discovery:
    """``images/fixed/*.mha`` with ``images/moving/*.mha``; matched by name, else the only pair."""
    found = Discovery()
    img = root / "images"
    exts = (".mha", ".nii.gz", ".nii", ".nrrd")
    fixed = _images_in(img / "fixed", exts)
    moving = _images_in(img / "moving", exts)
    if not fixed:
        return Discovery(problems=[f"{img / 'fixed'}: no fixed image"])
    if not moving:
        return Discovery(problems=[f"{img / 'moving'}: no moving image"])

    def mask_for(sub: str, image: Path) -> Path | None:
        d = img / sub
        if not d.is_dir():
            return None
        masks = _images_in(d, exts)
        same = [p for p in masks if p.name == image.name]
        return same[0] if same else (masks[0] if len(masks) == 1 else None)

    names_f = {p.name: p for p in fixed}
    if len(fixed) == 1 and len(moving) == 1:
        matched = [(fixed[0], moving[0])]
    else:
        matched = [(names_f[m.name], m) for m in moving if m.name in names_f]
        for m in moving:
            if m.name not in names_f:
                found.problems.append(f"{m}: moving image without a fixed image of the same name; skipped")
    for f, m in matched:
        stem = m.name.split(".")[0]
        found.cases.append(Case(
            case_id=stem, fixed=f, moving=m, modality="mr", fixed_tag="fixed", moving_tag="moving",
            output_name=f"images/displacement-field/{stem}.mha",
            fixed_mask=mask_for("fixed-mask", f), moving_mask=mask_for("moving-mask", m),
        ))
    return found


def _images_in(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    """Image files of a grand-challenge folder, sorted; hidden files (.DS_Store, ._x.mha) are skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(exts) and not p.name.startswith(".") and p.is_file())
