"""Deformable stage: SynthMorph inside the iUS field of view, a large-displacement search, instance
refinement, a guard.

One module per step: :mod:`.synthmorph` (loading the trained network, prediction), :mod:`.discrete`
(large-displacement search), :mod:`.refine` (instance optimisation), :mod:`.guard` (keep or reject),
:mod:`.grid` (crop geometry, tensor helpers). The network's own modules: :mod:`.network` (designs),
:mod:`.synthetic` (training pairs and their metrics), :mod:`.train` (the trainer), :mod:`.evaluate`
(held-out numbers, learning curves). The pipeline runs them in that order: network, then the discrete search
on what the network left (composed after it), then the refinement from that field, then the guard.

Conventions (as :mod:`brainshift.fields`): every field here is a **voxel pull field on the fixed
grid**, shape ``fixed.shape + (3,)``, float32: the voxel of the (affinely pre-aligned) moving image
that corresponds to fixed voxel ``p`` is ``p + disp[p]``. The moving input is the MR *after* the
affine stage, already resampled onto the fixed grid, so the deformable field relates the fixed
grid to that intermediate image; the lead composes ``fields.compose(deform_field, affine_field)``.

* :func:`predict_field` — the paper's SynthMorph step: crop both images to the iUS mask's bounding
  box (+ margin), normalise, resize (isotropically, as a cube) to the model's working shape,
  predict a stationary velocity field (SVF), bring the SVF back to the crop grid (vectors scaled by
  the resize factor: voxel units), multiply it by a smooth taper that is 1 on the mask's bounding box
  and 0 at the crop edge, and integrate it (scaling and squaring) on the crop grid. Tapering the
  *velocity* rather than the displacement keeps the result diffeomorphic, and the field is exactly
  zero outside the crop (no deformation is estimated outside the iUS).
* :func:`refine_field` — instance optimisation (beyond the paper): Adam on a displacement
  correction, coarse to fine, SSC-descriptor MSE inside the mask + diffusion regularisation.
* :func:`discrete_field` — large-displacement search (beyond the paper, after ConvexAdam): an SSC
  cost volume over every integer shift up to ``search_mm``, coupled convex optimisation per 4 mm
  control point; recovers 5-10 mm local collapse, as the ``init`` of :func:`refine_field`.
* :func:`guard` — keep a deformable result only if SSC-MSE inside the mask improves (by 5% for a
  field fitted on the case's SSC, at all for the network alone),
  LC2 against the raw iUS (a similarity no step optimises) agrees, the discrete search run backward
  finds the same shift (:func:`inverse_consistency`), and the field is plausible (no folds, SDlogJ
  and maximum displacement under bounds).
"""
from __future__ import annotations

from .. import model_dir
from .discrete import discrete_field
from .grid import Crop, extract, insert, mask_crop, normalise, taper
from .guard import GuardDecision, guard, inverse_consistency
from .refine import refine_field
from .synthmorph import SynthMorphModel, available_models, card, load_model, predict_field

__all__ = ["Crop", "GuardDecision", "SynthMorphModel", "available_models", "card", "discrete_field", "extract", "guard", "inverse_consistency",
           "insert", "load_model", "mask_crop", "model_dir", "normalise", "predict_field", "refine_field", "taper"]
