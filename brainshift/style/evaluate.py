"""Evaluation of the style transfer on simulated cases (where the true brain shift is known).

For each case: the T1 is pulled onto the iUS grid with the true field (``fields.warp``), then,
inside the iUS field of view (``us > 0``), the global NCC of synthetic T1 vs aligned T1 is compared
with that of the raw iUS vs aligned T1 (the iUS intensities relate to T1 non-monotonically, so
the raw number is low). For T2: NCC(t2_to_t1_like(T2), T1) vs NCC(T2, T1) inside the head, on the
MR grid (T1 and T2 share it).
"""
from __future__ import annotations

import time

import numpy as np

from ..fields import warp
from .infer import StyleModel, load_style_model, synthesize_t1
from .t2 import t2_to_t1_like


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Global normalised cross-correlation of ``a`` and ``b`` over ``mask``."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum() + 1e-12))


def appearance(synth: np.ndarray, us: np.ndarray, aligned_t1: np.ndarray) -> dict[str, float]:
    """How close the synthetic T1 and the raw iUS each come to the true T1, inside the field of view
    (``us > 0``); all three on the iUS grid, ``aligned_t1`` pulled there with the true field.

    ``ncc_*``: global NCC (higher is closer). ``ssc_*``: SSC-MSE (:func:`brainshift.ssc.ssc_mse`,
    lower is closer) against the T1 set to 0 outside the field of view, as both candidates are. An
    SSC descriptor reaches 3 voxels of its 1 mm grid out; against a T1 that goes on past the border,
    any image that stays bright up to its edge scores a false step there (a 1 mm-blurred copy of the
    true T1 scored worse than the raw iUS in the 5 mm border band). ``ssc_*_open``: that older
    comparison with the T1 as it is.
    """
    from ..ssc import ssc_mse

    fov = us > 0
    target = np.where(fov, aligned_t1, 0.0)
    return {"ncc_synth_t1": ncc(synth, aligned_t1, fov), "ncc_us_t1": ncc(us, aligned_t1, fov),
            "ssc_synth_t1": ssc_mse(synth, target, fov), "ssc_us_t1": ssc_mse(us, target, fov),
            "ssc_synth_t1_open": ssc_mse(synth, aligned_t1, fov), "ssc_us_t1_open": ssc_mse(us, aligned_t1, fov)}


