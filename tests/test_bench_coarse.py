"""bench-coarse: its TRE of a matrix is the official one, and its tables report what was picked."""
from __future__ import annotations

import numpy as np
from conftest import oblique_affine

from brainshift.bench_coarse import markdown, matrix_tre
from brainshift.fields import matrix_to_field
from brainshift.metrics import tre


def test_matrix_tre_is_the_official_formula_on_oblique_grids():
    fa = oblique_affine(spacing=(0.5, 0.5, 0.5), degrees=(10, -5, 20), origin=(-30, 20, 5))
    ma = oblique_affine(spacing=(0.6, 0.5, 0.7), degrees=(-3, 8, 2), origin=(-28, 22, 4))
    m = np.eye(4)
    m[:3, :3] = np.diag([1.05, 0.97, 1.1])
    m[:3, 3] = (2.0, -3.0, 1.5)
    rng = np.random.default_rng(0)
    fl = rng.uniform(8, 24, size=(12, 3))
    ml = fl + rng.normal(0, 2, size=fl.shape)
    shape = (32, 32, 32)
    spacing = np.sqrt((ma[:3, :3] ** 2).sum(axis=0))
    official = tre(matrix_to_field(m, fa, ma, shape), fl, ml, spacing)
    assert abs(matrix_tre(m, fa, ma, fl, ml, spacing) - official.mean()) < 1e-4


def test_markdown_names_the_picks_and_the_regret():
    cand = {"name": "ius/rigid/pi50/identity", "tre": 2.0, "scores": {"ssc": 0.15, "lc2": 0.3}, "seconds": 3.0,
            "rejected": None}
    bad = {**cand, "name": "ius/affine/pi30/search", "tre": None, "scores": {"ssc": None, "lc2": None},
           "rejected": "determinant 3 outside [0.5, 2.0]"}
    row = {"case": "0001_0000<--0001_0001", "tre_identity": 6.0, "tre_niftyreg_rigid": 3.0, "tre_stage": 2.0,
           "kept_name": cand["name"], "tre_best": 2.0, "stage_seconds": 30.0, "rigid_seconds": 20.0,
           "picks": {"lc2": {"name": cand["name"], "tre": 2.0, "regret": 0.0},
                     "ssc": {"name": cand["name"], "tre": 2.0, "regret": 0.0}},
           "candidates": [cand, bad], "notes": ["kept ius/rigid/pi50/identity"]}
    text = markdown({"cases_dir": "/data", "criterion": "ssc", "created": "now", "rows": [row]})
    assert "better than niftyreg-rigid on 1/1" in text and "determinant 3 outside" in text
    assert "| ius/affine/pi30/search | - |" in text
