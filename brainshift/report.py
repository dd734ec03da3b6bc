"""Quality-control report: a per-stage figure per case, a per-case JSON, and one HTML page per run.

* :func:`case_figure` — the paper's Fig. 5 for one pair: one row per stage (``input`` = the images'
  own alignment, then the field after each stage), three panels per view: the iUS over the warped
  MR, the difference of the normalised intensities inside the iUS field of view, and the
  displacement length in mm. Only the plotted slices are resampled (never the whole volume).
* :func:`case_report_json` / :func:`write_case_report` — ``OUT/qc/<stem>_report.json``: time per
  stage, SSC-MSE against the raw iUS inside the iUS mask before and after each stage, SDlogJ (official
  and plain) and folds of the final field, its largest displacement (mm), and the stage decisions.
* :func:`write_case_qc` — both of the above for one registered pair (what ``run_case(qc=True)`` calls).
* :func:`build_html` — ``OUT/report.html`` (``brainshift report OUT``): one self-contained page
  (figures inline as base64 PNG, no external resource) with a summary table of every case (and the
  TRE from ``OUT/metrics.json`` when ``brainshift evaluate`` wrote one).

Conventions as :mod:`brainshift.fields`: a field is a float32 (X,Y,Z,3) voxel pull field on the
fixed grid (moving voxel = ``p + disp[p]``); arrays are indexed ``[i, j, k]`` like
:class:`brainshift.io.Volume`; ``spacing`` is the voxel size in mm along i, j, k.
"""
from __future__ import annotations

import base64
import html
import io as _io
import json
import os
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from .io import json_ready

#: Views of :func:`case_figure`: world axis (RAS index) of the slice normal, the horizontal and the vertical.
VIEWS = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
#: World axis letters (towards +) and (towards -), for the panel edges.
_POS, _NEG = "RAS", "LPI"


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------
def _world_to_voxel_axes(affine: np.ndarray | None) -> list[tuple[int, int]]:
    """For each world axis (R, A, S): (voxel axis nearest to it, +1/-1 direction)."""
    if affine is None:
        return [(0, 1), (1, 1), (2, 1)]
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    out = [(0, 1)] * 3
    for vox, (world, sign) in enumerate(ornt):
        out[int(world)] = (vox, int(sign))
    return out


def mask_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of a boolean volume: (lo, hi) voxel indices, ``hi`` exclusive; the whole grid if empty."""
    mask = np.asarray(mask, dtype=bool)
    lo, hi = np.zeros(3, int), np.array(mask.shape[:3], int)
    for a in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))
        if hit.size:
            lo[a], hi[a] = hit[0], hit[-1] + 1
    return lo, hi


def _sample(moving: np.ndarray, base: list[np.ndarray], disp: np.ndarray | None, shape: tuple) -> np.ndarray:
    """``moving`` (trilinear, 0 outside) at ``base + disp``: ``base`` = 3 broadcastable index arrays."""
    coords = np.empty((3,) + tuple(shape), dtype=np.float32)
    for c in range(3):
        coords[c] = base[c] if disp is None else base[c] + disp[..., c]
    return map_coordinates(moving, coords, order=1, mode="constant", cval=0.0, prefilter=False, output=np.float32)


def _norm(values: np.ndarray, sel: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> tuple[float, float]:
    """Robust display range (percentiles) of ``values[sel]``; (0, 1) when empty or flat."""
    v = values[sel]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _rank(x: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Each value's quantile (0..1) among ``x[sel]``: a monotone normalisation that gives both modalities
    the same (uniform) distribution inside the mask, so their difference is centred on 0."""
    ref = np.sort(x[sel])
    if ref.size == 0:
        return np.zeros_like(x, dtype=np.float32)
    return (np.searchsorted(ref, x, side="right") / ref.size).astype(np.float32)


