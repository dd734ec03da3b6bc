"""Simulated ReMIND2Reg cases: pre-op MR (ceT1 + T2, moving) and post-resection iUS (fixed) with a
known brain shift and landmarks, built from the MNI152 2009a T1/GM/WM template shipped in nilearn's
wheel (read from disk; nothing is downloaded).

Coordinates. All three images share one oblique grid ``affine`` (voxel -> RAS mm, random rotation,
isotropic ``spacing``), a cube of ``shape**3`` voxels centred near a random tumour, close to the
cortex. The pre-op world is MNI space (mm). ``truth`` is a PULL field in VOXEL units on the fixed
(iUS) grid: the iUS voxel ``p`` shows the tissue that sat at MR voxel ``p + truth[p]``. Landmarks
sit at integer fixed voxels ``f``, so ``moving = f + truth[f]`` exactly (``truth`` is rounded to
1/1024 voxel before the landmarks are derived from it, which also makes its file smaller).

The brain shift, as a pull from fixed world ``x`` (mm) to pre-op MR world::

    x1 = x + collapse(x) + sink(x) + wobble(x)      local part, intra-op space
    xm = R (x1 - c_tumour) + c_tumour + t           rigid part

Parameters drawn per case (``SimCase.params``), with ranges:

* grid: rotation 10-45 deg about a random axis; cube centre = tumour centre moved 5-20 mm deeper
  along the probe axis + up to 5 mm jitter.
* anatomy: template isotropic scale 0.93-1.07 about the cube centre + a smooth random warp (sum of
  6 random plane waves per axis, RMS 1-3 mm, wavelengths 30-80 mm).
* tumour: centre in the cerebrum (MNI z > 0, |x| > 20 mm) at 3-15 mm more than its radius below
  the brain surface; radius 8-15 mm (x ``shape*spacing/128``, capped at 1), lobulated (+-10-25 %);
  T1: necrotic core 0.25-0.5 x WM, contrast-enhancing rim 2-4 mm thick at 1.3-1.8 x WM; T2: core
  0.6-0.9 x CSF, rim 0.4-0.6 x CSF; oedema (T1 -20 %, T2 up to 0.3 x CSF) decaying over 4-10 mm.
* MR head: the whole head as in ReMIND (not skull-stripped): CSF/dura, skull (inner table, diploe, outer
  table), muscle, fat and skin outside the brain, thicknesses and levels in ``HEAD_LAYERS`` (read off
  the real ReMIND-022 ceT1/T2), drawn from their own generator ``default_rng([seed, 1])``.
* MR intensities: T1 WM level 600-1000, gamma 0.8-1.25, T2 WM 150-300 with GM 1.3-1.7 x WM and
  CSF 3-4.5 x WM; separate multiplicative bias fields (RMS 5-15 %, wavelengths 80-200 mm); Rician
  noise 1-2 % of WM (magnitude of signal + Gaussian noise); rounded to integers (stored as float32).
* shift, rigid: rotation 1-5 deg about a random axis through the tumour centre, translation 2-8 mm
  in a random direction. Local: cavity collapse ``A (x - c)/s exp(-|x - c|^2 / 2 s^2)`` with
  peak 5-10 mm (at ``|x - c| = s``; the large local shift after resection that ReMIND2Reg measures; it
  stays invertible while the peak is under 2.2 s), ``s`` = 1.0-1.4 tumour radius; sinking 1-4 mm along a "down"
  direction within 30 deg of the probe axis, Gaussian around the craniotomy (sigma 25-45 mm);
  smooth wobble RMS 0.3-1 mm (wavelengths 40-100 mm). The tumour is fully resected: the cavity is
  where the pulled MR position lies inside the tumour.
* iUS: formed by :mod:`brainshift.ultrasound` (a B-mode model calibrated on real iUS; its docstring
  lists every parameter and where its value came from): a curvilinear probe on the brain surface
  nearest the tumour, axis tilted up to 10 deg from the tumour direction, swept in elevation
  (45-70 mm deep, 60-170 ml); ``labels`` (uint8, ``ultrasound.LABELS``) is the tissue each iUS
  voxel shows (CSF, GM, WM, tumour remnant, cavity, blood/air). ``resected=False`` (``brainshift
  simulate --pre-resection``): the iUS is taken before resection, the tumour in place, no cavity
  and no collapse (as in RESECT).
* landmarks: 10-20 per case, local maxima of a Forstner structure-tensor measure of the warped
  anatomy, weighted toward the cavity, inside the FOV at least 4 mm from its border (any voxel by
  score when there are too few local maxima), at least 2 mm outside the cavity, 5-15 mm apart.

Everything is drawn from ``np.random.default_rng(seed)``; smooth fields are computed on a coarse grid
(at most 65**3 nodes) and upsampled trilinearly; each image is resampled once from the template.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from . import ultrasound
from .ultrasound import _draw, _unit
from .fields import field_name, write_field
from .io import Volume, save_landmarks, save_volume

PREFIX = "ReMIND2Reg"


@dataclass
class SimCase:
    us: np.ndarray                # (S,S,S) float32 iUS, 0 outside the fan, 0..255
    t1: np.ndarray                # (S,S,S) float32 pre-op ceT1 (moving)
    t2: np.ndarray                # (S,S,S) float32 pre-op T2 (moving)
    affine: np.ndarray            # 4x4 voxel -> RAS mm, shared by all images
    truth: np.ndarray             # (S,S,S,3) float32 pull field, voxel units, fixed grid
    fixed_landmarks: np.ndarray   # (N,3) integer voxel coords on the iUS grid
    moving_landmarks: np.ndarray  # (N,3) voxel coords in the MR grid
    fov_mask: np.ndarray          # (S,S,S) bool iUS field of view
    labels: np.ndarray            # (S,S,S) uint8 tissue the iUS shows (ultrasound.LABELS), fixed grid
    params: dict


#: Layers outside the brain in the simulated MR, from the brain surface outward: (name, thickness range mm,
#: T1 level range, T2 level range; WM = 1). Read off lateral line profiles of the real ReMIND-022 ceT1 and
#: T2 (../shared/data/real_mr, three axial levels): skin and fat 1.2-1.7 x WM in T1, muscle about 1.1,
#: bone dark (0.05-0.15), skull 3-6 mm, skin to skull 9-11 mm; T2 fat 1.2-1.8 x WM, CSF bright.
HEAD_LAYERS = (
    ("csf", (1.0, 3.0), (0.2, 0.35), "csf"),
    ("inner_table", (1.0, 2.0), (0.05, 0.15), (0.05, 0.15)),
    ("diploe", (1.0, 4.0), (0.8, 1.5), (0.8, 1.5)),
    ("outer_table", (1.0, 2.0), (0.05, 0.15), (0.05, 0.15)),
    ("muscle", (2.0, 6.0), (0.9, 1.2), (0.6, 0.9)),
    ("fat_skin", (3.0, 6.0), (1.2, 1.7), (1.2, 1.8)),
)
HEAD_REACH_MM = 30.0   # the layers end at most 23 mm out; closeness is stored over this range

# --------------------------------------------------------------------------------------------
# template and small helpers
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _template() -> dict:
    """MNI152 2009a channels [T1, GM, WM, CSF, closeness] (1 mm, float32, channels-last torch) + a 2 mm brain
    mask. ``closeness`` = 1 - (distance outside the closed brain mask, mm) / HEAD_REACH_MM, clipped to
    [0, 1]: 1 inside the brain, 0 in the air beyond the scalp (and outside the template grid, where
    ``grid_sample`` pads with zeros)."""
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    load = lambda n: _nib_load(folder / f"mni_icbm152_{n}_tal_nlin_sym_09a_converted.nii.gz")
    (t1, aff), (gm, _), (wm, _) = load("t1"), load("gm"), load("wm")
    tissue = gm + wm
    t1 /= np.median(t1[wm > 0.9])                       # WM = 1
    b2 = np.pad(tissue[::2, ::2, ::2] > 0.5, 4)         # 2 mm brain mask with sulci and ventricles
    b2 = ndi.binary_fill_holes(ndi.binary_closing(b2, ndi.generate_binary_structure(3, 1), iterations=2))[4:-4, 4:-4, 4:-4]
    m1 = np.repeat(np.repeat(np.repeat(b2, 2, 0), 2, 1), 2, 2)[: t1.shape[0], : t1.shape[1], : t1.shape[2]]
    m1 = ndi.gaussian_filter(m1.astype(np.float32), 0.7)
    csf = np.clip(m1 - tissue, 0, 1)
    close = np.clip(1.0 - ndi.distance_transform_edt(m1 < 0.5) / HEAD_REACH_MM, 0, 1).astype(np.float32)
    chans = torch.from_numpy(np.ascontiguousarray(np.stack([t1, gm, wm, csf, close], -1)))
    depth, nearest = ndi.distance_transform_edt(b2, return_indices=True)
    aff2 = aff @ np.diag([2.0, 2.0, 2.0, 1.0])
    world2 = _apply(aff2, np.moveaxis(np.indices(b2.shape), 0, -1).astype(float))
    out_dir = _apply(aff2, np.moveaxis(nearest, 0, -1).astype(float)) - world2   # toward the nearest surface
    out_dir /= np.linalg.norm(out_dir, axis=-1, keepdims=True) + 1e-9
    return {"chans": chans.permute(3, 0, 1, 2)[None], "affine": aff, "shape": np.array(t1.shape),
            "mask2": b2, "depth2": depth * 2.0, "nearest2": nearest, "affine2": aff2, "world2": world2,
            "out_dir2": out_dir}


def _nib_load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32) / 255.0, img.affine


def _apply(m: np.ndarray, x: np.ndarray) -> np.ndarray:
    """4x4 matrix applied to points (..., 3)."""
    return x @ m[:3, :3].T + m[:3, 3]


def _rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    """Rodrigues rotation matrix."""
    a = _unit(np.asarray(axis, float))
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _tilt(rng: np.random.Generator, v: np.ndarray, max_deg: float) -> np.ndarray:
    """``v`` rotated by up to ``max_deg`` about a random axis perpendicular to it."""
    perp = np.cross(v, rng.normal(size=3))
    return _rotation(perp, rng.uniform(0, max_deg)) @ v


def _waves(rng: np.random.Generator, rms: float, wl: tuple[float, float], ncomp: int, n: int = 6):
    """A smooth random field in mm: a sum of ``n`` plane waves, RMS ``rms`` per component."""
    k = np.stack([_unit(rng.normal(size=3)) for _ in range(n)]) * (2 * np.pi / rng.uniform(*wl, n))[:, None]
    return k, rng.uniform(0, 2 * np.pi, n), rng.normal(size=(n, ncomp)) * rms * np.sqrt(2.0 / n)


def _eval_waves(w, x: np.ndarray) -> np.ndarray:
    k, phase, amp = w
    return np.sin(x @ k.T + phase) @ amp


def _up(coarse: np.ndarray, size: int, last: bool = False) -> torch.Tensor:
    """(C, n, n, n) coarse-node values (nodes at linspace(0, size-1, n)) -> (C, size^3) trilinear;
    ``last``: return (size^3, C), contiguous."""
    t = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None]
    if last:
        t = t.contiguous(memory_format=torch.channels_last_3d)
        return F.interpolate(t, size=(size,) * 3, mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0).contiguous()
    return F.interpolate(t, size=(size,) * 3, mode="trilinear", align_corners=True)[0]


def _sample_template(tcoords: np.ndarray, size: int, channels: int = 5) -> np.ndarray:
    """The first ``channels`` template channels of [T1, GM, WM, CSF, closeness] at template-voxel coords
    given on coarse nodes (3,n,n,n)."""
    tm = _template()
    norm = 2.0 * tcoords / (tm["shape"][:, None, None, None] - 1.0) - 1.0
    grid = _up(norm[::-1], size, last=True)[None]                     # grid_sample wants (k, j, i)
    out = F.grid_sample(tm["chans"][:, :channels], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].contiguous().numpy()


# --------------------------------------------------------------------------------------------
# the case
# --------------------------------------------------------------------------------------------
def simulate_case(seed: int, shape: int = 96, spacing: float = 1.5, resected: bool = True) -> SimCase:
    """One simulated case on a ``shape**3`` grid of ``spacing`` mm; see the module docstring. ``resected``
    False: the iUS is taken before resection (tumour in place, no cavity or collapse), as in RESECT."""
    rng = np.random.default_rng(seed)
    tm = _template()
    S, h = int(shape), float(spacing)
    size = S * h / 128.0                                 # 1 for ReMIND2Reg's 128 mm cube
    P: dict = {"seed": int(seed), "shape": S, "spacing": h, "resected": bool(resected)}

    # tumour, craniotomy and probe (pre-op world = MNI mm)
    radius = _draw(rng, 8, 15) * min(size, 1.0)
    world2, out_dir, margin = tm["world2"], tm["out_dir2"], tm["depth2"] - radius
    ok = (tm["mask2"] & (margin > 3) & (margin < 15) & (world2[..., 2] > 0) & (np.abs(world2[..., 0]) > 20)
          & (out_dir[..., 2] > -0.2) & (out_dir[..., 0] * np.sign(world2[..., 0]) > -0.2))   # craniotomy up or lateral
    idx = np.argwhere(ok)[rng.integers(ok.sum())]
    c_t = world2[tuple(idx)] + rng.uniform(-1, 1, 3)
    probe = _apply(tm["affine2"], tm["nearest2"][(slice(None),) + tuple(idx)].astype(float))
    axis = _tilt(rng, _unit(c_t - probe), 10.0)
    centre = c_t + axis * _draw(rng, 5, 20) * size + rng.uniform(-5, 5, 3) * size
    grid_rot = _rotation(rng.normal(size=3), _draw(rng, 10, 45))
    affine = np.eye(4)
    affine[:3, :3] = grid_rot * h
    affine[:3, 3] = centre - grid_rot @ np.full(3, (S - 1) / 2.0) * h
    inv = np.linalg.inv(affine)
    P.update(tumour_centre_mm=c_t.tolist(), tumour_radius_mm=radius, probe_mm=probe.tolist(), probe_axis=axis.tolist(),
             cube_centre_mm=centre.tolist())

    # brain shift (pull, world mm)
    rig = _rotation(rng.normal(size=3), _draw(rng, 1, 5))
    trans = _unit(rng.normal(size=3)) * _draw(rng, 2, 8)
    peak, sig_c = _draw(rng, 5, 10), _draw(rng, 1.0, 1.4) * radius
    peak *= float(resected)                              # no cavity collapse before resection
    down = _tilt(rng, axis, 30.0)
    sink, sig_g = _draw(rng, 1, 4), _draw(rng, 25, 45) * size
    wob = _waves(rng, _draw(rng, 0.3, 1.0), (40, 100), 3)
    P.update(rigid_rotation_deg=float(np.rad2deg(np.arccos(np.clip((np.trace(rig) - 1) / 2, -1, 1)))),
             rigid_translation_mm=trans.tolist(), collapse_peak_mm=peak, collapse_sigma_mm=sig_c,
             sink_mm=sink, sink_sigma_mm=sig_g, down=down.tolist(), wobble_rms_mm=float(np.sqrt((wob[2] ** 2).sum() / 2 / 3)))

    def pull(x: np.ndarray) -> np.ndarray:
        r = x - c_t
        col = (peak / np.exp(-0.5) / sig_c) * r * np.exp(-(r ** 2).sum(-1, keepdims=True) / (2 * sig_c ** 2))
        g = np.exp(-((x - probe) ** 2).sum(-1, keepdims=True) / (2 * sig_g ** 2))
        x1 = x + col - sink * g * down + _eval_waves(wob, x)
        return (x1 - c_t) @ rig.T + c_t + trans

    # anatomy variation (pre-op world -> template world) and tumour shape
    scale, twarp = _draw(rng, 0.93, 1.07), _waves(rng, _draw(rng, 1, 3), (30, 80), 3)
    lob = _waves(rng, _draw(rng, 0.1, 0.25), (1.5, 3.0), 1)
    tmpl_vox = lambda x: _apply(np.linalg.inv(tm["affine"]), centre + scale * (x - centre) + _eval_waves(twarp, x))

    def tumour_d(x: np.ndarray) -> np.ndarray:  # signed distance-like (mm), < 0 inside the tumour
        r = np.linalg.norm(x - c_t, axis=-1)
        return r - radius * (1 + _eval_waves(lob, (x - c_t) / np.maximum(r, 1e-6)[..., None])[..., 0])

    # coarse nodes -> truth, template coordinates, tumour level, bias fields
    n = min(S, 65)
    lin = np.linspace(0, S - 1, n)
    nodes = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), -1)
    x_nodes = _apply(affine, nodes)
    xm = pull(x_nodes)
    truth = _up(np.moveaxis(_apply(inv, xm) - nodes, -1, 0), S, last=True).numpy()
    truth = np.round(truth * 1024.0) / 1024.0          # 1/1024 voxel steps: smaller files, exact landmarks
    bias = [_waves(rng, _draw(rng, 0.05, 0.15), (80, 200), 1) for _ in range(2)]
    mr_aux = _up(np.stack([tumour_d(x_nodes)] + [np.exp(_eval_waves(b, x_nodes)[..., 0]) for b in bias]), S).numpy()
    mr_anat = _sample_template(np.moveaxis(tmpl_vox(x_nodes), -1, 0), S)
    us_d = _up(tumour_d(xm)[None], S)[0].numpy()
    us_anat = _sample_template(np.moveaxis(tmpl_vox(xm), -1, 0), S, channels=4)   # no skull or scalp in the iUS

    t1, t2 = _mr_images(rng, mr_anat, mr_aux, radius, P)
    del mr_anat, mr_aux
    us, fov, labels, refl_struct = _ultrasound(rng, us_anat, us_d, affine, probe, axis, size, resected, P)
    del us_anat
    fixed_lm = _landmarks(rng, refl_struct, us_d, fov, truth, h, P)
    moving_lm = fixed_lm + truth[tuple(fixed_lm.astype(int).T)].astype(np.float64)
    P["n_landmarks"] = int(len(fixed_lm))
    P["fov_fraction"] = float(fov.mean())
    return SimCase(us, t1, t2, affine, truth, fixed_lm, moving_lm, fov, labels, json.loads(json.dumps(P)))


def _mr_images(rng, anat: np.ndarray, aux: np.ndarray, radius: float, P: dict) -> tuple[np.ndarray, np.ndarray]:
    """Pre-op T1 (contrast-enhanced) and T2 from template channels and the tumour level ``d`` (mm): the
    whole head, brain plus the layers of :func:`_head_layers` outside it (ReMIND's MR is not skull-stripped)."""
    T, G, W, C, close = anat
    d, b1, b2 = aux
    rim_w, oed_w = _draw(rng, 2, 4), _draw(rng, 4, 10)
    w1, gam, core1, rim1 = _draw(rng, 600, 1000), _draw(rng, 0.8, 1.25), _draw(rng, 0.25, 0.5), _draw(rng, 1.3, 1.8)
    w2, g2, c2 = _draw(rng, 150, 300), _draw(rng, 1.3, 1.7), _draw(rng, 3, 4.5)
    core2, rim2, oed2 = _draw(rng, 0.6, 0.9), _draw(rng, 0.4, 0.6), _draw(rng, 0.1, 0.3)
    t1 = np.power(np.clip(T, 0, None), np.float32(gam))
    t2 = W + np.float32(g2) * G + np.float32(c2) * C
    box = ultrasound.bounding_box(d, 5 * oed_w)                       # the tumour and its oedema lie inside this box
    db = d[box]
    inside = np.clip(0.5 - db, 0, 1)
    rim = inside * np.clip(1 + db / rim_w, 0, 1)
    core = inside - rim
    oedema = np.exp(-np.maximum(db, 0) / oed_w) * (1 - inside) * np.clip(G[box] + W[box], 0, 1)
    t1[box] = (1 - inside) * t1[box] * (1 - 0.2 * oedema) + core * core1 + rim * rim1
    t2[box] = (1 - inside) * (t2[box] + oedema * oed2 * c2) + (core * core2 + rim * rim2) * c2
    head1, head2 = _head_layers(np.random.default_rng([P["seed"], 1]), (1 - close) * HEAD_REACH_MM, c2, P)
    t1 += head1
    t2 += head2
    t1 *= b1
    t2 *= b2
    noise = _draw(rng, 0.01, 0.02)
    out = []
    for img, level in ((t1, w1), (t2, w2)):
        img *= np.float32(level)
        n = rng.standard_normal(img.shape, dtype=np.float32)
        n *= np.float32(noise * level)
        n += img
        out.append(np.round(np.abs(n, out=n), out=n))  # |signal + noise|, integer-valued
    P.update(t1_wm=w1, t1_gamma=gam, t1_core=core1, t1_rim=rim1, rim_mm=rim_w, oedema_mm=oed_w, t2_wm=w2,
             t2_gm=g2, t2_csf=c2, t2_core=core2, mr_noise=noise)
    return out[0], out[1]


def _head_layers(rng: np.random.Generator, dist: np.ndarray, t2_csf: float, P: dict) -> tuple[np.ndarray, np.ndarray]:
    """T1 and T2 levels (WM = 1) of the layers outside the brain, from the distance ``dist`` (mm) outside
    the closed brain mask: CSF/dura, inner table, diploe, outer table, muscle/galea, fat and skin, then
    air (0). Zero inside the brain. Thicknesses and levels are drawn from the ranges of HEAD_LAYERS. Drawn
    from their own generator so that every other draw of a case is as before the head was added."""
    edges, lv1, lv2 = [0.0], [], []
    for name, (lo, hi), l1, l2 in HEAD_LAYERS:
        edges.append(edges[-1] + _draw(rng, lo, hi))
        lv1.append(_draw(rng, *l1))
        lv2.append(t2_csf if l2 == "csf" else _draw(rng, *l2))
        P[f"head_{name}_mm"] = edges[-1] - edges[-2]
    # linear ramps of 0.5 mm between layers; 0 inside the brain and in the air
    xs, y1, y2 = [0.0], [0.0], [0.0]
    for a, b, v1, v2 in zip(edges[:-1], edges[1:], lv1, lv2):
        xs += [a + 0.25, b - 0.25]
        y1 += [v1, v1]
        y2 += [v2, v2]
    xs.append(edges[-1] + 0.25)
    y1.append(0.0)
    y2.append(0.0)
    flat = dist.ravel()
    return (np.interp(flat, xs, y1).astype(np.float32).reshape(dist.shape),
            np.interp(flat, xs, y2).astype(np.float32).reshape(dist.shape))


def _ultrasound(rng, anat: np.ndarray, d: np.ndarray, affine: np.ndarray, probe: np.ndarray, axis: np.ndarray,
                size: float, resected: bool, P: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """iUS on the fixed grid from the pulled anatomy (see :mod:`brainshift.ultrasound`); returns
    (us, fov, labels, structure image for the landmarks: WM + 0.55 GM, zero in the cavity)."""
    T, G, W, C = anat
    geo = ultrasound.sweep_geometry(rng, affine, probe, axis, T.shape[0], size, P)
    us, labels = ultrasound.bmode(rng, anat, d, geo, size, P, resected=resected)
    struct = W + np.float32(0.55) * G
    struct[labels == ultrasound.LABELS["cavity"]] = 0
    return us, geo["fov"], labels, struct


def _landmarks(rng, struct: np.ndarray, d: np.ndarray, fov: np.ndarray, truth: np.ndarray, h: float,
               P: dict) -> np.ndarray:
    """10-20 distinctive integer fixed voxels (Forstner measure of ``struct``), spread out, inside the fan."""
    f = max(1, int(round(1.5 / h)))
    s = struct[::f, ::f, ::f]
    hs = h * f
    g = np.gradient(ndi.gaussian_filter(s, 0.7), hs)
    J = {(a, b): ndi.gaussian_filter(g[a] * g[b], 1.5) for a in range(3) for b in range(a, 3)}
    det = (J[0, 0] * (J[1, 1] * J[2, 2] - J[1, 2] ** 2) - J[0, 1] * (J[0, 1] * J[2, 2] - J[1, 2] * J[0, 2])
           + J[0, 2] * (J[0, 1] * J[1, 2] - J[1, 1] * J[0, 2]))
    score = det / (J[0, 0] + J[1, 1] + J[2, 2] + 1e-6) ** 2
    ds = d[::f, ::f, ::f]
    score *= np.exp(-np.maximum(ds, 0) / 25.0)
    fov_s = fov[::f, ::f, ::f]
    inner = ndi.distance_transform_edt(np.pad(fov_s, 1))[1:-1, 1:-1, 1:-1] * hs > 4.0
    S = fov.shape[0]
    q = (np.argwhere(np.ones(s.shape, bool)) * f).reshape(s.shape + (3,)) + truth[::f, ::f, ::f]
    in_mr = ((q >= 1) & (q <= S - 2)).all(-1)
    ok = inner & (ds > 2.0) & in_mr & (s > 0.3) & (score > 0)
    want = int(rng.integers(10, 21))
    # local maxima of the score first; in a small field of view, any voxel by score
    for cand in (ok & (score == ndi.maximum_filter(score, 3)), ok):
        pts = np.argwhere(cand)
        chosen, sep = _spread(pts[np.argsort(-score[cand], kind="stable")[:4000]], want, hs)
        if len(chosen) == want:
            break
    if len(chosen) < 10:
        raise RuntimeError(f"seed {P['seed']}: only {len(chosen)} landmark candidates in the iUS field of view")
    P["landmark_separation_mm"] = sep
    return np.array(chosen, dtype=np.float64) * f


def _spread(pts: np.ndarray, want: int, hs: float) -> tuple[list[np.ndarray], float]:
    """Greedily take ``want`` of ``pts`` (best first) at least ``sep`` mm apart (grid step ``hs`` mm),
    the largest ``sep`` of 15..5 mm that allows it; returns (chosen, sep), fewer than ``want`` at 5 mm."""
    for sep in (15.0, 12.0, 10.0, 8.0, 6.5, 5.0):
        chosen: list[np.ndarray] = []
        for p in pts:
            if all(np.linalg.norm((p - c) * hs) >= sep for c in chosen):
                chosen.append(p)
                if len(chosen) == want:
                    return chosen, sep
    return chosen, sep


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_case(case: SimCase, out: Path, case_id: str) -> list[Path]:
    """Dataset layout: ``imagesTr/ReMIND2Reg_{id}_000{0,1,2}.nii.gz``, ``landmarksTr/..._000{0,1,2}.csv``
    (voxel coords; _0001 and _0002 identical, same MR grid), ``truth/disp_{id}_0000_{id}_000{1,2}.nii.gz``
    (pull field, voxel units, fixed grid), ``labels/{stem}_0000.nii.gz`` (uint8 tissue labels of the iUS,
    :data:`brainshift.ultrasound.LABELS`). Returns the written paths."""
    out = Path(out)
    stem = f"{PREFIX}_{case_id}"
    paths = [save_volume(out / "imagesTr" / f"{stem}_{tag}.nii.gz", Volume(img, case.affine))
             for tag, img in (("0000", case.us), ("0001", case.t1), ("0002", case.t2))]
    paths.append(save_volume(out / "labels" / f"{stem}_0000.nii.gz", Volume(case.labels, case.affine)))
    paths.append(save_landmarks(out / "landmarksTr" / f"{stem}_0000.csv", case.fixed_landmarks))
    for tag in ("0001", "0002"):
        paths.append(save_landmarks(out / "landmarksTr" / f"{stem}_{tag}.csv", case.moving_landmarks))
    first = write_field(out / "truth" / field_name(case_id, "0000", case_id, "0001"), case.truth, case.affine)
    second = out / "truth" / field_name(case_id, "0000", case_id, "0002")
    fd, tmp = tempfile.mkstemp(prefix=f".{second.name}.", suffix=".tmp", dir=second.parent)
    os.close(fd)
    shutil.copyfile(first, tmp)                          # same field, same bytes: copy, atomically
    os.replace(tmp, second)
    return paths + [first, second]


def simulate_dataset(out: Path, cases: int, seed: int = 0, shape: int = 96, spacing: float = 1.5,
                     preview: bool = False, progress: bool = True, resected: bool = True) -> list[Path]:
    """Cases 0001..N (case k: seed from ``SeedSequence([seed, k])``), ``ReMIND2Reg_dataset.json`` with the
    pairs under ``registration_val``, optional ``preview/ReMIND2Reg_XXXX.png``. Returns written paths."""
    from tqdm import tqdm

    out = Path(out)
    paths: list[Path] = []
    pairs = []

    def save(case: SimCase, cid: str) -> list[Path]:
        done = write_case(case, out, cid)
        if preview:
            done.append(preview_png(case.us, case.t1, out / "preview" / f"{PREFIX}_{cid}.png", case.fixed_landmarks))
        return done

    # gzip (which releases the GIL) of case k overlaps the simulation of case k+1; at most one pending write
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for k in tqdm(range(1, cases + 1), desc="simulate", disable=not progress, dynamic_ncols=True):
            cid = f"{k:04d}"
            case = simulate_case(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]), shape, spacing, resected)
            if pending is not None:
                paths += pending.result()
            pending = pool.submit(save, case, cid)
            del case
            for tag in ("0001", "0002"):
                pairs.append({"fixed": f"./imagesTr/{PREFIX}_{cid}_0000.nii.gz",
                              "moving": f"./imagesTr/{PREFIX}_{cid}_{tag}.nii.gz"})
        if pending is not None:
            paths += pending.result()
    meta = {"name": "ReMIND2Reg (simulated by brainshift.synth)", "tensorImageSize": {"0": "3D", "1": "3D", "2": "3D"},
            "modality": {"0": "US", "1": "ceT1", "2": "T2"}, "tensorImageShape": {"0": [shape] * 3},
            "spacing_mm": spacing, "seed": seed, "resected": resected, "numRegistration_val": len(pairs), "registration_val": pairs}
    js = out / f"{PREFIX}_dataset.json"
    out.mkdir(parents=True, exist_ok=True)
    tmp = js.with_name(f".{js.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, js)
    return paths + [js]


def preview_png(us: np.ndarray, t1: np.ndarray, path: Path, landmarks: np.ndarray | None = None) -> Path:
    """Orthogonal voxel slices through the centre of the fan: iUS, T1, and T1 with the iUS overlaid
    (fixed-grid landmarks within 3 voxels of a slice drawn as crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nz = np.argwhere(us > 0)
    c = nz.mean(0).round().astype(int) if len(nz) else np.array(us.shape) // 2
    hi = np.percentile(t1, 99.5) or 1.0
    us_hi = float(np.percentile(us[us > 0], 99.5)) if (us > 0).any() else 255.0
    fig, axes = plt.subplots(3, 3, figsize=(12, 12))
    for col in range(3):
        sl = [slice(None)] * 3
        sl[col] = c[col]
        u, t = us[tuple(sl)].T, t1[tuple(sl)].T
        rest = [a for a in range(3) if a != col]
        for row, (img, cmap, vmax) in enumerate(((u, "gray", us_hi), (t, "gray", hi), (t, "gray", hi))):
            ax = axes[row, col]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=vmax, origin="lower")
            if row == 2:
                ax.imshow(np.ma.masked_equal(u, 0), cmap="hot", vmin=0, vmax=us_hi, alpha=0.45, origin="lower")
            if landmarks is not None:
                near = np.abs(landmarks[:, col] - c[col]) <= 3
                ax.plot(landmarks[near, rest[0]], landmarks[near, rest[1]], "c+", ms=10, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"axis {col} = {c[col]}")
    for row, name in enumerate(("iUS (fixed)", "T1 (moving)", "overlay")):
        axes[row, 0].set_ylabel(name)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
