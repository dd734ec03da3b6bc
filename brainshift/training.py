"""What the two trainers share: checkpoints, exact resume, the learning-curve CSV, progress, and the
distributed launch.

Both ``brainshift train-synthmorph`` (:mod:`brainshift.deform.train`) and ``brainshift train-style``
(:mod:`brainshift.style.train`) run single-process by default and under
``torchrun --nproc_per_node N`` when launched so: :class:`Dist` reads torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the process group (NCCL on CUDA, gloo on CPU) and
gives each rank its device. Only rank 0 writes files and shows a progress bar.

Checkpoints are written atomically (a temporary file, then ``os.replace``), so an interrupted run
never leaves a half-written checkpoint; with the RNG states (:func:`rng_state`) and a data stream
that is a pure function of the iteration, a resumed run continues the learning curve exactly.
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed as tdist


def save_atomic(obj, path: Path | str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    """The states of Python's, numpy's and torch's global generators (CPU, and CUDA if present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (a missing CUDA state is skipped)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())   # a checkpoint loaded with map_location='cuda' moved it
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class Dist:
    """This process's place in a (possibly one-process) training run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on the process that writes files and logs (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "") -> "Dist":
        """Join torchrun's process group if ``WORLD_SIZE`` > 1; ``device`` '' = cuda when present.

        On CUDA each rank takes GPU ``LOCAL_RANK`` and NCCL; on CPU, gloo.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
            torch.cuda.set_device(dev)
        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank=rank, world=world, local_rank=local, device=dev)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(model)`` when distributed, else ``model``."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """All-reduce and average the gradients of ``params`` (what DDP does, for models it does not wrap)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                tdist.all_reduce(p.grad)
                p.grad /= self.world

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks."""
        if self.world == 1:
            return float(value.detach())
        t = value.detach().float().reshape(1).clone()
        tdist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def close(self) -> None:
        if self.world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


class CsvLog:
    """The learning curve: a CSV with a header, appended row by row (rank 0 only writes).

    ``restart=True`` starts a new file; otherwise rows are appended to an existing one. Rows past
    ``keep_until`` (an iteration, first column) are dropped when resuming, so a run interrupted after
    its last checkpoint does not log the same iterations twice.
    """

    def __init__(self, path: Path | str, header: list[str], restart: bool, enabled: bool = True,
                 keep_until: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if restart or not self.path.is_file():
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerow(header)
        else:   # resuming: keep the rows up to the checkpoint, under the current header (new columns empty)
            with open(self.path, newline="") as fh:
                rows = list(csv.reader(fh))
            old = rows[0] if rows else header
            kept = [dict(zip(old, r)) for r in rows[1:]
                    if r and (keep_until is None or int(float(r[0])) <= keep_until)]
            with open(self.path, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(header)
                w.writerows([[r.get(k, "") for k in header] for r in kept])

    def row(self, values: list) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as fh:
                csv.writer(fh).writerow(values)


def progress(iterable: Iterable, enabled: bool, **kwargs):
    """A tqdm progress bar (shown only when ``enabled``, e.g. on rank 0)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)