def _scale(x: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    return np.clip((x - rng[0]) / (rng[1] - rng[0]), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------
def slice_panels(fixed: np.ndarray, moving: np.ndarray, fields: list[np.ndarray | None], mask: np.ndarray,
                 spacing=(1.0, 1.0, 1.0), affine: np.ndarray | None = None, moving_spacing=None,
                 views: tuple[str, ...] = tuple(VIEWS)) -> list[dict]:
    """The 2D data of :func:`case_figure`: per view, one slice through the centre of the mask's bounding box.

    Each view's dict holds ``fixed``, ``mask`` and per field (``None``: identity) ``moving`` (the
    moving image sampled trilinearly at ``p + disp[p]`` for the slice voxels only) and ``mag``
    (``|disp|`` in mm with ``moving_spacing``); every 2D array is ``[horizontal, vertical]``, oriented
    by ``affine`` (horizontal towards R, or A for sagittal; vertical towards A, or S), cropped to the
    mask's bounding box + 5 mm. ``extent``: the panel size in mm (horizontal, vertical).
    """
    fixed = np.asarray(fixed)
    moving = np.asarray(moving, dtype=np.float32)
    shape = fixed.shape[:3]
    mask = np.asarray(mask, dtype=bool)
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    mspacing = spacing if moving_spacing is None else np.broadcast_to(np.asarray(moving_spacing, np.float64), (3,))
    lo, hi = mask_box(mask)
    centre = (lo + hi - 1) // 2
    margin = np.ceil(5.0 / spacing).astype(int)
    clo, chi = np.maximum(lo - margin, 0), np.minimum(hi + margin, shape)
    w2v = _world_to_voxel_axes(affine)

    # ---- slices: fixed, mask, and per row the warped MR and the displacement length (mm)
    panels = []  # per view: dict
    for view in views:
        n_w, h_w, v_w = VIEWS[view]
        (n, _), (h, sh), (v, sv) = w2v[n_w], w2v[h_w], w2v[v_w]
        sl: list = [slice(None)] * 3
        sl[n] = int(centre[n])
        sl[h] = slice(int(clo[h]), int(chi[h]))
        sl[v] = slice(int(clo[v]), int(chi[v]))
        sl_t = tuple(sl)
        nh, nv = int(chi[h] - clo[h]), int(chi[v] - clo[v])
        ax_h, ax_v = (0, 1) if h < v else (1, 0)          # positions of h and v in the 2D slice
        slice_shape = (nh, nv) if h < v else (nv, nh)
        base: list = [None] * 3
        base[n] = np.float32(centre[n])
        base[h] = np.arange(clo[h], chi[h], dtype=np.float32).reshape([-1 if a == ax_h else 1 for a in range(2)])
        base[v] = np.arange(clo[v], chi[v], dtype=np.float32).reshape([-1 if a == ax_v else 1 for a in range(2)])

        def orient(a: np.ndarray, h=h, v=v, sh=sh, sv=sv) -> np.ndarray:
            a = a if h < v else np.swapaxes(a, 0, 1)   # -> [horizontal, vertical]
            return a[::sh, ::sv]                       # horizontal towards +world (R or A), vertical up

        p = {"view": view, "fixed": orient(fixed[sl_t].astype(np.float32)), "mask": orient(mask[sl_t]),
             "extent": (nh * spacing[h], nv * spacing[v]), "moving": [], "mag": [],
             "edges": (_NEG[h_w], _POS[h_w], _NEG[v_w], _POS[v_w])}
        for disp in fields:
            d = None if disp is None else np.asarray(disp[sl_t], dtype=np.float32)   # slice_shape + (3,)
            p["moving"].append(orient(_sample(moving, base, d, slice_shape)))
            p["mag"].append(np.zeros((nh, nv), np.float32) if d is None
                            else orient(np.sqrt(((d * mspacing.astype(np.float32)) ** 2).sum(-1))))
        panels.append(p)

    return panels


def case_figure(fixed: np.ndarray, moving: np.ndarray, steps: dict[str, np.ndarray], mask: np.ndarray | None,
                path: str | os.PathLike, spacing=(1.0, 1.0, 1.0), title: str = "", *,
                labels: dict[str, str] | None = None, affine: np.ndarray | None = None,
                moving_spacing=None, views: tuple[str, ...] = tuple(VIEWS), dpi: int = 80) -> Path:
    """Write the per-stage QC figure (the paper's Fig. 5) as a PNG; return its path.

    Rows: ``input`` (identity field), then one row per entry of ``steps`` (stage name -> field after
    that stage), in order. Per view (``views``; default axial, coronal, sagittal through the centre of
    the iUS mask's bounding box, cropped to that box + 5 mm), three panel groups:

    1. **iUS over MR**: the MR warped by the row's field in grey, the iUS on top in a hot colour whose
       opacity follows the echo intensity (the iUS field of view outlined in cyan; the iUS blurred by
       0.8 pixel against speckle). Echogenic structures (falx, sulci, ventricle walls, the
       resection-cavity rim) should lie on the matching MR edges; a shift shows as a colour edge
       beside its grey edge. This reads better than a checkerboard, which the speckle-dominated iUS
       breaks into noise at this size.
    2. **difference**: iUS minus MR, each normalised inside the iUS mask of the slice to its quantiles
       (rank / histogram equalisation, 0..1), so both have one distribution and the difference is
       centred on 0 (blue: MR relatively brighter, red: iUS brighter). The modalities differ, so judge
       the change between rows (structure edges fading) rather than the absolute values.
    3. **|displacement| (mm)**: length of the row's field (relative to the identity) in mm, one colour
       scale for all rows; the ``input`` row shows the iUS alone there instead.

    ``fixed``, ``mask``: fixed grid; ``moving``: the moving MR on its own grid (indexed by the field);
    fields are voxel pull fields on the fixed grid. ``spacing``: fixed voxel size (mm, i/j/k) for the
    aspect ratio; ``moving_spacing`` (default ``spacing``) converts voxel displacements to mm.
    ``affine`` (fixed voxel -> RAS mm) orients the views (patient right on the right, anterior /
    superior up); without it the voxel axes are taken as R, A, S. ``labels``: optional extra text per
    row (key: 'input' or a stage name). Only the plotted slices are resampled (trilinear), so this
    costs about a second whatever the volume size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    fixed = np.asarray(fixed)
    moving = np.asarray(moving, dtype=np.float32)
    mask = (fixed > 0) if mask is None else np.asarray(mask, dtype=bool)
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    mspacing = spacing if moving_spacing is None else np.broadcast_to(np.asarray(moving_spacing, np.float64), (3,))
    labels = labels or {}
    rows = [("input", None)] + list(steps.items())
    panels = slice_panels(fixed, moving, [d for _, d in rows], mask, spacing, affine, mspacing, views)

    # ---- intensity ranges
    fsel = [p["mask"] for p in panels]
    f_rng = _norm(np.concatenate([p["fixed"][m] for p, m in zip(panels, fsel)]), slice(None))
    m_disp = _norm(np.concatenate([p["moving"][0].ravel() for p in panels]),
                   np.concatenate([p["moving"][0].ravel() > 0 for p in panels]), 0.5, 99.5)
    mag_max = max(float(max(m.max() for m in p["mag"])) for p in panels)
    mag_max = max(mag_max, 1e-3)

    # ---- layout (inches): panels sized by their physical extent, so the aspect is right
    panel_h = 1.7
    mm_to_in = panel_h / max(p["extent"][1] for p in panels)
    widths = [p["extent"][0] * mm_to_in for p in panels]
    gap, group_gap, cb_w, cb_pad, row_title, head = 0.06, 0.22, 0.11, 0.5, 0.30, 0.22
    left = 0.12
    group_w = sum(widths) + gap * (len(panels) - 1)
    fig_w = left + 3 * group_w + 2 * group_gap + 2 * (cb_w + cb_pad) - group_gap + 0.1
    row_h = row_title + panel_h + 0.05
    top = 0.45 if title else 0.1
    fig_h = top + head + row_h * len(rows) + 0.1
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    fig.patch.set_facecolor("white")
    if title:
        fig.text(left / fig_w, 1 - 0.28 / fig_h, title, fontsize=12, weight="bold", va="center")

    def axes_at(x: float, y_top: float, w: float, h: float):
        return fig.add_axes([x / fig_w, 1 - (y_top + h) / fig_h, w / fig_w, h / fig_h])

    diff_norm = Normalize(-1.0, 1.0)
    mag_norm = Normalize(0.0, mag_max)
    group_titles = ("iUS (hot) over warped MR", "iUS - MR (rank-normalised in the iUS mask)", "|displacement| (mm)")
    for r, (name, _) in enumerate(rows):
        y = top + head + r * row_h
        text = name if name not in labels else f"{name}: {labels[name]}"
        fig.text(left / fig_w, 1 - (y + row_title * 0.55) / fig_h, text, fontsize=10, va="center",
                 weight="bold" if r == 0 else "normal")
        y_img = y + row_title
        x = left
        for g in range(3):
            for p, w in zip(panels, widths):
                ax = axes_at(x, y_img + (panel_h - p["extent"][1] * mm_to_in), w, p["extent"][1] * mm_to_in)
                ext = (0, p["extent"][0], 0, p["extent"][1])
                fx = _scale(p["fixed"], f_rng)
                if g == 0:
                    fx = gaussian_filter(fx, 0.8)  # a light blur keeps the speckle from hiding the echogenic structures
                    mr = _scale(p["moving"][r], m_disp)
                    # only the echogenic part of the iUS (upper ~40 % of its range) is drawn, opaque with brightness
                    alpha = (np.clip((fx - 0.45) / 0.4, 0, 1) * 0.9 * p["mask"])[..., None]
                    hot = np.stack([np.ones_like(fx), np.clip(0.3 + fx * 0.9, 0, 1), np.clip(fx * 2 - 1.2, 0, 1)], -1)
                    rgb = mr[..., None] * (1 - alpha) + hot * alpha
                    ax.imshow(np.swapaxes(rgb, 0, 1), origin="lower", extent=ext, interpolation="nearest")
                    if p["mask"].any() and not p["mask"].all():
                        ax.contour(p["mask"].T.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.6,
                                   extent=ext, origin="lower")
                elif g == 1:
                    diff = np.where(p["mask"], _rank(p["fixed"], p["mask"]) - _rank(p["moving"][r], p["mask"]), np.nan)
                    im_diff = ax.imshow(diff.T, origin="lower", extent=ext, cmap="RdBu_r", norm=diff_norm,
                                        interpolation="nearest")
                    ax.set_facecolor("0.85")
                elif r == 0:
                    ax.imshow(fx.T, origin="lower", extent=ext, cmap="gray", interpolation="nearest")
                else:
                    im_mag = ax.imshow(p["mag"][r].T, origin="lower", extent=ext, cmap="magma", norm=mag_norm,
                                       interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(p["view"], fontsize=8, pad=2)
                    if g == 0:
                        lft, rgt, bot, tp = p["edges"]
                        for s, (tx, ty, ha, va) in zip((lft, rgt, tp), ((0.02, 0.5, "left", "center"),
                                                                         (0.98, 0.5, "right", "center"),
                                                                         (0.5, 0.98, "center", "top"))):
                            ax.text(tx, ty, s, transform=ax.transAxes, color="yellow", fontsize=7, ha=ha, va=va)
                x += w + gap
            x -= gap
            if r == 0:
                fig.text((x - group_w / 2) / fig_w, 1 - (top + 0.1) / fig_h, group_titles[g] if g < 2 else
                         f"{group_titles[2]}  (input row: the iUS)", fontsize=9, ha="center", va="center")
            if g == 1:
                cax = axes_at(x + 0.06, y_img + 0.1, cb_w, panel_h - 0.2)
                cb = fig.colorbar(im_diff, cax=cax)
                cb.ax.tick_params(labelsize=7)
                x += cb_w + cb_pad
            elif g == 2 and r > 0:
                cax = axes_at(x + 0.06, y_img + 0.1, cb_w, panel_h - 0.2)
                cb = fig.colorbar(im_mag, cax=cax)
                cb.ax.tick_params(labelsize=7)
                cb.set_label("mm", fontsize=7, labelpad=1)
            x += group_gap
    return _save_png(fig, Path(path), dpi)


def _save_png(fig, path: Path, dpi: int) -> Path:
    """Save a figure as a palette PNG (256 colours: about a third of the RGB size), atomically."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from .io import _atomic_write

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    return _atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=True))


