"""Benchmark: every method on every case, scored with the official TRE, timed, memory measured.

``run_bench(cases_dir, methods, out_dir)`` runs each (method, case) in a **fresh Python process**
(``python -m brainshift.bench --one SPEC.json``), so that one method's imports, caches and memory
never leak into another's measurement, and a crash in one run cannot stop the others. The child
loads the pair, registers it, and writes the field (voxel pull field on the fixed grid, the
challenge convention, see :mod:`brainshift.fields`) to ``OUT/fields/<method>/<output_name>``,
exactly where ``brainshift evaluate --output OUT/fields/<method>`` can score it. The parent then
reads that file back and scores it with :func:`brainshift.metrics.evaluate_case`.

Measurements:

* **time per case**: wall-clock seconds of the registration call in the child (the method's
  modules are imported before the clock starts; loading the images and writing the field are not
  counted), and the user + system CPU seconds of the same call (``resource.getrusage`` of the
  child and of the tools it waited for). ``process_seconds`` (start-up, imports, I/O included) and
  the load average when the run started are kept in ``bench.json``.
* **peak memory**: the larger of (a) the largest single-process peak: the child's own ``VmHWM``
  and ``ru_maxrss`` of ``RUSAGE_CHILDREN`` (the tools it ran and waited for: reg_aladin, elastix,
  transformix), both read by the child itself, and (b) the peak of the summed RSS of the child
  and all its descendants, sampled every 0.2 s from ``/proc`` (this catches a tool running next
  to the Python process that holds the images). ``os.wait4``'s ``ru_maxrss`` is not used: on
  Linux it also counts the parent's memory (the high-water mark of the pre-``exec`` address space).

Outputs: ``OUT/bench.md`` (summary, per-pair TRE, settings), ``OUT/bench.json`` (everything, per
case), ``OUT/bench_tre.png`` (box plot of per-pair mean TRE by method), ``OUT/fields/``,
``OUT/logs/<method>/<pair>.log`` (each child's output). Every file is written atomically.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .io import Case, InputError, _atomic_write, discover_cases, write_json

# name -> what it is (shown in --help, bench.md)
METHODS: dict[str, str] = {
    "identity": "zero field: the images' own (navigation) alignment",
    "niftyreg-rigid": "the official ReMIND2Reg baseline: NiftyReg reg_aladin, rigid",
    "brainshift-affine": "brainshift affine stage only, on the raw iUS (no style transfer)",
    "brainshift-network": "brainshift affine + the deformable network alone (no discrete search, no refinement)",
    "brainshift-net-refine": "brainshift affine + the network + instance refinement (no discrete search)",
    "brainshift-zero-refine": "brainshift affine + instance refinement from zero (no network, no discrete search)",
    "brainshift-with-network": "brainshift, the default product with the network in front of the discrete search (--network)",
    "brainshift-deform": "brainshift affine + SynthMorph deformable stage, no instance refinement",
    "brainshift-refine": "brainshift affine + SynthMorph + instance refinement (no style transfer)",
    "brainshift": "brainshift, the default product: style + affine + SynthMorph + refinement",
    "convexadam": "ConvexAdam 0.2.0 (MIND-SSC, coupled convex + Adam), deformable only",
    "elastix": "elastix 5 (Debian): Mattes mutual information, rigid then B-spline + bending energy",
}
# arguments of pipeline.register for the methods that go through it
PIPELINE_METHODS: dict[str, dict] = {
    "identity": {"method": "identity"},
    "niftyreg-rigid": {"method": "niftyreg-rigid"},
    "brainshift-affine": {"method": "brainshift", "stages": ("affine",), "refine": False},
    "brainshift-network": {"method": "brainshift", "stages": ("affine", "deform"), "refine": False,
                           "large_shift": False, "network": True},
    "brainshift-net-refine": {"method": "brainshift", "stages": ("affine", "deform"), "refine": True,
                              "large_shift": False, "network": True},
    "brainshift-zero-refine": {"method": "brainshift", "stages": ("affine", "deform"), "refine": True,
                               "large_shift": False, "network": False},
    "brainshift-with-network": {"method": "brainshift", "stages": ("style", "affine", "deform"), "refine": True,
                                "network": True},
    "brainshift-deform": {"method": "brainshift", "stages": ("affine", "deform"), "refine": False},
    "brainshift-refine": {"method": "brainshift", "stages": ("affine", "deform"), "refine": True},
    "brainshift": {"method": "brainshift", "stages": ("style", "affine", "deform"), "refine": True},
}
REFERENCE = "convexadam"  # the "time vs" column divides by this method's mean time


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
def parse_methods(text: str | None) -> list[str]:
    """Comma-separated method names -> list (all methods when empty); ValueError names unknown ones."""
    names = [m.strip() for m in (text or "").split(",") if m.strip()] or list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def unavailable(name: str) -> str | None:
    """None when ``name`` can run on this machine, else the reason (one line)."""
    if name == "identity":
        return None
    if name in PIPELINE_METHODS:
        from .niftyreg import NiftyRegError, binary

        try:
            binary("reg_aladin")
        except NiftyRegError as exc:
            return str(exc)
        return None
    if name == "convexadam":
        if importlib.util.find_spec("convexAdam") is None:
            return "python package convexadam not installed (pip install convexadam==0.2.0)"
        return None
    if name == "elastix":
        from .peers import elastix_unavailable

        return elastix_unavailable()
    raise ValueError(f"unknown method {name!r}")


def method_settings(name: str) -> dict:
    """The exact configuration a method runs with (JSON-ready), for bench.md/bench.json."""
    if name in PIPELINE_METHODS:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in PIPELINE_METHODS[name].items()}
        if cfg["method"] == "brainshift":
            cfg["regularisation"] = 0.5
            cfg["fixed_mask"] = "iUS > 0 (or the case's fixed mask)"
        if cfg["method"] == "niftyreg-rigid":
            from .affine import OFFICIAL_RIGID

            cfg["reg_aladin"] = " ".join(OFFICIAL_RIGID.args()) + " -rmask (iUS > 0) -fmask (MR > 0)"
        return cfg
    from . import peers

    if name == "convexadam":
        return {"function": "convexAdam.convex_adam_MIND.convex_adam_pt", **peers.CONVEXADAM_SETTINGS,
                "dtype": "float32", "device": "cpu", "input": "raw intensities, MR on the iUS grid",
                "affine_stage": "none (ConvexAdam is deformable only; run from the images' own alignment)"}
    if name == "elastix":
        return {"binary": "elastix + transformix -def all", "fixed_mask": "iUS > 0 (-fMask)",
                "rigid": peers.ELASTIX_RIGID, "bspline": peers.ELASTIX_BSPLINE}
    raise ValueError(f"unknown method {name!r}")


def _preload(name: str) -> None:
    """Import what the method needs before its clock starts."""
    if name in PIPELINE_METHODS and name != "identity":
        from . import affine, ssc  # noqa: F401
    stages = PIPELINE_METHODS.get(name, {}).get("stages", ())
    if "deform" in stages:
        from . import deform  # noqa: F401
    if "style" in stages:
        from . import style  # noqa: F401
    if name == "convexadam":
        from convexAdam import convex_adam_MIND  # noqa: F401
    if name == "elastix":
        import SimpleITK  # noqa: F401


def register_method(name: str, fixed, moving, modality: str = "t1", threads: int | None = None,
                    fixed_mask: np.ndarray | None = None, tre=None) -> tuple[np.ndarray, dict]:
    """Run one benchmark method on a pair; return (voxel pull field on the fixed grid, record).

    ``tre``: optional function field -> mean TRE (mm) of the case's landmarks. With it, a pipeline
    method's deformable stage also records the TRE of its field *before* the stage and of the
    candidate it produced, kept or not (``tre_before``, ``tre_candidate``: the guard's confusion table).
    The method itself never sees the landmarks.
    """
    if name in PIPELINE_METHODS:
        from .pipeline import register

        result = register(fixed, moving, modality=modality, threads=threads, fixed_mask=fixed_mask,
                          **PIPELINE_METHODS[name])
        candidate = result.stage_outputs.get("deform_candidate")
        if tre is not None and candidate is not None:
            result.record["stages"]["deform"].update(tre_before=tre(result.stage_outputs["fields"]["affine"]),
                                                     tre_candidate=tre(candidate))
        return result.disp, result.record
    from . import peers

    if name == "convexadam":
        return peers.convexadam_register(fixed, moving, fixed_mask=fixed_mask, threads=threads)
    if name == "elastix":
        return peers.elastix_register(fixed, moving, fixed_mask=fixed_mask, threads=threads)
    raise ValueError(f"unknown method {name!r}")


# ------------------------------------------------------------------------------------------------
# one (method, case) in a child process
# ------------------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the tools it ran and waited for."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _child(spec_path: str) -> int:
    """Body of ``python -m brainshift.bench --one SPEC``: register, write the field, write a result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {}
    try:
        from . import fields
        from .io import load_volume

        _preload(spec["method"])
        if spec.get("threads") and "torch" in sys.modules:  # only where the method uses torch
            sys.modules["torch"].set_num_threads(int(spec["threads"]))
        fixed, moving = load_volume(spec["fixed"]), load_volume(spec["moving"])
        mask = load_volume(spec["fixed_mask"]).data > 0 if spec.get("fixed_mask") else None
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        tre = None
        if spec.get("landmarks"):
            from .io import load_landmarks
            from .metrics import tre as tre_mm

            lm_f, lm_m = (load_landmarks(p) for p in spec["landmarks"])
            tre = lambda d: float(tre_mm(d, lm_f, lm_m, moving.spacing).mean())  # noqa: E731
        disp, record = register_method(spec["method"], fixed, moving, modality=spec["modality"],
                                       threads=spec.get("threads"), fixed_mask=mask, tre=tre)
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = _cpu_seconds() - cpu0
        fields.write_field(spec["field"], disp, moving.affine)
        result["record"] = record
        code = 0
    except Exception as exc:  # reported to the parent, which records it and goes on
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        code = 1
    result.update(_own_peaks())
    write_json(spec["result"], result)
    return code


def _own_peaks() -> dict:
    """Peak RSS (GB) of this process (``VmHWM``) and of the largest tool it ran and waited for.

    Read here, inside the child, because the ``ru_maxrss`` that ``os.wait4`` reports in the parent
    also counts the parent's own memory: Linux keeps the high-water mark of the address space a
    process had before ``exec``, which for a child started by (v)fork is the parent's.
    """
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux
    out = {"tools_maxrss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 1e9}
    try:
        hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")]
        out["self_hwm_gb"] = int(hwm[0].split()[1]) * 1024 / 1e9
    except (OSError, IndexError, ValueError):
        out["self_hwm_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9
    return out


class _TreeRss(threading.Thread):
    """Samples the summed RSS (bytes) of a process and all its descendants every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self._done = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _sample(self) -> int:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
        total, todo = 0, [self.pid]
        while todo:
            pid = todo.pop()
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                pass
            todo += children.get(pid, [])
        return total

    def run(self) -> None:
        if not Path("/proc/self/statm").exists():
            return
        while not self._done.is_set():
            self.peak = max(self.peak, self._sample())
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_isolated(spec: dict, work: Path, log_path: Path) -> dict:
    """Run one (method, case) spec in a fresh ``python -m brainshift.bench --one`` process.

    Returns the child's result (``seconds``, ``cpu_seconds``, ``record`` or ``error``,
    ``self_hwm_gb``, ``tools_maxrss_gb``) plus ``process_seconds``, ``tree_rss_sampled_gb``,
    ``maxrss_wait4_gb`` (reference only) and ``peak_rss_gb`` (see the module docstring).
    """
    spec_path = work / "spec.json"
    spec = {**spec, "result": str(work / "result.json")}
    Path(spec["result"]).unlink(missing_ok=True)  # never read a previous run's result
    spec_path.write_text(json.dumps(spec))
    env = os.environ.copy()
    if spec.get("threads"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(spec["threads"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "brainshift.bench", "--one", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = _TreeRss(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        wall = time.perf_counter() - t0
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    out: dict = {}
    result_path = Path(spec["result"])
    if result_path.is_file():
        out = json.loads(result_path.read_text())
    if proc.returncode != 0 and "error" not in out:
        tail = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        out["error"] = f"process exited with {proc.returncode}" + (f": {tail[0]}" if tail else "")
    # peak: the largest single process (the child's VmHWM or its largest tool's ru_maxrss, reported
    # by the child) or the sampled sum over the process tree, whichever is larger. The wait4 value
    # is kept for reference only (it includes the parent's memory, see _own_peaks).
    own = max(out.get("self_hwm_gb", 0.0), out.get("tools_maxrss_gb", 0.0))
    out.update(process_seconds=wall, load_average_at_start=load, maxrss_wait4_gb=maxrss / 1e9,
               tree_rss_sampled_gb=sampler.peak / 1e9, peak_rss_gb=max(own, sampler.peak / 1e9))
    return out


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def machine_info(threads: int | None) -> dict:
    """CPU, cores, memory, library versions: the context of the timings."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cpu_count": os.cpu_count(), "threads": threads or f"default (all {os.cpu_count()} cores)"}
    try:
        models = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        mem = [ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")]
        info["memory_gb"] = round(int(mem[0].split()[1]) * 1024 / 1e9, 1) if mem else None
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        info["cpu"] = platform.processor()
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("numpy", "scipy", "torch", "convexAdam", "niftyreg", "SimpleITK"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    from .peers import elastix_unavailable, elastix_version

    info["elastix"] = None if elastix_unavailable() else elastix_version()
    return info


def _summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    scored = [r for r in ok if "tre_mean" in r]
    means = np.array([r["tre_mean"] for r in scored])
    return {
        "pairs": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
        "tre_mean": float(means.mean()) if scored else None,
        "tre_median": float(np.median(means)) if scored else None,
        "tre_max": float(max(r["tre_max"] for r in scored)) if scored else None,
        "sdlogj_mean": float(np.mean([r["sdlogj"] for r in ok])) if ok else None,
        "folds_total": int(sum(r["folds"] for r in ok)) if ok else None,
        "seconds_mean": float(np.mean([r["seconds"] for r in ok])) if ok else None,
        "cpu_seconds_mean": float(np.mean([r["cpu_seconds"] for r in ok])) if ok else None,
        "peak_rss_gb": float(max(r["peak_rss_gb"] for r in ok)) if ok else None,
    }


def run_bench(cases_dir: str | os.PathLike, methods: list[str] | None, out_dir: str | os.PathLike,
              modality: str = "t1", threads: int | None = None, progress: bool = True,
              resume: bool = False) -> dict:
    """Run every method on every case of ``cases_dir``; write bench.md/json/png under ``out_dir``.

    ``methods``: names from :data:`METHODS` (None: all). ``modality``: 't1', 't2' or 'both' (moving
    MR). ``threads``: passed to NiftyReg/elastix and torch (None: their defaults, all cores).
    A method that cannot run here gets ``unavailable`` (and no rows); a failing (method, case) gets
    an ``error`` and the others continue. Returns the bench.json payload; its ``errors`` and
    ``problems`` lists say what went wrong, one line each.

    Each finished (method, pair) is saved at once to ``OUT/runs/<method>/<pair>.json``, and the
    reports are rewritten after each method, so an interrupted bench keeps what it measured.
    ``resume``: reuse a saved run (without error, its field still present) instead of running it again.
    """
    from tqdm import tqdm

    from .fields import read_field
    from .metrics import evaluate_case
    from .pipeline import check_writable

    methods = parse_methods(",".join(methods or []))
    out = Path(out_dir)
    check_writable(out)
    found = discover_cases(cases_dir, modality)
    problems = list(found.problems)
    if not found.cases:
        raise InputError(f"{cases_dir}: no (fixed, moving) pair found")
    info = {name: {"description": METHODS[name], "settings": method_settings(name),
                   "unavailable": unavailable(name)} for name in methods}
    runnable = [m for m in methods if info[m]["unavailable"] is None]
    rows: list[dict] = []
    errors: list[str] = []
    payload = {"created": _dt.datetime.now().isoformat(timespec="seconds"), "cases_dir": str(Path(cases_dir).resolve()),
               "modality": modality, "machine": machine_info(threads), "methods": info}
    payload.update(cases=[c.pair_name for c in found.cases], results=rows, errors=errors, problems=problems)
    bar = tqdm(total=len(runnable) * len(found.cases), unit="run", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="brainshift_bench_") as tmp:
        for name in runnable:
            for case in found.cases:
                bar.set_description(f"{name} {case.case_id}_{case.moving_tag}")
                field = out / "fields" / name / case.output_name
                saved = out / "runs" / name / f"{case.pair_name}.json"
                if resume and saved.is_file() and field.is_file():
                    row = json.loads(saved.read_text())
                    if "error" not in row:
                        rows.append(row)
                        bar.update(1)
                        continue
                spec = {"method": name, "fixed": str(case.fixed), "moving": str(case.moving),
                        "fixed_mask": str(case.fixed_mask) if case.fixed_mask else None,
                        "modality": case.modality, "field": str(field), "threads": threads,
                        "landmarks": ([str(case.fixed_landmarks), str(case.moving_landmarks)]
                                      if case.fixed_landmarks and case.moving_landmarks else None)}
                log = out / "logs" / name / f"{case.case_id}_{case.moving_tag}.log"
                row = {"method": name, "case": case.pair_name, "field": str(field), "log": str(log),
                       **run_isolated(spec, Path(tmp), log)}
                if "error" not in row:
                    try:
                        row.update(evaluate_case(case, read_field(field)))
                    except (InputError, ValueError) as exc:
                        row["error"] = f"scoring failed: {exc}"
                if "error" in row:
                    errors.append(f"{name}: {case.pair_name}: {row['error']}")
                rows.append(row)
                write_json(saved, row)
                bar.update(1)
            _summarise(info, methods, runnable, rows)
            write_outputs(payload, out)  # after each method: an interrupted bench keeps its reports
    bar.close()
    _summarise(info, methods, runnable, rows)
    write_outputs(payload, out)
    return payload


def _summarise(info: dict, methods: list[str], runnable: list[str], rows: list[dict]) -> None:
    """Fill ``info[method]['summary']`` from the rows so far (None for a method without rows)."""
    for name in methods:
        done = [r for r in rows if r["method"] == name]
        info[name]["summary"] = _summary(done) if name in runnable and done else None
    ref = info.get(REFERENCE, {}).get("summary") or {}
    for name in runnable:
        s = info[name]["summary"]
        if s is not None:
            s["time_vs_convexadam"] = (s["seconds_mean"] / ref["seconds_mean"]
                                       if s["seconds_mean"] is not None and ref.get("seconds_mean") else None)


# ------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------
def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_rows(payload: dict) -> list[dict]:
    """One row per method (for the CLI table): method, summary numbers, or a note."""
    rows = []
    for name, m in payload["methods"].items():
        s = m.get("summary")
        if s is None:
            note = f"not available: {m['unavailable']}" if m["unavailable"] else "not run (yet)"
            rows.append({"method": name, "note": note})
        else:
            rows.append({"method": name, **s, "note": f"{s['failed']} failed" if s["failed"] else ""})
    return rows


SUMMARY_COLUMNS = [("method", "method", ""), ("ok", "pairs ok", "d"), ("tre_mean", "TRE mean mm", ".2f"),
                   ("tre_median", "TRE median mm", ".2f"), ("tre_max", "TRE max mm", ".2f"),
                   ("sdlogj_mean", "SDlogJ mean", ".4f"), ("folds_total", "folds", "d"),
                   ("seconds_mean", "time/case s", ".1f"), ("time_vs_convexadam", "time vs ConvexAdam", ".2f"),
                   ("cpu_seconds_mean", "CPU s/case", ".1f"),
                   ("peak_rss_gb", "peak mem GB", ".2f"), ("note", "note", "")]


def _deform_record(row: dict) -> dict:
    """The deformable stage's record of a bench row ({} if it has none)."""
    return ((row.get("record") or {}).get("stages") or {}).get("deform") or {}


def guard_confusion(rows: list[dict]) -> dict[str, list[str]]:
    """The deformable guard's decisions against the truth: pairs per outcome, from the TRE before the
    stage and of its candidate field (recorded by :func:`register_method` when landmarks exist).
    Keys: kept_better, kept_worse, rejected_better (would have helped), rejected_worse."""
    out: dict[str, list[str]] = {k: [] for k in ("kept_better", "kept_worse", "rejected_better", "rejected_worse")}
    for r in rows:
        d = _deform_record(r)
        if "tre_candidate" not in d or "error" in r:
            continue
        better = d["tre_candidate"] < d["tre_before"]
        out[("kept_" if d["kept"] else "rejected_") + ("better" if better else "worse")].append(r["case"])
    return out


def guard_table(payload: dict) -> list[str]:
    """bench.md section: per pipeline method with a deformable stage, the guard's confusion table and,
    per pair, TRE before the stage, of the candidate, and the decision."""
    lines: list[str] = []
    for name in payload["methods"]:
        rows = [r for r in payload["results"] if r["method"] == name]
        c = guard_confusion(rows)
        if not any(c.values()):
            continue
        lines += ["", f"## Deformable guard of `{name}`: decisions against the truth", "",
                  "| | candidate lowers TRE | candidate raises TRE |", "|---|---:|---:|",
                  f"| kept | {len(c['kept_better'])} | {len(c['kept_worse'])} |",
                  f"| rejected | {len(c['rejected_better'])} | {len(c['rejected_worse'])} |", "",
                  "| pair | TRE before mm | candidate mm | kept | guard |", "|---|---:|---:|---|---|"]
        for r in rows:
            d = _deform_record(r)
            if "tre_candidate" in d:
                lines.append(f"| {r['case']} | {d['tre_before']:.2f} | {d['tre_candidate']:.2f} | "
                             f"{'yes' if d['kept'] else 'no'} | {d['reason']} |")
    return lines


def markdown(payload: dict) -> str:
    """bench.md: summary table, per-pair TRE table, failures, settings."""
    machine = payload["machine"]
    lines = [f"# Benchmark: {len(payload['cases'])} pairs from `{payload['cases_dir']}`", "",
             f"Written by `brainshift bench` on {payload['created']} (modality {payload['modality']}). "
             "TRE is the official ReMIND2Reg formula (cubic-spline sampling of the voxel pull field at the "
             "fixed landmarks, error scaled by the moving spacing). *TRE mean* is the mean over pairs of each "
             "pair's mean landmark error, *median* the median of those, *max* the largest single-landmark "
             "error. SDlogJ is the official value (with its +3); *folds* counts voxels with J <= 0, summed over "
             "pairs. *time/case* is the registration call alone (imports done, images loaded), *time vs "
             "ConvexAdam* its ratio to ConvexAdam's, *CPU s/case* the user + system CPU seconds of that call "
             "(the Python process and the tools it ran; less sensitive than wall time to other load on a shared "
             "machine), *peak mem* the largest peak RSS over the pairs (see Settings).", "", "## Summary", ""]
    head = [h for _, h, _ in SUMMARY_COLUMNS]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 or i == len(head) - 1 else "---:"
                                                              for i in range(len(head))) + "|"]
    for r in summary_rows(payload):
        if "ok" not in r:
            lines.append(f"| {r['method']} | " + " | ".join("-" for _ in head[1:-1]) + f" | {r['note']} |")
        else:
            cells = [_f(r.get(k), f) if f else str(r.get(k) or "") for k, _, f in SUMMARY_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    ran = [m for m, v in payload["methods"].items() if v.get("summary")]
    lines += ["", "## TRE per pair (mean over the pair's landmarks, mm)", "",
              "| pair | " + " | ".join(ran) + " |", "|---|" + "---:|" * len(ran)]
    by = {(r["method"], r["case"]): r for r in payload["results"]}
    for case in payload["cases"]:
        cells = []
        for m in ran:
            r = by.get((m, case), {})
            cells.append("failed" if "error" in r else _f(r.get("tre_mean"), ".2f"))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += guard_table(payload)
    if payload["errors"] or payload["problems"]:
        lines += ["", "## Failures and skipped files", ""] + [f"- {e}" for e in payload["errors"] + payload["problems"]]
    lines += ["", "## Settings", "",
              f"- machine: {machine.get('cpu')}, {machine.get('cpu_count')} logical cores, "
              f"{machine.get('memory_gb')} GB RAM; {machine.get('platform')}; load average at start "
              f"{', '.join(f'{x:.1f}' for x in machine.get('load_average_at_start', []))}",
              f"- threads: {machine.get('threads')} (NiftyReg -omp, elastix -threads, torch.set_num_threads, "
              "OMP/MKL/OpenBLAS variables)",
              f"- versions: python {machine.get('python')}, numpy {machine.get('numpy')}, scipy {machine.get('scipy')}, "
              f"torch {machine.get('torch')}, convexAdam {machine.get('convexAdam')}, niftyreg {machine.get('niftyreg')}, "
              f"SimpleITK {machine.get('SimpleITK')}, elastix: {machine.get('elastix') or 'not installed'}",
              "- isolation: each (method, pair) runs in a fresh `python -m brainshift.bench --one` process, one at a "
              "time; its field is written to `fields/<method>/` and scored from that file.",
              "- peak memory: the larger of the largest single-process peak (the run's own VmHWM, and `ru_maxrss` "
              "of RUSAGE_CHILDREN for the tools it ran and waited for, e.g. reg_aladin, elastix) and the summed RSS "
              "of the process tree sampled every 0.2 s from /proc. (`os.wait4`'s `ru_maxrss` is kept in bench.json "
              "but not used: on Linux it includes the bench parent's own memory, inherited through fork/exec.)",
              "- fields: every method's output is a Learn2Reg voxel pull field on the fixed (iUS) grid; peers' "
              "native fields are converted (see `brainshift/peers.py`).", ""]
    for name, m in payload["methods"].items():
        lines += [f"### {name}", "", m["description"] + ".", ""]
        if m["unavailable"]:
            lines += [f"Not available here: {m['unavailable']}", ""]
        lines += ["```json", json.dumps(m["settings"], indent=1), "```", ""]
    return "\n".join(lines)


def plot_tre(payload: dict, path: Path) -> Path | None:
    """Box plot of per-pair mean TRE by method (matplotlib Agg), written atomically; None if nothing scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {m: [r["tre_mean"] for r in payload["results"] if r["method"] == m and "tre_mean" in r]
            for m in payload["methods"]}
    data = {m: v for m, v in data.items() if v}
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(1.3 * len(data) + 2, 4.5))
    ax.boxplot(list(data.values()), showmeans=True)
    for i, values in enumerate(data.values(), start=1):
        ax.plot(np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)), values, "o", ms=3, alpha=0.6, color="k")
    ax.set_xticks(range(1, len(data) + 1), list(data), rotation=30, ha="right")
    ax.set_ylabel("TRE per pair (mean over landmarks), mm")
    ax.set_title(f"{len(payload['cases'])} pairs (box: quartiles, line: median, triangle: mean, dots: pairs)",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        return _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def write_outputs(payload: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write bench.json, bench.md and bench_tre.png into ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    paths = {"json": write_json(out / "bench.json", payload, indent=1)}
    md = markdown(payload)
    paths["md"] = _atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(md))
    png = plot_tre(payload, out / "bench_tre.png")
    if png:
        paths["png"] = png
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m brainshift.bench --one SPEC.json`` (internal: one isolated run)."""
    p = argparse.ArgumentParser(prog="python -m brainshift.bench",
                                description="Internal: run one (method, case) spec; use `brainshift bench` instead.")
    p.add_argument("--one", required=True, metavar="SPEC.json")
    return _child(p.parse_args(argv).one)


if __name__ == "__main__":
    sys.exit(main())
