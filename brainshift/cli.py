"""The ``brainshift`` command line. Every sub-command is a thin layer over package functions.

Exit codes: 0 all went well; 1 at least one case or file failed (each named on stderr, one line);
2 the command line itself was wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

DEMO_SEED = 7


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (key, header, format spec such as '.2f' or '')."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if n else c.ljust(w) for n, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


TRE_COLUMNS = [("case", "pair", ""), ("method", "method", ""), ("tre_mean", "TRE mean mm", ".2f"),
               ("tre_max", "TRE max mm", ".2f"), ("sdlogj", "SDlogJ", ".4f"), ("folds", "folds", "d"),
               ("seconds", "time s", ".1f")]


# --------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .io import InputError, discover_cases
    from .pipeline import run_cases

    try:
        found = discover_cases(args.input, args.modality)
    except InputError as exc:
        _err(str(exc))
        return 1
    for p in found.problems:
        _err(p)
    for w in found.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not found.cases:
        _err(f"{args.input}: no (fixed, moving) pair found")
        return 1
    try:
        records, errors = run_cases(found.cases, args.output, method=args.method, stages=args.stages,
                                    refine=args.refine, large_shift=args.large_shift, network=args.network,
                                    threads=args.threads, qc=args.qc,
                                    progress=not args.quiet)
    except InputError as exc:
        _err(str(exc))
        return 1
    if args.fuse != "none":
        from .fusion import fuse_folder

        fused, fuse_errors = fuse_folder(found.cases, args.output, rule=args.fuse)
        errors = errors + fuse_errors
        if not args.quiet:
            for f in fused:
                print(f"case {f['case']}: T1 and T2 fields fused ({f['rule']}: {f['chosen']})")
    for e in errors:
        _err(e)
    if not args.quiet:
        print(f"{len(records)} of {len(found.cases)} fields written to {args.output}")
    return 1 if (errors or found.problems) else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .io import InputError
    from .metrics import evaluate_folder, write_metrics_json

    try:
        results, problems = evaluate_folder(args.input, args.output, args.modality, progress=not args.quiet)
    except InputError as exc:
        _err(str(exc))
        return 1
    for p in problems:
        _err(p)
    rows = [{"case": k, "method": "", **v} for k, v in results.items()]
    print(format_table(rows, [c for c in TRE_COLUMNS if c[0] not in ("method", "seconds")]))
    scored = [r["tre_mean"] for r in rows if "tre_mean" in r]
    if scored:
        print(f"summary: {len(rows)} pairs, mean TRE {sum(scored) / len(scored):.3f} mm, "
              f"max {max(r['tre_max'] for r in rows if 'tre_max' in r):.3f} mm, "
              f"mean SDlogJ {sum(r['sdlogj'] for r in rows) / len(rows):.4f}, folds {sum(r['folds'] for r in rows)}")
    if results:
        path = write_metrics_json(Path(args.json) if args.json else Path(args.output) / "metrics.json", results)
        print(f"metrics written to {path}")
    return 1 if problems or not results else 0


def cmd_export_transform(args: argparse.Namespace) -> int:
    """A Learn2Reg voxel pull field -> ITK displacement-field transform (LPS mm) for ITK, ANTs, 3D Slicer."""
    import numpy as np

    from .fields import read_field, write_itk_transform
    from .io import InputError, _read_itk, load_volume, one_line

    field = Path(args.field)
    out = Path(args.output) if args.output else field.with_name(
        field.name.split(".")[0] + ("_itk.nii.gz" if args.to == "itk" else "_slicer.h5"))
    try:
        disp = read_field(field)
        fixed = load_volume(args.fixed)
        if disp.shape[:3] != fixed.shape:
            raise InputError(f"{field}: field grid {disp.shape[:3]} is not the fixed image's grid {fixed.shape} "
                             f"({args.fixed}); a Learn2Reg field lives on the fixed grid")
        if args.moving:
            moving_affine = load_volume(args.moving).affine
        elif field.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            moving_affine = np.asarray(nib.load(str(field)).affine, dtype=np.float64)
        else:
            moving_affine = _read_itk(field)[1]
        path = write_itk_transform(out, disp, fixed.affine, moving_affine)
    except (InputError, ValueError, OSError, RuntimeError) as exc:
        _err(one_line(str(exc), limit=500))
        return 1
    print(f"ITK displacement-field transform (LPS mm, fixed -> moving points) written to {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .io import InputError
    from .report import build_html

    try:
        path = build_html(args.dir)
    except InputError as exc:
        _err(str(exc))
        return 1
    print(f"report written to {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import SUMMARY_COLUMNS, parse_methods, run_bench, summary_rows
    from .io import InputError

    try:
        methods = parse_methods(args.methods)
    except ValueError as exc:
        _err(str(exc))
        return 2
    try:
        payload = run_bench(args.cases, methods, args.out, modality=args.modality, threads=args.threads,
                            progress=not args.quiet, resume=args.resume)
    except InputError as exc:
        _err(str(exc))
        return 1
    for line in payload["problems"] + payload["errors"]:
        _err(line)
    missing = [f"{m}: not available: {v['unavailable']}" for m, v in payload["methods"].items() if v["unavailable"]]
    for line in missing:  # an explicitly requested method that cannot run is an error, else a note
        print(f"{'error' if args.methods else 'note'}: {line}", file=sys.stderr)
    print(format_table(summary_rows(payload), SUMMARY_COLUMNS))
    if not args.quiet:
        print(f"bench.md, bench.json, bench_tre.png and fields/<method>/ written to {args.out}")
    return 1 if payload["errors"] or payload["problems"] or (missing and args.methods) else 0


def cmd_bench_coarse(args: argparse.Namespace) -> int:
    from .bench_coarse import run_coarse_bench
    from .io import InputError

    try:
        payload = run_coarse_bench(args.cases, args.out, modality=args.modality, threads=args.threads,
                                   progress=not args.quiet)
    except InputError as exc:
        _err(str(exc))
        return 1
    print(Path(args.out, "coarse.md").read_text().split("\n## ")[0].strip())
    return 0 if payload["rows"] else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from .synth import simulate_dataset

    paths = simulate_dataset(Path(args.out), args.cases, seed=args.seed, shape=args.shape, spacing=args.spacing,
                             preview=args.preview, progress=not args.quiet, resected=not args.pre_resection)
    if not args.quiet:
        print(f"{args.cases} cases ({len(paths)} files) written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate one case (if not there yet), run every method on it, print the per-stage TRE table."""
    from .fields import read_field
    from .io import discover_cases, load_volume
    from .metrics import evaluate_case
    from .pipeline import register
    from .synth import simulate_dataset

    data = Path(args.out) / "data"
    if not (data / "ReMIND2Reg_dataset.json").is_file():
        print(f"simulating the demo case ({args.shape}^3 at {args.spacing} mm, seed {DEMO_SEED}) into {data}")
        simulate_dataset(data, 1, seed=DEMO_SEED, shape=args.shape, spacing=args.spacing, progress=False)
    rows = []
    for case in discover_cases(data, "t1").cases:
        fixed, moving = load_volume(case.fixed), load_volume(case.moving)
        rows.append({"case": case.pair_name, "method": "truth (simulator)",
                     **evaluate_case(case, read_field(data / "truth" / case.output_name))})
        for method in ("identity", "niftyreg-rigid", "brainshift"):
            print(f"running {method} ...", flush=True)
            result = register(fixed, moving, method=method, modality=case.modality)
            steps = result.stage_outputs.get("fields", {"": result.disp})
            for stage, disp in steps.items():
                rows.append({"case": case.pair_name, "method": f"{method} {stage}".strip(),
                             "seconds": result.record["seconds"] if stage == list(steps)[-1] else None,
                             **evaluate_case(case, disp)})
    print(format_table(rows, TRE_COLUMNS))
    return 0