# --------------------------------------------------------------------------------------------
# per-case numbers
# --------------------------------------------------------------------------------------------
class SSCBox:
    """SSC-MSE (as :func:`brainshift.ssc.ssc_mse`) of the iUS and the MR warped by a field, inside a mask.

    Only the mask's bounding box (+ a margin wider than the descriptor's reach, aligned to the
    pooling blocks of the whole volume) is resampled, and the iUS descriptor is computed once, so
    each call costs one crop resampling and one descriptor. The value equals the whole-volume
    :func:`~brainshift.ssc.ssc_mse` up to the descriptor's variance clamp (which uses the mean
    over the grid it is given).
    """

    def __init__(self, fixed: np.ndarray, mask: np.ndarray, radius: int = 1, dilation: int = 2) -> None:
        from .ssc import auto_factor, downsample, downsample_mask, ssc_descriptor

        shape = np.array(fixed.shape[:3])
        self.factor = f = auto_factor(tuple(int(s) for s in shape))
        self.radius, self.dilation = radius, dilation
        lo, hi = mask_box(mask)
        reach = (radius + dilation + 1) * f
        lo = np.maximum((lo - reach) // f * f, 0)
        hi = np.minimum(-(-(hi + reach) // f) * f, shape)
        self.lo, self.hi = lo, hi
        self.slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        self.shape = tuple(int(b - a) for a, b in zip(lo, hi))
        self.base = [np.arange(lo[a], hi[a], dtype=np.float32).reshape([-1 if b == a else 1 for b in range(3)])
                     for a in range(3)]
        self.grid = tuple(fixed.shape[:3])
        self.desc_fixed = ssc_descriptor(downsample(np.asarray(fixed[self.slices], dtype=np.float32), f),
                                         radius, dilation)
        self.mask = downsample_mask(np.asarray(mask[self.slices], dtype=bool), f)

    def __call__(self, moving: np.ndarray, disp: np.ndarray | None = None) -> float:
        """SSC-MSE with ``moving`` warped by ``disp`` (voxel pull field on the fixed grid; None: identity)."""
        from .ssc import descriptor_mse, downsample, ssc_descriptor

        moving = np.asarray(moving, dtype=np.float32)
        if disp is None and moving.shape[:3] == self.grid:
            warped = moving[self.slices]
        else:
            warped = _sample(moving, self.base, None if disp is None else disp[self.slices], self.shape)
        desc = ssc_descriptor(downsample(warped, self.factor), self.radius, self.dilation)
        return descriptor_mse(self.desc_fixed, desc, self.mask)


def max_displacement_mm(disp: np.ndarray, spacing) -> float:
    """Largest displacement length of a voxel field, in mm (``spacing``: moving voxel size), slab by slab."""
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float32), (3,))
    best = 0.0
    for i in range(0, disp.shape[0], 16):
        best = max(best, float(np.sqrt(((disp[i:i + 16] * sp) ** 2).sum(-1)).max()))
    return best


def decisions(record: dict) -> dict[str, str]:
    """One line per stage decision in a record: the coarse model kept (+ LTS share, fixed image, criterion), the guard."""
    out = {}
    st = record.get("stages", {})
    if "affine" in st:
        a = st["affine"]
        text = f"{a.get('kept')} kept"
        details = []
        if a.get("share") is not None:
            details.append(f"LTS share {a['share']:g} %")
        if a.get("kept") not in (None, "identity") and a.get("fixed_image"):
            details.append(f"fixed image {a['fixed_image']}")
        if a.get("criterion"):
            details.append(f"by {a['criterion']}")
        if details:
            text += f" ({', '.join(details)})"
        out["affine"] = text
    if "deform" in st:
        d = st["deform"]
        out["deform"] = d.get("reason") or ("kept" if d.get("kept") else "rejected")  # the guard's own line
    return out


def stage_fields(record: dict, stage_outputs: dict, disp: np.ndarray) -> dict[str, np.ndarray]:
    """The fields to report, stage name -> field after that stage: the pipeline's ``fields``, else the final
    field under the record's last stage name (``rigid`` for niftyreg-rigid), else none (identity)."""
    steps = stage_outputs.get("fields") if stage_outputs else None
    if steps:
        return dict(steps)
    if record.get("method") == "identity":
        return {}
    names = list(record.get("stages", {}))
    return {names[-1] if names else record.get("method", "final"): disp}


def case_report_json(record: dict, fixed: np.ndarray, moving: np.ndarray, steps: dict[str, np.ndarray],
                     mask: np.ndarray | None, moving_spacing=(1.0, 1.0, 1.0)) -> dict:
    """The per-case QC numbers (JSON-ready).

    ``record``: :func:`brainshift.pipeline.run_case`'s record (method, stages with their
    ``seconds``, total ``seconds``, case, field). ``steps``: stage name -> field after the stage
    (see :func:`stage_fields`); the last one is the final field. SSC-MSE is against the raw iUS,
    inside ``mask`` (default ``fixed > 0``), with the raw moving MR warped by each field
    (:class:`SSCBox`). Jacobian statistics (:func:`brainshift.metrics.jacobian_stats`) and the
    largest displacement (mm, ``moving_spacing``) are those of the final field. ``guard``: the
    deformable guard's own numbers (its SSC-MSE is against the image the stage registered to, e.g.
    the synthetic T1). Works with no stages (identity) too.
    """
    from .metrics import jacobian_stats

    mask = (np.asarray(fixed) > 0) if mask is None else np.asarray(mask, dtype=bool)
    measure = SSCBox(fixed, mask)
    st = record.get("stages", {})
    ssc = {"input": measure(moving)}
    seen: list[tuple[np.ndarray, float]] = []
    for name, disp in steps.items():
        same = next((v for f, v in seen if f is disp), None)  # a rejected stage hands on the same array
        ssc[name] = same if same is not None else measure(moving, disp)
        seen.append((disp, ssc[name]))
    final = list(steps.values())[-1] if steps else None
    if final is None:
        jac, max_mm = {"sdlogj": 0.0, "sdlogj_plain": 0.0, "folds": 0}, 0.0
    else:
        jac, max_mm = jacobian_stats(final), max_displacement_mm(final, moving_spacing)
    out = {
        "case": record.get("case"), "method": record.get("method"), "field": record.get("field"),
        "seconds": {**{k: v.get("seconds") for k, v in st.items() if isinstance(v, dict)},
                    "total": record.get("seconds")},
        "ssc_mse": ssc,
        "final": {**jac, "max_disp_mm": max_mm},
        "decisions": decisions(record),
        "guard": {k: v for k, v in st.get("deform", {}).items()
                  if k in ("kept", "reason", "ssc_before", "ssc_after", "sdlogj", "folds", "max_disp_mm")},
    }
    return json_ready(out)


def write_case_report(path: str | os.PathLike, report: dict) -> Path:
    """Write a :func:`case_report_json` dict as JSON, atomically."""
    from .io import _atomic_write

    text = json.dumps(json_ready(report), indent=2)
    return _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def row_labels(report: dict) -> dict[str, str]:
    """Figure row text per stage: time, SSC-MSE against the iUS, decision."""
    out = {}
    secs, ssc, dec = report.get("seconds", {}), report.get("ssc_mse", {}), report.get("decisions", {})
    for name, value in ssc.items():
        parts = []
        if secs.get(name) is not None:
            parts.append(f"{secs[name]:.1f} s")
        if value is not None:
            parts.append(f"SSC-MSE {value:.4f}")
        if name in dec:
            parts.append(dec[name])
        out[name] = ", ".join(parts)
    return out


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#eee}
td.l{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}
h2{font-size:16px;margin-top:2em;border-bottom:1px solid #ccc}
.note{color:#555;font-size:13px}
"""


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _tre(metrics: dict, pair: str) -> tuple[float | None, float | None]:
    """(mean, max) TRE in mm of one pair from an official-shaped metrics.json, or (None, None)."""
    lm = metrics.get("cases", {}).get(pair, {}).get("TRE_lm")
    if not isinstance(lm, dict):
        return None, None
    detailed = lm.get("detailed")
    worst = max(detailed) if isinstance(detailed, list) and detailed else None
    return lm.get("mean"), worst


def build_html(out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` from ``out_dir/qc/*_report.json`` (+ figures, + ``metrics.json``).

    One self-contained page: a summary table (pair, method, seconds per stage, SSC-MSE input ->
    final, stage decisions, SDlogJ official / plain, folds, largest displacement in mm, and TRE
    mean / max in mm when ``out_dir/metrics.json`` from ``brainshift evaluate`` is there), then per
    case the stage figure and the affine stage's SSC-MSE curve, inline as base64 PNG. All text is
    HTML-escaped. Raises :class:`brainshift.io.InputError` when there is no report to show.
    """
    from .io import InputError, _atomic_write

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: folder not found")
    qc = out_dir / "qc"
    files = sorted(qc.glob("*_report.json")) if qc.is_dir() else []
    if not files:
        raise InputError(f"{out_dir}: no QC reports (qc/*_report.json); run `brainshift run` without --no-qc first")
    reports, unreadable = [], []
    for f in files:
        try:
            doc = json.loads(f.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            reports.append((f.name[: -len("_report.json")], doc))
        except (OSError, ValueError) as exc:
            unreadable.append(f"{f.name}: {exc}")
    metrics: dict = {}
    mpath = out_dir / "metrics.json"
    if mpath.is_file():
        try:
            metrics = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            unreadable.append(f"metrics.json: {exc}")
    has_tre = any(_tre(metrics, str(doc.get("case")))[0] is not None for _, doc in reports)

    e = html.escape
    head = ["pair", "method", "seconds per stage", "total s", "SSC-MSE input &rarr; final", "decisions",
            "SDlogJ (official / plain)", "folds", "max |disp| mm"] + (["TRE mean mm", "TRE max mm"] if has_tre else [])
    lines = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(f'brainshift QC: {out_dir.resolve().name}')}</title><style>{_CSS}</style></head><body>",
             f"<h1>brainshift QC report: {e(str(out_dir))}</h1>",
             f'<p class="note">{len(reports)} pair(s). SSC-MSE: self-similarity-context mean squared difference '
             "between the iUS and the MR warped by the field after each stage, inside the iUS field of view (lower is "
             "better). SDlogJ and folds (voxels with J &le; 0) of the final field. Figures: one row per stage; "
             "per view the iUS (hot colours) over the warped MR, the difference of the normalised intensities "
             "inside the iUS mask, and the displacement length in mm.</p>",
             "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for stem, doc in reports:
        pair = str(doc.get("case") or stem)
        secs = doc.get("seconds", {}) or {}
        ssc = doc.get("ssc_mse", {}) or {}
        fin = doc.get("final", {}) or {}
        ssc_vals = list(ssc.values())
        stage_secs = "<br>".join(f"{e(str(k))} {_fmt(v, '.1f')}" for k, v in secs.items() if k != "total") or "-"
        dec = "<br>".join(f"{e(str(k))}: {e(str(v))}" for k, v in (doc.get("decisions") or {}).items()) or "-"
        cells = [f'<td class="l"><a href="#{e(stem, quote=True)}">{e(pair)}</a></td>',
                 f'<td class="l">{e(str(doc.get("method", "-")))}</td>',
                 f'<td class="l">{stage_secs}</td>', f"<td>{_fmt(secs.get('total'), '.1f')}</td>",
                 f"<td>{_fmt(ssc_vals[0] if ssc_vals else None, '.4f')} &rarr; "
                 f"{_fmt(ssc_vals[-1] if ssc_vals else None, '.4f')}</td>",
                 f'<td class="l">{dec}</td>',
                 f"<td>{_fmt(fin.get('sdlogj'), '.4f')} / {_fmt(fin.get('sdlogj_plain'), '.4f')}</td>",
                 f"<td>{_fmt(fin.get('folds'), 'd')}</td>", f"<td>{_fmt(fin.get('max_disp_mm'), '.2f')}</td>"]
        if has_tre:
            mean, worst = _tre(metrics, pair)
            cells += [f"<td>{_fmt(mean, '.2f')}</td>", f"<td>{_fmt(worst, '.2f')}</td>"]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    if has_tre:
        lines.append(f'<p class="note">TRE from {e(mpath.name)} (brainshift evaluate): the final field.</p>')
    if unreadable:
        lines.append('<p class="note">Could not read: ' + "; ".join(e(u) for u in unreadable) + "</p>")
    for stem, doc in reports:
        pair = str(doc.get("case") or stem)
        lines.append(f'<h2 id="{e(stem, quote=True)}">{e(pair)} ({e(str(doc.get("method", "")))})</h2>')
        for suffix, alt in (("_stages.png", "stages"), ("_affine_curve.png", "affine SSC-MSE curve")):
            png = qc / f"{stem}{suffix}"
            if png.is_file():
                lines.append(f'<div><img alt="{e(f"{pair} {alt}", quote=True)}" src="{_png_uri(png)}"></div>')
    lines.append("</body></html>")
    text = "\n".join(lines) + "\n"
    return _atomic_write(out_dir / "report.html", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_case_qc(qc_dir: str | os.PathLike, stem: str, record: dict, fixed, moving, stage_outputs: dict,
                  disp: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Path]:
    """Write ``qc_dir/<stem>_report.json`` and ``qc_dir/<stem>_stages.png`` for one registered pair.

    ``fixed``, ``moving``: :class:`brainshift.io.Volume`; ``stage_outputs``, ``disp``: the
    :class:`brainshift.pipeline.Result`'s; ``mask``: the iUS field of view (default ``fixed > 0``).
    Uses the fields already in memory (no full-volume warp). Returns the written paths.
    """
    qc_dir = Path(qc_dir)
    mask = fixed.data > 0 if mask is None else np.asarray(mask, dtype=bool)
    steps = stage_fields(record, stage_outputs, disp)
    doc = case_report_json(record, fixed.data, moving.data, steps, mask, moving.spacing)
    paths = {"report": write_case_report(qc_dir / f"{stem}_report.json", doc)}
    paths["figure"] = case_figure(fixed.data, moving.data, steps, mask, qc_dir / f"{stem}_stages.png", fixed.spacing,
                                  title=f"{record.get('case', stem)}  ({record.get('method', '')})",
                                  labels=row_labels(doc), affine=fixed.affine, moving_spacing=moving.spacing)
    return paths
