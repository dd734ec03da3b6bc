"""B-mode formation for the simulator: post-resection iUS from tissue maps on the fixed grid.

Called by :mod:`brainshift.synth`, which supplies the pulled anatomy (template channels T1, GM, WM, CSF
at the tissue each iUS voxel shows) and the tumour level ``d`` (mm, < 0 inside the resected tumour).
Everything here is on the fixed (iUS) voxel grid; lengths in parameters are mm.

How the image forms (a 3D extension of the convolution model of B-mode ultrasound, e.g. Bamber &
Dickinson 1980; Gao et al., IEEE TUFFC 2009, "A fast convolution-based methodology to simulate 2-D/3-D
cardiac ultrasound images"):

1. Sweep geometry. A curvilinear probe on the brain surface images a 2D sector, swept in elevation:
   a voxel is in the FOV iff its beam angle (apex ``rc`` behind the face) is within the half angle,
   its range is within the depth, and its elevation lies inside the sweep (slightly fanned, the ends
   irregular by up to 1.5 mm as hand-held sweeps are).
2. Tissue. Diffuse backscatter ``b`` per class (fluid anechoic, GM below WM, tumour hyperechoic and
   heterogeneous) times a smooth lognormal texture. Specular reflectivity ``r`` at the sharp interfaces
   of the label map (relative impedance :data:`IMPEDANCE`): ``g |grad Z| |cos(beam, normal)|**p``, made
   uneven along the interface; bright where the beam meets a sulcus or the falx face-on. Plus sparse
   strong point scatterers in tissue, the echo of the brain surface under the probe face, and after
   resection the cavity's bright irregular rim on its wall and blood/air pockets (balls) on it.
3. Speckle. Complex circular Gaussian scatterers filtered by the probe's Gaussian point spread function
   (axial, lateral, elevational widths along the beam frame) in one FFT; the envelope is Rayleigh;
   its intensity is averaged over a fraction of a voxel (frame compounding in the reconstruction).
   Envelope = ``sqrt(PSF^2 * b) s + (PSF' * r) (q + (1 - q) s)``, ``s`` the unit-mean speckle, ``PSF'``
   the PSF narrowed by a per-case factor: coherent specular echoes show as thin lines, the diffuse speckle
   coarser (the scanner's compounding smooths it).
4. Propagation. Shadowing below the rim and the pockets (``exp(-beta * integral of their echo)`` along
   the ray from the apex), attenuation left after time-gain compensation, a smooth random TGC ripple.
5. Display and reconstruction. Power-law compression ``x**gamma`` (``x`` = envelope over its median in
   GM and WM) scaled to a median grey level, darkening toward the FOV's border, voxel-level jitter of
   uneven strength, gain stripes across the sweep (each voxel from its nearest frame), a noise floor;
   clipped to 0.5..255 and not rounded (the real volumes come resampled, with non-integer values),
   exactly 0 outside the FOV and never 0 inside.

The image is formed on the FOV's bounding box plus 4 mm, not on the whole cube (a fifth of it at 256^3).
The PSF kernels are sampled in space (positive), not cut off in frequency: a sub-voxel Gaussian cut at
Nyquist rings with a 2-voxel period, which the compression showed as a checkerboard in the cavity and
around every bright point (seen up to session 10).

Where the values come from. "Measured": on 6 calibration volumes, RESECT cases 3, 5, 8, 15, 18, 26 of
``../shared/data/real_ius`` (pre-resection, 0.5 mm), with ``python -m brainshift.ultrasound --real
FILES`` (FOV size, quantiles, border profile) and ``../shared/tools/us_realism.py`` (per-patch
statistics), compared with simulated volumes of ``simulate_case(seed, 256, 0.5)``. The other 6 real
volumes (4, 6, 14, 16, 25, 27) are held out for the realism test. "Fitted": set by hand until the
simulated per-patch statistics matched the calibration volumes' medians; the numbers are this model's,
not physical constants. ``size`` = cube side / 128 mm scales lengths for small test grids.

==========================  ====================  ============================================================
parameter                   range                 source
==========================  ====================  ============================================================
sector half angle           10-25 deg             measured: FOV 61-125 ml, principal extents 42-53 x 54-74
depth from probe face       45-70 mm                x 57-97 mm (simulated: 50-170 ml)
apex behind face (rc)       20-50 mm              by eye: sector sides diverge little (curvilinear probe)
sweep (elevation)           35-50 mm, fan 0-8 deg measured: smallest principal extent
backscatter WM / GM         1 / 0.55-0.85         literature: white matter more echogenic than cortex
backscatter fluid           1e-4 - 1e-3           anechoic CSF, saline, cavity fluid
tumour (before resection,   1.6-3.0 x WM,         low-grade glioma hyperechoic (brighter than parenchyma in
  or remnant, p = 0.4)        +25 % texture         the RESECT volumes)
texture (lognormal)         sigma 1.0-2.0,        fitted: per-patch std and cv (real medians 0.50 / 0.41);
                            wavelength 3-10 mm      the display's gamma shrinks it to +-15-25 % of grey
impedance WM/GM/CSF/tumour  1 / 0.985 / 0.88 /    relative (soft tissue ~1.6, water ~1.5 MRayl); GM/WM kept
                            1.04                    close: their boundary is barely visible in real iUS
interface gain g            1000-2000 mm          fitted: share of voxels > 3 x median (0.18 % of patch voxels)
  (x (0.5 mm / h)^2 on coarser grids, where a voxel averages a thin echo)
specular exponent p         2-4                   specular reflection falls with incidence angle
interface unevenness        lognormal sigma       by eye: real sulcal echoes are broken, not continuous
                            0.5-0.9 over 2 mm
point scatterers            0.2-0.6 / mm^3,       by eye: bright dots in the real parenchyma; fitted: share of
                            amplitude 20-60         voxels > 3 x median (0.18 % real)
sulcus: a sheet on the      line gain 300-800,    by eye: real iUS shows many long one-voxel bright lines, often
  cortex's medial surface     one voxel thick,      parallel: each sulcus a collapsed pia-arachnoid sheet between
  between white-matter        20-50 % seen at any   two gyri, brighter where the beam meets it face-on (the MNI
  cores, >= 1 mm deep         angle                 template's CSF marks only the widest sulci); thin CSF below
                                                    3-5 mm wide echoes as cortex, not as dark fluid
surface echo under probe    gain 1-2, 1-2 mm      by eye: bright band along the probe face in most volumes
cavity rim (on the wall)    gain 2-5, 1-2.5 mm    by eye (no real post-resection volume here)
blood / air pockets         2-6 balls, r 1-3 mm,  by eye; they and the rim cast shadows (beta 0.05-0.15 /mm)
                            amplitude 3-8
PSF sigma axial / lateral   0.2-0.3 / 0.5-0.9     fitted: per-patch autocorrelation 0.79 / 0.63 at 0.5 / 1 mm
  / elevational             / 0.25-0.45 mm          (real medians); lateral wider than axial: the streaks of real
                                                    speckle; elevation narrow: frames decorrelate (wider: AUC up)
compounding                 0-0.2 voxel           fitted, as the PSF
specular PSF scale          0.2-1.0 x the PSF,    by eye: real sulcal lines and echo borders are 1-2 voxels wide,
                            reflectivity x its^2    the simulated ones were 3-5 (a Gaussian's tails widen under
                                                    the compression); fitted: calibration AUC (12 draws against
                                                    the 6 volumes, logreg / forest) 0.82 / 0.81 at 1.0, 0.75 /
                                                    0.76 at 0.7, drawn per case from 0.5 / 0.4 / 0.3 / 0.2 to 1.0:
                                                    0.72 / 0.74, 0.68 / 0.72, 0.64 / 0.69, 0.61 / 0.68 (the real
                                                    volumes differ in how sharp their echoes are); a floor of half
                                                    a voxel on the PSF widths (no beaded lines): 0.72 / 0.75
coherent share q            0.5-1.0               by eye: specular echoes smoother than speckle
residual attenuation        0.006-0.02 / mm       brain ~0.6 dB/cm/MHz, mostly cancelled by the TGC
TGC ripple                  RMS 8-18 %            by eye: gain bands with depth in the real volumes
compression gamma           0.22-0.32             fitted: per-patch quantiles q10/q50 ~0.65, skew ~1.1
median grey level           22-45                 measured: FOV medians 25-44 (max ~120-200)
border darkening            30-60 %, 4-10 mm      measured: median 0.55-0.84 x within 1 mm of the border,
                                                    1.0-1.5 x beyond 9 mm
reconstruction jitter       6-14 %, strength      fitted: Laplacian energy of the patches (without it 0.2, real
                            lognormal (0.5, 5 mm),  1.25); stronger unevenness (0.7-0.8) gave salt-and-pepper patches;
                            Gaussian                a heavy-tailed (Student t) jitter put isolated black and white
                                                    voxels where the real volumes have none (the thin specular
                                                    lines now give the heavy-tailed Laplacian)
nearest-frame               pitch 0.6-1.2 mm,     by eye: real grain is blocky along one axis, continuous within a
  reconstruction, stripes   gain sigma 2-6 %        frame and jumping between frames, with streaks across the sweep
                                                    (Case 5, 15); a hand-held sweep at 1-2.5 cm/s, ~20 frames/s
noise floor                 1-3 grey levels       measured: 1st percentile 1.4-2.9
==========================  ====================  ============================================================

How close this is, measured (leave-volumes-out AUC of ``us_realism.py``, 0.5 = indistinguishable; details
in ``docs/MEASUREMENTS.md``): the 6 held-out real volumes against ``brainshift simulate --cases 6 --shape
256 --spacing 0.5``, session 15: logreg / forest 0.670 / 0.574 (seed 1) and 0.656 / 0.623 (seed 2),
against 0.92-0.94 / 0.92 for the simulators of sessions 11 and 14. The real-vs-real floor on this split
is 0.31 / 0.25. What still tells them apart: the real patches' gradient CV and Laplacian energy are higher
(0.86 / 1.69 against 0.78 / 1.43), their autocorrelation at 0.5 mm lower (0.73 against 0.78).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

LABELS = {"outside": 0, "csf": 1, "gm": 2, "wm": 3, "tumour": 4, "cavity": 5, "blood_air": 6}
# relative acoustic impedance per label (soft tissue ~1.6 MRayl, water/CSF ~1.5): what reflects
IMPEDANCE = np.array([0.88, 0.88, 0.985, 1.0, 1.04, 0.88, 0.88], np.float32)


def _draw(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise smoothed by ``sigma_vox`` voxels, made on a grid coarsened
    by up to 4x (cheap at 256^3) and upsampled trilinearly."""
    if min(shape) == 0:
        return np.zeros(shape, np.float32)
    f = int(max(1, min(4, sigma_vox // 1.5)))
    small = tuple(-(-s // f) for s in shape)
    n = ndi.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma_vox / f, mode="wrap")
    n /= n.std() + 1e-9
    if f > 1:
        n = F.interpolate(torch.from_numpy(n)[None, None], scale_factor=f, mode="trilinear",
                          align_corners=False)[0, 0].numpy()
    return np.ascontiguousarray(n[: shape[0], : shape[1], : shape[2]])


def _gaussian_transfer(shape: tuple[int, int, int], cov_vox: np.ndarray) -> torch.Tensor:
    """Fourier transfer function (real, unit DC) of a Gaussian PSF with covariance ``cov_vox`` (voxel^2),
    sampled in space on the periodic grid and normalised. Sampling the kernel in space, not its
    transfer function in frequency, keeps the kernel positive: a PSF narrower than a voxel cut off at
    the Nyquist frequency rings with a period of 2 voxels, which the display's compression turned into
    a checkerboard around bright echoes and in anechoic fluid."""
    ci = np.linalg.inv(np.asarray(cov_vox, np.float64))
    r = int(np.ceil(4 * np.sqrt(np.max(np.diag(cov_vox))))) + 1
    o = np.arange(-r, r + 1)
    x = np.stack(np.meshgrid(o, o, o, indexing="ij"), -1).astype(np.float64)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", x, ci, x))
    k /= k.sum()
    full = np.zeros(shape, np.float32)
    idx = (np.argwhere(k > 1e-7) - r) % np.array(shape)
    np.add.at(full, tuple(idx.T), k[k > 1e-7].astype(np.float32))
    return torch.fft.fftn(torch.from_numpy(full)).real


def _psf_blur(x: np.ndarray, transfer: torch.Tensor) -> np.ndarray:
    """Real volume filtered by the PSF (periodic; the FOV lies away from the cube's faces)."""
    X = torch.fft.rfftn(torch.from_numpy(x))
    X *= transfer[..., : X.shape[-1]]
    return torch.fft.irfftn(X, s=x.shape).numpy()


def sweep_geometry(rng: np.random.Generator, affine: np.ndarray, probe: np.ndarray, axis: np.ndarray,
                   shape: int, size: float, P: dict) -> dict:
    """Probe frame per voxel and the FOV mask. ``probe`` (world mm) is the centre of the probe face on
    the brain surface, ``axis`` the unit beam axis (into the brain). Returns ``fov`` (bool), ``depth``
    (mm below the face along the beam), ``beam`` (3 per-voxel unit beam directions in voxel axes) and
    the frame vectors."""
    S = shape
    h = float(np.linalg.norm(affine[:3, 0]))
    rot = affine[:3, :3] / h
    rc = _draw(rng, 20, 50) * size
    half, depth_max = np.deg2rad(_draw(rng, 10, 25)), _draw(rng, 45, 70) * size
    sweep, fan_e = _draw(rng, 35, 50) * size, np.deg2rad(_draw(rng, 0, 8))
    lat = _unit(np.cross(axis, rng.normal(size=3)))
    ele = np.cross(axis, lat)
    apex_v = np.linalg.inv(affine) @ np.r_[probe - axis * rc, 1.0]
    ar = [np.arange(S, dtype=np.float32) - np.float32(a) for a in apex_v[:3]]

    def comp(e: np.ndarray) -> np.ndarray:    # mm along world direction e, from the apex
        ev = (rot.T @ e * h).astype(np.float32)
        return ar[0][:, None, None] * ev[0] + ar[1][None, :, None] * ev[1] + ar[2][None, None, :] * ev[2]

    ax, la, el = comp(axis), comp(lat), comp(ele)
    rng2 = np.sqrt(ax * ax + la * la)                          # range from the apex in the imaging plane
    depth = rng2 - np.float32(rc)
    edge = 1.5 * size * np.tanh(_smooth_noise(rng, (S, S, S), 6.0 / h))   # irregular sweep ends
    half_sweep = sweep / 2 + np.tan(fan_e) * np.maximum(depth, 0) + edge
    fov = (depth > 0) & (depth < depth_max) & (np.abs(la) < ax * np.float32(np.tan(half))) & (np.abs(el) < half_sweep)
    del half_sweep, edge
    # beam direction (unit, voxel axes): radial from the apex within the imaging plane
    ev_ax, ev_la = rot.T @ axis, rot.T @ lat
    inv_r = 1.0 / np.maximum(rng2, 1e-3)
    beam = [(ax * np.float32(ev_ax[i]) + la * np.float32(ev_la[i])) * inv_r for i in range(3)]
    P.update(apex_radius_mm=rc, sector_half_deg=float(np.rad2deg(half)), fan_depth_mm=depth_max, sweep_mm=sweep,
             sweep_fan_deg=float(np.rad2deg(fan_e)), fov_ml=float(fov.sum() * h ** 3 / 1000))
    return {"fov": fov, "depth": depth, "elevation": el, "beam": beam, "apex_v": apex_v[:3], "axis": axis, "lat": lat, "ele": ele,
            "rot": rot, "h": h}


def tissue_labels(anat: np.ndarray, d: np.ndarray, remnant: np.ndarray) -> np.ndarray:
    """Label map (uint8, :data:`LABELS`) of the tissue each fixed voxel shows: CSF where the fluid share
    ``1 - GM - WM`` is at least 0.35 (keeps the thin sulci of the blurred template), else GM or WM by
    the larger probability; outside the brain where ``CSF + GM + WM < 0.5``; the remnant tumour and the
    cavity (``d < 0`` minus the remnant)."""
    _, G, W, C = anat
    lab = np.where(W >= G, np.uint8(LABELS["wm"]), np.uint8(LABELS["gm"]))
    lab[(1 - G - W) >= 0.35] = LABELS["csf"]
    lab[(C + G + W) < 0.5] = LABELS["outside"]
    tum = d < 0
    lab[tum] = LABELS["cavity"]
    lab[tum & remnant] = LABELS["tumour"]
    return lab


def bmode(rng: np.random.Generator, anat: np.ndarray, d: np.ndarray, geo: dict, size: float, P: dict,
          remnant_p: float = 0.4, resected: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The iUS (float32, 0.5..255 inside ``geo['fov']``, not rounded; exactly 0 outside) and its label map (uint8).
    ``resected``: the tumour (``d < 0``) is a cavity, with a remnant with probability ``remnant_p``;
    otherwise the whole tumour is in place (pre-resection iUS). The image is formed on the FOV's
    bounding box plus a margin (a fifth of the cube at 256^3), the labels on the whole grid."""
    S = d.shape[0]
    h, fov = geo["h"], geo["fov"]
    labels = tissue_labels(anat, d, d < 0 if not resected else np.zeros(d.shape, bool))
    us = np.zeros(d.shape, np.float32)
    if not fov.any():
        return us, labels
    pad = int(np.ceil(4.0 / h))
    inside = np.argwhere(fov)
    lo, hi = np.maximum(inside.min(0) - pad, 0), np.minimum(inside.max(0) + 1 + pad, S)
    del inside
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = dict(geo, fov=fov[box], depth=geo["depth"][box], elevation=geo["elevation"][box], beam=[bm[box] for bm in geo["beam"]],
               apex_v=np.asarray(geo["apex_v"], float) - lo)
    us[box], labels[box] = _bmode_box(rng, anat[(slice(None),) + box], d[box], sub, size, P, remnant_p, resected)
    return us, labels


def _bmode_box(rng: np.random.Generator, anat: np.ndarray, d: np.ndarray, geo: dict, size: float, P: dict,
               remnant_p: float, resected: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bmode` on a box of the grid (``geo`` cut to the box, apex in box voxels)."""
    T, G, W, C = anat
    shp = T.shape
    h, fov, depth = geo["h"], geo["fov"], geo["depth"]
    # --- tissue: diffuse backscatter and impedance ------------------------------------------------
    b_gm, b_fl = _draw(rng, 0.55, 0.85), _draw(rng, 1e-4, 1e-3)
    b_tum, tex_sig, tex_wl = _draw(rng, 1.6, 3.0), _draw(rng, 1.0, 2.0), _draw(rng, 3, 10)
    fl = np.clip(1 - G - W, 0, 1)                            # CSF, and saline outside the brain
    back = W + np.float32(b_gm) * G + np.float32(b_fl) * fl
    del fl
    box = bounding_box(d, 8.0)                        # the tumour (cavity), its rim and a margin lie in this box
    db = d[box]
    bshape = db.shape
    has_remnant = resected and bool(rng.random() < remnant_p) and bool((db < 0).any())
    remnant = np.zeros(d.shape, bool)
    if has_remnant:   # patches of the tumour's outer shell, 3-8 mm thick, are left
        cap = _smooth_noise(rng, bshape, 4.0 / h)
        thick = _draw(rng, 3, 8) * size
        remnant[box] = (db < 0) & (db > -thick) & (cap > _draw(rng, 0.3, 1.0))
        del cap
    if not resected:
        remnant[box] = db < 0
    labels = tissue_labels(anat, d, remnant)
    sulcus = _sulci(labels == LABELS["csf"], h, _draw(rng, 3.0, 5.0))
    line = _sulcal_sheets(labels, h, 1.0)
    back[sulcus] = np.float32(b_gm)            # a template sulcus is wider than a real one: the rest is cortex
    inside = np.clip(0.5 - db, 0, 1)                         # soft tumour (cavity) indicator
    soft_rem = ndi.gaussian_filter(remnant[box].astype(np.float32), 0.5)
    back[box] = back[box] * (1 - inside) + np.float32(b_fl) * inside * (1 - soft_rem) + (
        np.float32(b_tum) * inside * soft_rem * np.exp(np.float32(0.25) * _smooth_noise(rng, bshape, 1.5 / h)))
    tex = _smooth_noise(rng, shp, tex_wl / h / 2)
    tex *= np.float32(tex_sig)
    back *= np.exp(tex)
    del tex
    # --- specular reflectivity at sharp interfaces of the label map ---------------------------------
    g_int, p_spec, g_var = _draw(rng, 1000, 2000), _draw(rng, 2, 4), _draw(rng, 0.5, 0.9)
    imp = IMPEDANCE[labels]
    imp[sulcus] = IMPEDANCE[LABELS["gm"]]      # its echo is the line below, not two walls
    grads = np.gradient(ndi.gaussian_filter(imp, 0.1 / h), h)
    del imp
    gmag = np.sqrt(sum(g * g for g in grads)) + np.float32(1e-6)
    cos = np.abs(sum(g * b for g, b in zip(grads, geo["beam"]))) / gmag
    del grads
    thin = min(1.0, 0.5 / h) ** 2               # a voxel coarser than 0.5 mm averages a thin echo over its width
    refl = np.float32(g_int * thin) * gmag * cos ** np.float32(p_spec)
    del gmag, cos
    g_sulc, q_sulc = _draw(rng, 300, 800), _draw(rng, 0.2, 0.5)     # sulcal line: gain, share seen at any angle
    cos2 = _facing(line > 0.5, geo["beam"], h)
    refl += np.float32(g_sulc * min(1.0, 0.5 / h)) * line * (q_sulc + (1 - q_sulc) * cos2 ** np.float32(p_spec / 2))
    del cos2, line
    refl *= np.exp(np.float32(g_var) * _smooth_noise(rng, shp, 2.0 / h) - np.float32(g_var ** 2 / 2))  # uneven
    # cavity rim (blood, haemostatic material) and blood/air pockets: they also cast shadows
    strong = np.zeros_like(refl)
    rim_gain, rim_w = _draw(rng, 2.0, 5.0), _draw(rng, 1.0, 2.5)
    if resected and (labels[box] == LABELS["cavity"]).any():
        rim_irr = np.clip(1 + 0.6 * _smooth_noise(rng, bshape, 2.0 / h), 0.1, None)
        wall = np.exp(-(np.maximum(db, 0) / (rim_w * rim_irr)) ** 2) * np.clip(db + 1, 0, 1)   # on the wall, not in the fluid
        strong[box] = np.float32(rim_gain) * wall * (1 - soft_rem) * np.clip(1 + 0.5 * _smooth_noise(rng, bshape, 1.0 / h), 0, None)
        del wall, rim_irr
    n_blobs = int(rng.integers(2, 7))
    wall_pts = np.argwhere((np.abs(d[::2, ::2, ::2]) < 1.5) & fov[::2, ::2, ::2]) * 2
    picked = wall_pts[rng.choice(len(wall_pts), min(n_blobs, len(wall_pts)), replace=False)] if len(wall_pts) else []
    for c in picked if resected else []:
        rad, amp = _draw(rng, 1.0, 3.0) * size / h, _draw(rng, 3.0, 8.0)      # a ball, edge 0.5 mm soft
        lo, hi = np.maximum(c - int(rad) - 3, 0), np.minimum(c + int(rad) + 4, shp)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        r = np.sqrt(sum(((np.arange(a, b) - cc) ** 2).reshape([-1 if i == k else 1 for i in range(3)])
                        for k, (a, b, cc) in enumerate(zip(lo, hi, c))))
        ball = np.clip((rad - r) * (h / 0.5) + 0.5, 0, 1).astype(np.float32)
        strong[sl] += np.float32(amp) * ball
        labels[sl][(ball > 0.5) & (labels[sl] == LABELS["cavity"])] = LABELS["blood_air"]
    n_pts, a_pts = _draw(rng, 0.2, 0.6), _draw(rng, 20.0, 60.0)     # sparse strong point scatterers
    pts = rng.random(shp, dtype=np.float32) < np.float32(min(n_pts * h ** 3, 1.0))
    pts &= (labels >= LABELS["gm"]) & (labels <= LABELS["tumour"])   # in tissue, not in fluid
    a_vox = a_pts * min(1.0, (0.5 / h) ** 1.5)                      # coarse voxels dilute a point's echo
    refl[pts] += np.float32(a_vox) * rng.uniform(0.3, 1.0, int(pts.sum())).astype(np.float32)
    del pts
    surf_gain, surf_w = _draw(rng, 1.0, 2.0), _draw(rng, 1.0, 2.0) * size
    refl += np.float32(surf_gain) * np.exp(-(np.maximum(depth, 0) / np.float32(surf_w)) ** 2) * (1 + 0.5 * np.tanh(
        _smooth_noise(rng, shp, 3.0 / h)))
    # --- shadowing along rays from the apex (coarse grid) --------------------------------------------
    beta = _draw(rng, 0.05, 0.15)
    shadow = _shadow(strong, geo["apex_v"], h, beta)
    refl += strong
    del strong
    # --- speckle: complex Gaussian scatterers through the PSF ---------------------------------------
    s_ax, s_la, s_el, q_coh = _draw(rng, 0.2, 0.3), _draw(rng, 0.5, 0.9), _draw(rng, 0.25, 0.45), _draw(rng, 0.5, 1.0)
    comp_vox = _draw(rng, 0.0, 0.2)
    sharp = _draw(rng, 0.2, 1.0)             # the specular echoes' PSF relative to the speckle's (below)
    frame = np.stack([geo["rot"].T @ geo["axis"], geo["rot"].T @ geo["lat"], geo["rot"].T @ geo["ele"]], 1)
    cov = frame @ np.diag(np.array([s_ax, s_la, s_el]) ** 2 / h ** 2) @ frame.T
    H = _gaussian_transfer(shp, cov)
    z = torch.complex(torch.from_numpy(rng.standard_normal(shp, dtype=np.float32)),
                      torch.from_numpy(rng.standard_normal(shp, dtype=np.float32)))
    Z = torch.fft.fftn(z)
    del z
    Z *= H
    speck = torch.fft.ifftn(Z).abs().numpy()
    del Z
    speck *= speck                                               # frame compounding in the reconstruction:
    speck = np.sqrt(ndi.gaussian_filter(speck, comp_vox))        # the intensity averaged over ~1 voxel
    speck /= speck[fov].mean() if fov.any() else speck.mean()
    cell_ml = (2 * np.pi) ** 1.5 * s_ax * s_la * s_el             # speckle cells per voxel reduce contrast
    if h ** 3 > cell_ml:
        speck = 1 + (speck - 1) * np.float32(np.sqrt(cell_ml / h ** 3))
    H2 = H * H                                                   # PSF^2 (intensity) transfer
    env = np.sqrt(np.maximum(_psf_blur(back, H2), 0))             # diffuse echo x speckle
    env *= speck
    # specular echo: coherent part + speckled part. Imaged sharper than the diffuse echo (whose speckle the
    # scanner's compounding smooths): the PSF's widths x ``sharp``, the reflectivity x sharp^2
    del H
    refl *= np.float32(sharp * sharp)
    spec = _psf_blur(refl, _gaussian_transfer(shp, cov * sharp * sharp))
    np.maximum(spec, 0, out=spec)
    speck *= np.float32(1 - q_coh)
    speck += np.float32(q_coh)
    spec *= speck
    env += spec
    del refl, spec, speck
    # --- propagation, display and the freehand reconstruction -----------------------------------------
    img = _display(rng, env, depth, shadow, fov, labels, geo["elevation"], geo["rot"].T @ geo["ele"], h, size, P)
    del env, shadow
    us = np.where(fov, np.clip(img, 0.5, 255), 0).astype(np.float32)   # inside the FOV never exactly 0
    P.update(backscatter_gm=b_gm, backscatter_fluid=b_fl, backscatter_tumour=b_tum, texture_sigma=tex_sig,
             texture_wavelength_mm=tex_wl, remnant=has_remnant, interface_gain=g_int, specular_power=p_spec, interface_variation=g_var, sulcal_gain=g_sulc, sulcal_diffuse_share=q_sulc,
             rim_gain=rim_gain, rim_width_mm=rim_w, n_blobs=int(len(picked)) if resected else 0, surface_gain=surf_gain,
             surface_width_mm=surf_w, shadow_beta=beta, psf_sigma_mm=[s_ax, s_la, s_el], specular_psf_scale=sharp,
             coherent_share=q_coh,
             points_per_ml=n_pts * 1000, point_amplitude=a_pts, compounding_vox=comp_vox)
    return us, labels


def _display(rng: np.random.Generator, env: np.ndarray, depth: np.ndarray, shadow: np.ndarray, fov: np.ndarray,
             labels: np.ndarray, elevation: np.ndarray, ev: np.ndarray, h: float, size: float, P: dict) -> np.ndarray:
    """Propagation, display and freehand reconstruction: the echo envelope ``env`` (linear, changed in
    place) becomes grey levels (float32, not clipped). ``depth`` and ``elevation`` are mm from the probe
    face and along the sweep, ``ev`` the unit elevation axis in voxel axes, ``h`` the voxel size (mm)."""
    shp = env.shape
    att, tgc_rms = _draw(rng, 0.006, 0.02), _draw(rng, 0.08, 0.18)
    dmm = np.maximum(depth, 0)
    ks = rng.uniform(1, 4, 3) * np.pi / 70.0
    ph = rng.uniform(0, 2 * np.pi, 3)
    am = rng.normal(size=3) * tgc_rms * np.sqrt(2 / 3)
    tgc = np.exp(-np.float32(att) * dmm + sum(np.float32(a) * np.sin(np.float32(k) * dmm / np.float32(size) + np.float32(p))
                                               for a, k, p in zip(am, ks, ph)))
    env *= tgc * shadow
    del tgc, shadow
    gam, med_level, floor = _draw(rng, 0.22, 0.32), _draw(rng, 22, 45), _draw(rng, 1, 3)
    # compression: grey = level * x**gam, x = env / its median in GM and WM
    tissue = fov & (labels >= LABELS["gm"]) & (labels <= LABELS["wm"])
    ref = float(np.median(env[tissue])) if tissue.any() else float(np.median(env[fov])) if fov.any() else 1.0
    env /= np.float32(max(ref, 1e-12))
    img = np.power(np.maximum(env, 0), np.float32(gam))
    del env
    img *= np.float32(med_level)
    edge_a, edge_l = _draw(rng, 0.3, 0.6), _draw(rng, 4, 10) * size   # the reconstruction darkens the FOV's
    img *= 1 - np.float32(edge_a) * np.exp(-_border_distance(fov, h) / np.float32(edge_l))   # border (fewer frames)
    # the freehand reconstruction: each voxel shows the nearest of the swept frames (planes across the
    # elevation axis, ``pitch`` apart): the image is sampled on that frame's plane, so it is continuous
    # within a frame and jumps between frames. The frames differ in gain (stripes across the sweep), and
    # voxels get jitter of uneven strength (frame density)
    pitch, f_gain = _draw(rng, 0.6, 1.2) * size, _draw(rng, 0.02, 0.06)
    u0 = np.float32(rng.random())
    frame = np.floor(elevation / np.float32(pitch) + u0).astype(np.int64)
    img = _nearest_frame(img, elevation - (frame + np.float32(0.5) - u0) * np.float32(pitch), ev, h)
    frame -= frame.min()
    img *= np.exp(np.float32(f_gain) * rng.standard_normal(int(frame.max()) + 1).astype(np.float32))[frame]
    del frame
    jitter = _draw(rng, 0.06, 0.14)
    dens = np.exp(np.float32(0.5) * _smooth_noise(rng, shp, 5.0 / h) - np.float32(0.125))
    dens *= np.float32(jitter)
    dens *= rng.standard_normal(shp, dtype=np.float32)
    dens += 1
    img *= dens
    del dens
    img += np.float32(floor) * np.abs(rng.standard_normal(shp, dtype=np.float32))
    # not rounded: the real volumes come resampled, their values are not integers (measured: no two
    # neighbours equal, where rounding made 6-8 % of neighbour pairs equal)
    P.update(attenuation_per_mm=att, tgc_rms=tgc_rms, gamma=gam, median_level=med_level, noise_floor=floor,
             reconstruction_jitter=jitter, frame_pitch_mm=pitch, frame_gain_sigma=f_gain, edge_darkening=edge_a,
             edge_length_mm=edge_l)
    return img


def _nearest_frame(img: np.ndarray, offset_mm: np.ndarray, ev: np.ndarray, h: float) -> np.ndarray:
    """Each voxel takes the image at its projection onto its nearest frame: ``img`` sampled (trilinear)
    ``offset_mm`` (mm, signed distance to that frame's plane) back along the unit elevation axis ``ev``
    (voxel axes)."""
    grid = np.indices(img.shape, dtype=np.float32)
    off = offset_mm / np.float32(h)
    for i in range(3):
        grid[i] -= off * np.float32(ev[i])
    return ndi.map_coordinates(img, grid, order=1, mode="nearest", output=np.float32)


def _sulci(csf: np.ndarray, h: float, max_width: float) -> np.ndarray:
    """Thin CSF (sulci, bool): CSF farther than ``max_width / 2`` (mm) from tissue is the core of wide
    fluid (ventricles, cisterns), which stays anechoic with specular walls; CSF outside that core
    dilated back is a sulcus, which echoes as cortex (real iUS shows a sulcus as one thin bright line,
    the sulcus mostly collapsed, not as fluid between two walls: see :func:`_sulcal_sheets`)."""
    if not csf.any():
        return csf
    din = ndi.distance_transform_edt(csf) * h                   # mm to tissue
    core = din > max_width / 2
    wide = (ndi.distance_transform_edt(~core) * h <= max_width / 2 + h) if core.any() else core
    return csf & ~wide


def _sulcal_sheets(labels: np.ndarray, h: float, min_depth: float) -> np.ndarray:
    """Sulci as one-voxel sheets (float32, 0 or 1), where real iUS shows the bright line of the pia,
    arachnoid and their vessels: the medial surface of the cortex (GM and CSF) between the white-matter
    cores of neighbouring gyri, i.e. the voxels where the distance to white matter (mm, smoothed by 0.5
    voxel) is a local maximum along a voxel axis, at least ``min_depth`` mm deep. The template's own
    CSF marks only the widest sulci; this finds the collapsed ones between every pair of gyri."""
    wm = labels == LABELS["wm"]
    ctx = (labels == LABELS["gm"]) | (labels == LABELS["csf"])
    if not wm.any() or not ctx.any():
        return np.zeros(labels.shape, np.float32)
    d = ndi.gaussian_filter(ndi.distance_transform_edt(~wm).astype(np.float32) * np.float32(h), 0.5)
    sheet = np.zeros(d.shape, bool)
    for ax in range(3):
        before, after = np.roll(d, 1, ax), np.roll(d, -1, ax)
        sheet |= (d >= before) & (d > after) & (2 * d - before - after > 0.15 * h)
    sheet &= ctx & (d > min_depth)
    return sheet.astype(np.float32)

def _facing(mask: np.ndarray, beam: list[np.ndarray], h: float) -> np.ndarray:
    """Squared cosine (0..1) between the beam and the normal of a thin sheet ``mask``, from its
    smoothed gradient: ``<(g . beam)^2> / <|g|^2>`` averaged over ~1.5 mm, so that a sheet's centre gets
    the orientation of its two faces. Computed on a grid 2x coarser at 0.5 mm (orientation varies slowly)."""
    f = max(1, int(round(1.0 / h)))
    m = ndi.gaussian_filter(mask[::f, ::f, ::f].astype(np.float32), 0.5 / (h * f))
    g = np.gradient(m)
    b = [x[::f, ::f, ::f] for x in beam]
    num = ndi.gaussian_filter(sum(gi * bi for gi, bi in zip(g, b)) ** 2, 1.5 / (h * f))
    den = ndi.gaussian_filter(sum(gi * gi for gi in g), 1.5 / (h * f)) + np.float32(1e-6)
    c2 = np.clip(num / den, 0, 1)
    if f > 1:
        c2 = F.interpolate(torch.from_numpy(c2)[None, None], scale_factor=f, mode="trilinear",
                           align_corners=False)[0, 0].numpy()
    return np.ascontiguousarray(c2[: mask.shape[0], : mask.shape[1], : mask.shape[2]])


def bounding_box(d: np.ndarray, thr: float) -> tuple[slice, ...]:
    """Bounding box (slices) of ``d < thr``, found on a 4x subsampled copy and padded by 4 voxels."""
    idx = np.argwhere(d[::4, ::4, ::4] < thr) * 4
    if not len(idx):
        return (slice(0, 0),) * 3
    return tuple(slice(max(a - 4, 0), b + 5) for a, b in zip(idx.min(0), idx.max(0)))


def _border_distance(fov: np.ndarray, h: float) -> np.ndarray:
    """Distance (mm) of each voxel to the FOV's border, computed on a 2x coarser grid (float32)."""
    small = np.pad(fov[::2, ::2, ::2], 1)
    dist = ndi.distance_transform_edt(small)[1:-1, 1:-1, 1:-1].astype(np.float32) * np.float32(2 * h)
    dist = F.interpolate(torch.from_numpy(dist)[None, None], scale_factor=2, mode="trilinear", align_corners=False)[0, 0]
    return dist[: fov.shape[0], : fov.shape[1], : fov.shape[2]].numpy()


def _shadow(strong: np.ndarray, apex_v: np.ndarray, h: float, beta: float) -> np.ndarray:
    """``exp(-beta * integral of strong along the ray from the apex)``, on a 2 mm grid, upsampled; the
    apex (voxels of this grid) may lie outside it, where ``strong`` counts as 0."""
    shp = np.array(strong.shape)
    f = max(1, int(round(2.0 / h)))
    m = -(-shp // f)
    rc = np.pad(strong, [(0, int(k)) for k in m * f - shp], mode="edge")
    rc = rc.reshape(m[0], f, m[1], f, m[2], f).mean((1, 3, 5))
    cn = [np.arange(k) * f + (f - 1) / 2.0 for k in m]
    pts = np.stack(np.meshgrid(*cn, indexing="ij"), 0).reshape(3, -1)
    K = 32
    integ = np.zeros(pts.shape[1], np.float32)
    for s in (np.arange(K) + 0.5) / K:
        q = (apex_v[:, None] + (pts - apex_v[:, None]) * s - (f - 1) / 2.0) / f
        integ += ndi.map_coordinates(rc, q, order=1, mode="constant", cval=0.0, output=np.float32)
    integ *= np.linalg.norm((pts - apex_v[:, None]) * h, axis=0) / K
    shadow = np.exp(-beta * integ).reshape(1, 1, *m).astype(np.float32)
    shadow = F.interpolate(torch.from_numpy(shadow), scale_factor=f, mode="trilinear", align_corners=False)[0, 0]
    return shadow[: shp[0], : shp[1], : shp[2]].numpy()


# --------------------------------------------------------------------------------------------
# calibration numbers and the real-vs-simulated figure (``python -m brainshift.ultrasound``)
# --------------------------------------------------------------------------------------------
def describe(path: str) -> dict:
    """Numbers the parameters above were set from, for one iUS volume (real or simulated; any spacing
    close to 0.5 mm): FOV volume (ml) and principal extents (mm), intensity quantiles / median inside the
    FOV, share of voxels over 3x the median, and the median of the volume at distance bands (mm) from
    the FOV's border, over the FOV median."""
    import nibabel as nib

    img = nib.load(path)
    v = np.asarray(img.dataobj, np.float32)
    h = float(np.mean(img.header.get_zooms()[:3]))
    fov = v > 0
    pts = np.argwhere(fov) * h
    ext = np.ptp((pts - pts.mean(0)) @ np.linalg.eigh(np.cov(pts.T))[1], axis=0)
    med = float(np.median(v[fov]))
    dist = ndi.distance_transform_edt(fov) * h
    bands = [(0, 1), (1, 4), (4, 9), (9, 20)]
    return {"fov_ml": float(fov.sum() * h ** 3 / 1000), "extent_mm": sorted(np.round(ext, 1).tolist(), reverse=True),
            "median": med, "quantiles_over_median": {q: float(np.percentile(v[fov], q) / med) for q in (1, 10, 90, 99)},
            "bright_share": float((v[fov] > 3 * med).mean()),
            "border_profile": {f"{a}-{b} mm": float(np.median(v[(dist > a) & (dist <= b)]) / med)
                               if ((dist > a) & (dist <= b)).any() else None for a, b in bands}}


def figure(real: list[str], sim: list[str], out: str) -> str:
    """Three orthogonal slices through the FOV centre of each volume, real on top, simulated below,
    each shown from 0 to its own 99.5th percentile inside the FOV (voxel axes; grids differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    rows = [("real", p) for p in real] + [("simulated", p) for p in sim]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)))
    for r, (kind, p) in enumerate(rows):
        v = np.asarray(nib.load(p).dataobj, np.float32)
        fov = v > 0
        lo, hi = np.argwhere(fov).min(0), np.argwhere(fov).max(0) + 1
        v = v[tuple(slice(a, b) for a, b in zip(lo, hi))]
        c = (np.array(v.shape) // 2)
        vmax = np.percentile(v[v > 0], 99.5)
        for a in range(3):
            sl = [slice(None)] * 3
            sl[a] = c[a]
            ax = axes[r, a]
            ax.imshow(v[tuple(sl)].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if a == 0:
                name = p.split("/")[-1].replace(".nii.gz", "")
                ax.set_ylabel(f"{kind}\n{name[:22]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m brainshift.ultrasound",
                                 description="Calibration numbers of iUS volumes (--describe), or a real vs "
                                 "simulated figure (--figure OUT with --real and --sim).")
    ap.add_argument("--real", nargs="*", default=[], help="real iUS volumes (.nii.gz)")
    ap.add_argument("--sim", nargs="*", default=[], help="simulated iUS volumes (.nii.gz)")
    ap.add_argument("--figure", help="write the real-vs-simulated slice figure here (.png)")
    a = ap.parse_args(argv)
    if not a.real and not a.sim:
        ap.error("give --real and/or --sim volumes")
    if a.figure:
        print(figure(a.real, a.sim, a.figure))
        return 0
    for p in a.real + a.sim:
        print(p, json.dumps(describe(p)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