def tissue_contrast(img: np.ndarray, labels: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """T1's tissue order, measured: (mean WM - mean GM) and (mean GM - mean CSF) of ``img`` inside
    ``fov``, in units of its standard deviation there (``labels``: :data:`brainshift.ultrasound.LABELS`
    on the same grid). A T1 has both > 0 (CSF dark, white matter brightest); NaN where a class is absent."""
    from ..ultrasound import LABELS

    x = img[fov].astype(np.float64)
    lab = labels[fov]
    sd = x.std() + 1e-12

    def mean(name: str) -> float:
        sel = lab == LABELS[name]
        return float(x[sel].mean()) if sel.any() else float("nan")

    return {"wm_gm": (mean("wm") - mean("gm")) / sd, "gm_csf": (mean("gm") - mean("csf")) / sd}


def evaluate_case(case, model: StyleModel, device: str | None = None) -> dict[str, float]:
    """Numbers for one :class:`brainshift.synth.SimCase`-like object (``us``, ``t1``, ``t2``, ``truth``)."""
    fov = case.us > 0
    aligned = warp(case.t1, case.truth)
    t0 = time.perf_counter()
    synth = synthesize_t1(case.us, model, device, spacing=getattr(case, "spacing", None))
    seconds = time.perf_counter() - t0
    head = case.t2 > 0
    return {"ncc_synth_t1": ncc(synth, aligned, fov), "ncc_us_t1": ncc(case.us, aligned, fov),
            "ncc_t2like_t1": ncc(t2_to_t1_like(case.t2), case.t1, head), "ncc_t2_t1": ncc(case.t2, case.t1, head),
            "inference_s": seconds}


def evaluate_seeds(seeds=range(5), model: StyleModel | None = None, shape: int = 96, spacing: float = 1.5,
                   device: str | None = None) -> dict[str, dict[str, float]]:
    """:func:`evaluate_case` for ``brainshift.synth.simulate_case(seed, shape, spacing)``, per seed."""
    from ..synth import simulate_case

    model = model or load_style_model(device=device)
    return {str(s): evaluate_case(simulate_case(s, shape, spacing), model, device) for s in seeds}


def evaluate_dataset(cases_dir: str, threads: int | None = None, progress: bool = True,
                     affine: bool = True) -> dict[str, dict]:
    """Issue-6 acceptance numbers on a simulated dataset folder (``brainshift simulate`` output, ceT1 pairs).

    Per case: tissue contrasts (:func:`tissue_contrast`, ``wm_gm_*``, ``gm_csf_*``) of the synthetic
    T1, the raw iUS and the true T1 where the folder has ``labels/``; NCC and SSC-MSE inside the iUS
    field of view of (synthetic T1 | raw iUS) against the T1 pulled onto the iUS grid with the TRUE
    field ``truth/<field>`` (lower SSC-MSE / higher NCC = closer to the T1's appearance;
    :func:`appearance`); the affine stage's TRE with fixed = raw iUS, with fixed = synthetic T1, the
    pick between the two by the lower SSC-MSE of the resampled MR against the raw iUS, and what the
    pipeline's affine stage picks when offered both (``pipeline_pick``) with its TRE; style inference
    and affine times (s). ``affine=False``: appearance numbers only
    (``brainshift bench`` records the affine candidates' TRE of the full pipeline).
    """
    from tqdm import tqdm

    from .. import fields
    from ..affine import affine_stage, resample
    from ..io import discover_cases, load_volume
    from ..metrics import evaluate_case as tre_of
    from ..ssc import ssc_mse

    model = load_style_model()
    out = {}
    for case in tqdm(discover_cases(cases_dir, "t1").cases, disable=not progress, desc="style eval"):
        fixed, moving = load_volume(case.fixed), load_volume(case.moving)
        fov = fixed.data > 0
        aligned = warp(moving.data, fields.read_field(case.fixed.parent.parent / "truth" / case.output_name))
        t0 = time.perf_counter()
        synth = synthesize_t1(fixed.data, model, spacing=fixed.spacing)
        style_s = time.perf_counter() - t0
        row = {**appearance(synth, fixed.data, aligned), "style_s": style_s}
        labels_file = case.fixed.parent.parent / "labels" / case.fixed.name   # the iUS's tissue (simulated)
        if labels_file.is_file():
            labels = load_volume(labels_file).data
            for name, img in (("synth", synth), ("us", fixed.data), ("t1", aligned)):
                row.update({f"{k}_{name}": v for k, v in tissue_contrast(img, labels, fov).items()})
        out[case.case_id] = row
        if not affine:
            continue
        vs_ius = {}
        for name, img in (("ius", fixed), ("synthetic_t1", fixed.like(synth))):
            t0 = time.perf_counter()
            res = affine_stage(img, moving, fov, threads=threads)
            row[f"affine_s_{name}"] = time.perf_counter() - t0
            row[f"tre_affine_{name}"] = tre_of(case, fields.matrix_to_field(res.matrix, fixed.affine, moving.affine,
                                                                            fixed.shape))["tre_mean"]
            vs_ius[name] = ssc_mse(fixed.data, resample(moving, res.matrix, fixed.affine, fixed.shape), fov)
        pick = min(vs_ius, key=vs_ius.get)
        t0 = time.perf_counter()   # what the pipeline does: one affine stage offered both fixed images
        res = affine_stage(fixed, moving, fov, extra_fixed={"synthetic_t1": fixed.like(synth)}, threads=threads)
        row.update({"affine_s_both": time.perf_counter() - t0, "pipeline_pick": res.fixed_image,
                    "tre_affine_pipeline": tre_of(case, fields.matrix_to_field(res.matrix, fixed.affine, moving.affine,
                                                                                 fixed.shape))["tre_mean"]})
        row.update({"picked": pick, "tre_affine_picked": row[f"tre_affine_{pick}"],
                    "tre_identity": tre_of(case, fields.identity_field(fixed.shape))["tre_mean"]})
    return out


def evaluate_real(ius_folder: str, t1_file: str, hold_out: list[str], out_dir: str,
                  model_path: str | None = None, figure: str | None = None, crops: int = 6,
                  seed: int = 123) -> dict:
    """Issue-17 material on REAL images (no aligned T1 exists for these iUS volumes).

    Writes to ``out_dir``: ``synth/`` the synthetic T1 of each held-out real iUS (its own grid, 0
    outside the field of view), ``t1_crops/`` ``crops`` crops of the real T1 (1 mm) cut to the
    held-out iUS fields of view and zero outside FOV and brain (``seed`` differs from training's,
    so the places differ; the T1 itself was in the training set, being the only real one). Returns
    file lists for ``us_realism.py`` and the inference times; ``figure``: a PNG of each held-out
    iUS and its synthetic T1, three orthogonal slices through the FOV centre.
    """
    from pathlib import Path

    from ..io import Volume, load_volume, save_volume
    from .real import MASK_EROSION_MM, WORK_SPACING, brain_mask, ius_files, t1_at_spacing, t1_crops, to_spacing

    out = Path(out_dir)
    (out / "synth").mkdir(parents=True, exist_ok=True)
    (out / "t1_crops").mkdir(parents=True, exist_ok=True)
    model = load_style_model(model_path, device="cpu")
    _, held = ius_files(ius_folder, hold_out)
    rows, shown, fovs = {}, [], []
    for path in held:
        vol = load_volume(path)
        fovs.append(to_spacing(vol.data, vol.spacing, WORK_SPACING)[1])
        t0 = time.perf_counter()
        synth = synthesize_t1(vol.data, model, "cpu", spacing=vol.spacing)
        seconds = time.perf_counter() - t0
        fov = vol.data > 0
        synth = np.where(fov, np.maximum(synth, 1e-3), 0.0)       # > 0 inside: us_realism reads 0 as outside
        name = path.name.replace("_US_", "_synthT1_")
        save_volume(out / "synth" / name, vol.like(synth))
        rows[path.name] = {"inference_s": round(seconds, 2), "shape": list(vol.shape)}
        shown.append((path.name, vol.data, synth))
    t1 = load_volume(t1_file)
    img, brain_w = t1_at_spacing(t1, brain_mask(t1, out / "t1_brain_mask.nii.gz"), WORK_SPACING, MASK_EROSION_MM)
    t1_files = []
    for i, c in enumerate(t1_crops(img, brain_w, fovs, crops, np.random.default_rng(seed))):
        vals = np.where(c.fov, np.maximum((c.t1 + 1) / 2, 1e-3), 0.0).astype(np.float32)
        t1_files.append(str(save_volume(out / "t1_crops" / f"t1_crop{i}.nii.gz", Volume(vals, np.diag([WORK_SPACING] * 3 + [1.0])))))
    if figure:
        _figure(shown, figure)
    return {"held_out": [p.name for p in held], "synth": sorted(str(p) for p in (out / "synth").iterdir()),
            "t1_crops": t1_files, "ius": [str(p) for p in held], "cases": rows}


def evaluate_real_t2(t1_file: str, t2_file: str, threads: int | None = None) -> dict[str, dict[str, float]]:
    """T2 -> T1-like remaps on a real patient: local NCC (9^3 windows, mean) and global NCC of each
    remap of the T2 against the same patient's ceT1, inside the ceT1's brain mask (registered MNI
    mask, eroded 3 mm). The T2 is put on the ceT1 grid by a rigid reg_aladin (same session: the
    headers already agree within a few mm). Rows: the raw T2, the linear inversion (default), and
    the histogram inversion onto the MNI template's T1 quantiles."""
    import torch
    from scipy import ndimage as ndi

    from ..affine import resample
    from ..io import load_volume
    from ..niftyreg import AladinOptions, reg_aladin
    from .losses import local_ncc
    from .real import brain_mask, mni_t1
    from .t2 import quantiles

    t1, t2 = load_volume(t1_file), load_volume(t2_file)
    brain = ndi.binary_erosion(brain_mask(t1, threads=threads), iterations=3)
    matrix = reg_aladin(t1, t2, AladinOptions(rigid_only=True, threads=threads), fixed_mask=brain)
    t2_on_t1 = resample(t2, matrix, t1.affine, t1.shape)
    mni, mni_brain = mni_t1()
    target = t1.data.astype(np.float32)
    rows = {}
    for name, img in (("raw_t2", t2_on_t1), ("linear_inversion", t2_to_t1_like(t2_on_t1)),
                      ("histogram_inversion_mni", t2_to_t1_like(t2_on_t1, reference=quantiles(mni.data, mni_brain)))):
        r = local_ncc(torch.from_numpy(np.asarray(img, np.float32))[None, None], torch.from_numpy(target)[None, None], 9)
        rows[name] = {"lncc9": float(r[0, 0].numpy()[brain].mean()), "ncc": ncc(img, target, brain)}
    return rows


def plot_losses(path: str, log_csv: str, heldout: dict[int, dict[str, float]] | None = None) -> None:
    """Learning curve of a style run: the epoch means of its loss terms (``loss_log.csv``) against
    optimiser steps; ``heldout`` (epoch -> {"ncc": .., "ssc": ..}, optional) adds a second panel of
    held-out appearance numbers (synthetic T1 vs the true T1 on simulated pairs)."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 2 if heldout else 1, figsize=(11 if heldout else 6, 4), squeeze=False)
    ax = axes[0, 0]
    def value(r: dict, key: str) -> float:   # a column added on resuming is empty in earlier rows
        return float(r[key]) if r.get(key) else float("nan")

    for key in ("g_gan", "cycle", "corr", "sup", "ssc", "d_t1", "d_us"):
        if key in rows[0] and any(value(r, key) > 0 for r in rows):
            ax.plot(steps, [value(r, key) for r in rows], label=key)
    ax.set(xlabel="optimiser step", ylabel="epoch mean", title="training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if heldout:
        epochs = sorted(heldout)
        per_epoch = {int(r["epoch"]): int(r["step"]) for r in rows}
        x = [per_epoch.get(e, 0) for e in epochs]
        ax = axes[0, 1]
        ax.plot(x, [heldout[e]["ncc"] for e in epochs], "o-", label="NCC synthetic T1 vs true T1 (higher is better)")
        ax.plot(x, [heldout[e]["ssc"] for e in epochs], "s-", label="SSC-MSE synthetic T1 vs true T1 (lower is better)")
        for key, style in (("ncc_raw", ":"), ("ssc_raw", "--")):
            if key in heldout[epochs[0]]:
                ax.axhline(heldout[epochs[0]][key], color="k", ls=style, lw=1, label=f"raw iUS ({key[:3].upper()})")
        ax.set(xlabel="optimiser step", title="held-out simulated pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _figure(shown: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 6, figsize=(15, 2.7 * len(shown)))
    axes = np.atleast_2d(axes)
    for row, (name, us, synth) in zip(axes, shown):
        c = np.round(np.argwhere(us > 0).mean(0)).astype(int)
        vmax = np.percentile(us[us > 0], 99.5)
        for a in range(3):
            for j, (img, lo, hi, label) in enumerate(((us, 0, vmax, "real iUS"), (synth, 0, 1, "synthetic T1"))):
                ax = row[2 * a + j]
                ax.imshow(np.take(img, c[a], axis=a).T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
                ax.set_title(f"{name.split('_US')[0]} {label}, axis {a}", fontsize=7)
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Style-transfer acceptance numbers: on a simulated dataset (--cases) "
                                 "or on held-out real iUS (--real-ius, --real-t1, --out).")
    ap.add_argument("--cases", help="brainshift simulate output folder (needs truth/)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--no-affine", action="store_true", help="appearance numbers only (no affine runs)")
    ap.add_argument("--real-ius", help="folder of real iUS volumes; the --hold-out ones are evaluated")
    ap.add_argument("--real-t1", help="a real whole-head T1 to cut reference crops from")
    ap.add_argument("--hold-out", default="4,16,27")
    ap.add_argument("--out", help="with --real-ius: folder for synthetic T1s and T1 crops")
    ap.add_argument("--figure", help="with --real-ius: PNG of the held-out iUS and their synthetic T1s")
    ap.add_argument("--model", default=None, help="generator weights (default: the shipped model)")
    ap.add_argument("--real-t2", help="with --real-t1 alone: score the T2 -> T1-like remaps on this patient")
    ap.add_argument("--curves", nargs="+", metavar="ARG", help="OUT.png LOG.csv [HELDOUT.json]: plot a style run's "
                    "learning curve (HELDOUT.json: {epoch: {ncc, ssc, ncc_raw, ssc_raw}} on held-out simulated pairs)")
    a = ap.parse_args()
    if a.curves:
        held = None
        if len(a.curves) > 2:
            from pathlib import Path
            held = {int(k): v for k, v in json.loads(Path(a.curves[2]).read_text()).items()}
        plot_losses(a.curves[0], a.curves[1], held)
        print(f"wrote {a.curves[0]}")
        raise SystemExit(0)
    if a.real_t2:
        result = evaluate_real_t2(a.real_t1, a.real_t2)
    elif a.real_ius:
        result = evaluate_real(a.real_ius, a.real_t1, a.hold_out.split(","), a.out, a.model, a.figure)
    else:
        res = evaluate_dataset(a.cases, affine=not a.no_affine)
        keys = list(next(iter(res.values())))
        result = {"cases": res, "mean": {k: float(np.nanmean([r[k] for r in res.values()])) for k in keys
                                         if k not in ("picked", "pipeline_pick")}}
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(text + "\n")