def cmd_style(args: argparse.Namespace) -> int:
    from .io import InputError
    from .style import stylize_file

    try:
        path = stylize_file(args.input, args.output, model_path=args.model, device=args.device)
    except InputError as exc:
        _err(str(exc))
        return 1
    print(f"synthetic T1 written to {path}")
    return 0


def cmd_train_style(args: argparse.Namespace) -> int:
    from .style.train import build_parser as trainer_parser, config_from_args, train_style

    summary = train_style(config_from_args(trainer_parser().parse_args(args.trainer_args)), progress=True)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_train_synthmorph(args: argparse.Namespace) -> int:
    from .deform.train import main as trainer_main

    return trainer_main(args.trainer_args)


def _stages(text: str) -> tuple[str, ...]:
    from .pipeline import STAGES

    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(bad) or '(none)'}; choose from {', '.join(STAGES)}")
    return stages


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .pipeline import METHODS, STAGES

    p = argparse.ArgumentParser(prog="brainshift", description=(
        "Register pre-operative brain MR (moving) to post-resection intra-operative ultrasound (fixed). "
        "Fields are Learn2Reg voxel pull fields on the fixed grid: moving voxel = p + disp[p]."))
    p.add_argument("--version", action="version", version=f"brainshift {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="register every (iUS, MR) pair of a folder and write one field per pair",
                       description="Find every (fixed iUS, moving MR) pair in INPUT (flat ReMIND2Reg layout, dataset "
                       "layout with imagesTr/, or grand-challenge images/fixed + images/moving) and write "
                       "disp_XXXX_0000_XXXX_000M.nii.gz (float32, X,Y,Z,3, voxel pull field) into OUTPUT.")
    r.add_argument("--input", required=True, help="folder with the cases")
    r.add_argument("--output", required=True, help="folder for the displacement fields (created if needed)")
    r.add_argument("--method", choices=METHODS, default="brainshift",
                   help="brainshift: this project's stages (default); niftyreg-rigid: the official NiftyReg "
                   "rigid baseline; identity: zero field")
    r.add_argument("--stages", type=_stages, default=STAGES, metavar="S[,S]",
                   help=f"brainshift stages to run, comma separated, from {','.join(STAGES)} (default: all)")
    r.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="after SynthMorph, optimise the field on the pair itself (SSC + diffusion, Adam); "
                   "on by default, --no-refine to skip")
    r.add_argument("--network", action=argparse.BooleanOptionalAction, default=False,
                   help="start the deformable stage from the trained network's field (model/synthmorph/); off by "
                   "default (from zero) until the whole pipeline with it is measured on the development sets")
    r.add_argument("--large-shift", action=argparse.BooleanOptionalAction, default=True,
                   help="before the refinement, a discrete search over displacements up to 12 mm inside the iUS "
                   "field of view (SSC cost volume, coupled convex optimisation) for the local collapse after "
                   "resection; on by default, --no-large-shift to skip")
    r.add_argument("--qc", action=argparse.BooleanOptionalAction, default=True,
                   help="write per-case QC to OUTPUT/qc/ (per-stage figure, report JSON, affine curve, record; "
                   "`brainshift report OUTPUT` gathers them into one HTML page); on by default, --no-qc to skip")
    r.add_argument("--modality", choices=("t1", "t2", "both"), default="both",
                   help="which moving MR to register: _0001 ceT1, _0002 T2, or both (default)")
    r.add_argument("--fuse", choices=("none", "vote", "average"), default="none",
                   help="for cases with both T1 and T2 (--modality both): replace both fields by one fused field. "
                   "vote: of T1's, T2's and their average, the field under which both MR images match the iUS "
                   "best (SSC-MSE); average: the mean field. Default none (each pair on its own)")
    r.add_argument("--threads", type=int, default=None, help="threads for NiftyReg (default: all cores)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("evaluate", help="score fields with the official TRE and SDlogJ",
                       description="Score the fields in OUTPUT against the landmarks of the cases in INPUT "
                       "(landmarks/ or landmarksTr/, voxel csv). Prints a table and writes OUTPUT/metrics.json "
                       "shaped like the official Learn2Reg one.")
    e.add_argument("--input", required=True, help="folder with the cases and their landmarks")
    e.add_argument("--output", required=True, help="folder with the displacement fields")
    e.add_argument("--modality", choices=("t1", "t2", "both"), default="both")
    e.add_argument("--json", default=None, help="where to write metrics.json (default: OUTPUT/metrics.json)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("simulate", help="write simulated MR/iUS cases with known brain shift and landmarks",
                       description="Write cases 0001..N in the ReMIND2Reg dataset layout (imagesTr/, landmarksTr/, "
                       "truth/ ground-truth pull fields, ReMIND2Reg_dataset.json), built from the MNI152 2009 "
                       "T1 that ships with nilearn. Deterministic for a given seed.")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--cases", type=int, default=5, help="number of cases (default 5)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--shape", type=int, default=256, help="cube size in voxels (default 256, as ReMIND2Reg)")
    s.add_argument("--spacing", type=float, default=0.5, help="voxel size in mm (default 0.5, as ReMIND2Reg)")
    s.add_argument("--preview", action="store_true", help="also write preview/ReMIND2Reg_XXXX.png per case")
    s.add_argument("--pre-resection", action="store_true",
                   help="iUS before resection (tumour in place, no cavity, no collapse; as RESECT) instead of after")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    x = sub.add_parser("export-transform", help="a field as an ITK displacement-field transform (LPS mm) for "
                       "3D Slicer, ANTs, ITK-SNAP, SimpleITK",
                       description="Convert a Learn2Reg voxel pull field (X,Y,Z,3, voxel units, on the fixed grid, "
                       "header = moving affine) into an ITK displacement-field transform in world millimetres, LPS: "
                       "it maps points of the fixed (iUS) space to the moving (MR) space, the direction ITK and 3D "
                       "Slicer resample with, so applied to the MR it puts the MR onto the iUS. --to itk writes a "
                       "3-vector image (.nii.gz, also .nrrd/.mha by -o); --to slicer an ITK transform file (.h5, "
                       "also .tfm by -o) that Slicer loads as a transform. The vectors depend on both grids: "
                       "--fixed is required; the moving grid is read from the field's header unless --moving is given.")
    x.add_argument("field", metavar="FIELD", help="displacement field (.nii.gz or .mha) written by `brainshift run`")
    x.add_argument("--fixed", required=True, help="the fixed image (iUS) the field was computed on")
    x.add_argument("--moving", default=None,
                   help="the moving image (MR); default: its grid is the field header's affine (as `run` writes it)")
    x.add_argument("--to", choices=("itk", "slicer"), default="itk",
                   help="itk: vector image FIELD_itk.nii.gz (default); slicer: transform file FIELD_slicer.h5")
    x.add_argument("-o", "--output", default=None,
                   help="output file; its suffix picks the format (.h5/.tfm transform file, .nii.gz/.nrrd/.mha image)")
    x.set_defaults(func=cmd_export_transform)

    rp = sub.add_parser("report", help="gather the QC of a run into one HTML page: DIR/report.html",
                        description="Build DIR/report.html from DIR/qc/ (written by `brainshift run`, unless --no-qc): "
                        "a summary table of every pair (method, seconds per stage, SSC-MSE input -> final, stage "
                        "decisions, SDlogJ, folds, largest displacement; TRE when DIR/metrics.json from "
                        "`brainshift evaluate` is there), then each pair's per-stage figure (iUS over the warped "
                        "MR, intensity difference, displacement in mm) and affine SSC-MSE curve. One "
                        "self-contained file (images inline), to open in any browser.")
    rp.add_argument("dir", metavar="DIR", help="the output folder of `brainshift run` (holds qc/)")
    rp.set_defaults(func=cmd_report)

    from .bench import METHODS as BENCH_METHODS

    b = sub.add_parser("bench", help="run several methods (ours and peers) on a folder of cases; TRE, time, memory",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run each method on each (fixed iUS, moving MR) pair of CASES, one fresh process "
                       "per (method, pair),\nand score it with the official TRE (the cases need landmarks).\n\n"
                       "Methods (--methods, comma separated; default all):\n"
                       + "\n".join(f"  {name:<18} {text}" for name, text in BENCH_METHODS.items())
                       + "\n\nWritten to OUT: bench.md (summary per method: TRE mean/median/max, SDlogJ, folds, "
                       "time per pair,\ntime vs ConvexAdam, peak memory; TRE per pair; exact settings and machine), "
                       "bench.json (everything,\nper pair), bench_tre.png (TRE box plot), fields/<method>/ (the "
                       "fields, scorable with `brainshift\nevaluate --output OUT/fields/<method>`), logs/<method>/ "
                       "(each run's output),\nruns/<method>/ (each finished run, saved at once; see --resume).\nA method that is not installed gets a 'not available' row; a pair "
                       "that fails is reported and the\nothers go on (exit code 1).")
    b.add_argument("--cases", required=True, help="folder with the cases and their landmarks (any layout `run` reads)")
    b.add_argument("--out", required=True, help="output folder (created if needed)")
    b.add_argument("--methods", default=None, metavar="M[,M]",
                   help=f"methods to run, comma separated, from {','.join(BENCH_METHODS)} (default: all)")
    b.add_argument("--modality", choices=("t1", "t2", "both"), default="t1",
                   help="moving MR: _0001 ceT1 (default), _0002 T2, or both")
    b.add_argument("--threads", type=int, default=None,
                   help="threads for NiftyReg, elastix and torch (default: their defaults, all cores)")
    b.add_argument("--resume", action="store_true",
                   help="reuse the runs an earlier (interrupted) bench saved in OUT/runs/ instead of running them again")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    bc = sub.add_parser("bench-coarse", help="the coarse stage's candidates on a folder of cases: TRE of each, "
                        "what each criterion picks, its regret, vs niftyreg-rigid",
                        description="Run the coarse stage (shipped settings, raw iUS) and the official rigid NiftyReg "
                        "baseline on every case of CASES (they need landmarks); write OUT/coarse.md and "
                        "OUT/coarse.json: TRE of every candidate, the pick and selection regret of each criterion "
                        "(ssc, lc2), times.")
    bc.add_argument("--cases", required=True, help="folder with the cases and their landmarks (any layout `run` reads)")
    bc.add_argument("--out", required=True, help="output folder (created if needed)")
    bc.add_argument("--modality", choices=("t1", "t2", "both"), default="t1", help="moving MR (default t1)")
    bc.add_argument("--threads", type=int, default=None, help="CPU cores (default: all)")
    bc.add_argument("--quiet", action="store_true", help="no progress bar")
    bc.set_defaults(func=cmd_bench_coarse)

    d = sub.add_parser("demo", help="run every method on the embedded (simulated) demo case and print the TRE table",
                       description="Simulates one case (deterministic, from the MNI152 template shipped in nilearn), "
                       "runs each method on it, and prints the per-method TRE table.")
    d.add_argument("--out", default="demo_out", help="working folder (default demo_out)")
    d.add_argument("--shape", type=int, default=128, help="cube size in voxels (default 128)")
    d.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (default 1.0)")
    d.set_defaults(func=cmd_demo)

    st = sub.add_parser("style", help="iUS -> synthetic T1 with the shipped CycleGAN generator",
                        description="Whole-volume inference by overlapping patches; output on the iUS grid, "
                        "normalised T1 units [0, 1], exactly 0 outside the ultrasound field of view.")
    st.add_argument("--input", required=True, help="iUS volume (.nii.gz or .mha)")
    st.add_argument("--output", required=True, help="synthetic T1 to write")
    st.add_argument("--model", default=None, help="generator weights (default: model/style/us2t1.pt)")
    st.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    st.set_defaults(func=cmd_style)

    # The trainers' options are parsed by their own modules (brainshift train-style --help), so that
    # torch and voxelmorph are imported only when training, not on every brainshift command.
    ts = sub.add_parser("train-style", add_help=False,
                        help="train the iUS -> T1 CycleGAN on a folder in ReMIND2Reg dataset layout",
                        description="Unpaired 3D CycleGAN training (iUS _0000, T1 _0001) on random patches inside "
                        "the iUS field of view; checkpoints every epoch, --resume, loss log, validation PNGs.")
    ts.set_defaults(func=cmd_train_style)
    tm = sub.add_parser("train-synthmorph", add_help=False,
                        help="train the deformable network on synthetic label maps (SynthMorph's idea)",
                        description="Random label maps -> random-contrast images -> random SVF deformations; "
                        "Dice on warped one-hot labels + lambda * gradient penalty + the known field; AdamW, "
                        "checkpoints, exact --resume, learning curve, model card; torchrun for several processes.")
    tm.set_defaults(func=cmd_train_synthmorph)
    return p


TRAINERS = ("train-style", "train-synthmorph")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in TRAINERS:
        args = parser.parse_args(argv)  # unknown options are an error everywhere else
    args.trainer_args = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
