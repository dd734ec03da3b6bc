"""Coarse stage: affine/rigid registration with NiftyReg's block matching (reg_aladin).

All matrices: NiftyReg convention, fixed (iUS) world -> moving (MR) world, RAS mm.
"""
from __future__ import annotations

import numpy as np

from .io import Volume
from .niftyreg import AladinOptions, reg_aladin

#: The ReMIND2Reg organisers' NiftyReg baseline, restricted to a rigid transform: masks from
#: image > 0, no symmetric version, header initialisation (the images share one grid), 2 levels.
OFFICIAL_RIGID = AladinOptions(rigid_only=True, symmetric=False, header_init=True, levels=2, levels_to_perform=2)


def official_rigid_baseline(fixed: Volume, moving: Volume, threads: int | None = None) -> np.ndarray:
    """World matrix (fixed -> moving, RAS mm) of the official rigid baseline (``niftyreg-rigid``)."""
    opts = OFFICIAL_RIGID if threads is None else AladinOptions(**{**OFFICIAL_RIGID.__dict__, "threads": threads})
    return reg_aladin(fixed, moving, opts, fixed_mask=fixed.data > 0, moving_mask=moving.data > 0)
