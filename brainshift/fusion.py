"""Fused T1 + T2 result for a case that has both pre-operative MR images (``--fuse``; beyond the paper).

ReMIND2Reg gives each case a ceT1 (``_0001``) and a T2 (``_0002``) that were acquired in one session
and share world (RAS mm) coordinates. Registering each to the iUS gives two pull fields for the same
brain shift; they can disagree where one contrast shows the resection cavity or the sulci better.

Both fields are first written in **the same terms**: a voxel pull field on the fixed (iUS) grid that
indexes the **T1 grid** (``q_t1 = p + u[p]``). A field indexing the T2 grid is converted exactly,
``q_t1 = inv(A_t1) A_t2 (p + u_t2[p])`` (the two images' affines; no resampling).

Rules (measured in docs/MEASUREMENTS.md):

* ``average``: the mean of the two displacement fields (in T1 voxel terms).
* ``vote``: of the candidates {T1's field, T2's field, their average}, the one under which **both**
  MR images match the raw iUS best: lowest ``SSC-MSE(iUS, T1 o f) + SSC-MSE(iUS, T2 o f)`` inside
  the iUS mask. Each candidate is judged by the same two images, so the contrasts' different
  SSC levels do not bias the choice.

The fused field is written for both pairs (converted to each moving image's grid), replacing the
single-modality fields.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import fields
from .io import Case, Volume, load_volume

RULES = ("average", "vote")


def convert_field(disp: np.ndarray, from_affine: np.ndarray, to_affine: np.ndarray) -> np.ndarray:
    """Re-express a pull field indexing one moving grid (``from_affine``) so it indexes another.

    Both grids must share world coordinates (co-registered images). ``disp``: (X,Y,Z,3) voxels on the
    fixed grid; returns the field ``u'`` with ``p + u'[p] = inv(to) @ from @ (p + u[p])``.
    """
    m = np.linalg.inv(to_affine) @ from_affine
    if np.allclose(m, np.eye(4), atol=1e-6):
        return disp.astype(np.float32, copy=True)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in disp.shape[:3]], indexing="ij"), -1)
    q = grid + disp
    q_new = q @ m[:3, :3].T.astype(np.float32) + m[:3, 3].astype(np.float32)
    return (q_new - grid).astype(np.float32)


def fuse(fixed: Volume, t1: Volume, t2: Volume, disp_t1: np.ndarray, disp_t2: np.ndarray, rule: str = "vote",
         mask: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Fuse the T1 and T2 pull fields of one case; return the fused field **indexing the T1 grid** and a record.

    ``disp_t1`` indexes the T1 grid, ``disp_t2`` the T2 grid (both voxel pull fields on the fixed grid).
    ``mask``: iUS field of view (default ``fixed > 0``).
    """
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; choose from {', '.join(RULES)}")
    u2 = convert_field(disp_t2, t2.affine, t1.affine)
    candidates = {"average": 0.5 * (disp_t1 + u2)}
    if rule == "average":
        return candidates["average"].astype(np.float32), {"rule": rule, "chosen": "average"}
    from .ssc import ssc_mse

    candidates = {"t1": disp_t1, "t2": u2, **candidates}
    mask = fixed.data > 0 if mask is None else mask
    to_t2 = np.linalg.inv(t2.affine) @ t1.affine
    scores = {}
    for name, u in candidates.items():
        s1 = ssc_mse(fixed.data, fields.warp(t1.data, u), mask)
        s2 = ssc_mse(fixed.data, fields.warp(t2.data, convert_field(u, t1.affine, t2.affine)
                                             if not np.allclose(to_t2, np.eye(4)) else u), mask)
        scores[name] = float(s1 + s2)
    chosen = min(scores, key=scores.get)
    return candidates[chosen].astype(np.float32), {"rule": rule, "chosen": chosen, "ssc_sum": scores}


def pairs_by_case(cases: list[Case]) -> dict[str, tuple[Case, Case]]:
    """``{case_id: (t1 case, t2 case)}`` for every case with both a ceT1 and a T2 pair."""
    by_id: dict[str, dict[str, Case]] = {}
    for c in cases:
        by_id.setdefault(c.case_id, {})[c.modality] = c
    return {k: (v["t1"], v["t2"]) for k, v in by_id.items() if "t1" in v and "t2" in v}


def fuse_folder(cases: list[Case], out_dir: str | os.PathLike, rule: str = "vote") -> tuple[list[dict], list[str]]:
    """Fuse the written T1 and T2 fields of every case that has both; rewrite both fields atomically.

    Cases with only one modality, or whose T1 or T2 field is missing (a failed run), are left as
    they are. Returns (records, error lines naming the file).
    """
    out = Path(out_dir)
    records, errors = [], []
    for case_id, (c1, c2) in pairs_by_case(cases).items():
        p1, p2 = out / c1.output_name, out / c2.output_name
        if not (p1.is_file() and p2.is_file()):
            continue
        try:
            fixed, t1, t2 = load_volume(c1.fixed), load_volume(c1.moving), load_volume(c2.moving)
            mask = load_volume(c1.fixed_mask).data > 0 if c1.fixed_mask is not None else None
            fused, record = fuse(fixed, t1, t2, fields.read_field(p1), fields.read_field(p2), rule, mask)
            fields.write_field(p1, fused, t1.affine)
            fields.write_field(p2, convert_field(fused, t1.affine, t2.affine), t2.affine)
            records.append({"case": case_id, **record})
        except Exception as exc:  # one case's failure never stops the others
            errors.append(f"{case_id}: fusing {p1.name} and {p2.name}: {type(exc).__name__}: {exc}")
    return records, errors
