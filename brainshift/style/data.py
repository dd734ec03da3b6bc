"""Intensity normalisation and unpaired random patch sampling for the style-transfer CycleGAN.

Normalised units: each volume is divided by its 99.5th percentile over the iUS field of view
(``us > 0``; a T1 over the field of view it is cut to), clipped to ``[0, 1]`` and mapped to ``[-1, 1]``. Voxels
outside the iUS field of view are set to ``-1`` in both domains, so that real T1 patches and
synthetic ones share the same support (the discriminator cannot tell them apart by the cone).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import discover_cases, load_volume

PERCENTILE = 99.5


def normalise(vol: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale to ``[-1, 1]``: ``2 * clip(v / p99.5, 0, 1) - 1`` (percentile over ``mask`` or v > 0);
    voxels outside ``mask`` (default ``v > 0``) become ``-1``. float32, same shape."""
    vol = np.asarray(vol, dtype=np.float32)
    mask = vol > 0 if mask is None else np.asarray(mask, dtype=bool)
    out = np.full(vol.shape, -1.0, dtype=np.float32)
    if not mask.any():
        return out
    scale = float(np.percentile(vol[mask], PERCENTILE))
    scale = scale if scale > 0 else float(np.abs(vol[mask]).max() or 1.0)
    out[mask] = 2.0 * np.clip(vol[mask] / scale, 0.0, 1.0) - 1.0
    return out


@dataclass
class StyleCase:
    """One training volume in normalised units: an iUS (``us``), a T1 (``t1``) or both on one grid
    (a simulated pair); ``fov`` is the iUS field of view that both domains are cut to."""

    name: str
    us: np.ndarray | None
    t1: np.ndarray | None
    fov: np.ndarray
    fov_index: np.ndarray  # (N, 3) voxel indices inside the field of view, for centre sampling
    paired: bool = False   # ``t1`` is aligned with ``us`` (a simulated pair warped with its true field)


def _centres(fov: np.ndarray) -> np.ndarray:
    """A thinned set of FOV voxel indices (memory: 256^3 volumes have ~10^7 of them)."""
    idx = np.argwhere(fov)
    if len(idx) > 200_000:
        idx = idx[:: len(idx) // 200_000]
    return idx.astype(np.int32)


def make_case(name: str, us: np.ndarray | None, t1: np.ndarray | None, fov: np.ndarray | None = None) -> StyleCase:
    """Normalise an iUS and/or a T1 on one grid, each by its 99.5th percentile inside ``fov``
    (default ``us > 0``): the normalisation inference applies to an iUS."""
    if fov is None:
        if us is None:
            raise ValueError("a T1-only case needs its field of view")
        fov = np.asarray(us) > 0
    fov = np.asarray(fov, dtype=bool)
    return StyleCase(name, None if us is None else normalise(us, fov), None if t1 is None else normalise(t1, fov),
                     fov, _centres(fov))


def load_cases(data_dir: str | Path) -> list[StyleCase]:
    """iUS (``_0000``) and T1 (``_0001``) of every T1 case in a ReMIND2Reg-layout folder."""
    found = discover_cases(data_dir, "t1")
    if not found.cases:
        raise ValueError(f"{data_dir}: no iUS/T1 case found ({'; '.join(found.problems) or 'empty folder'})")
    cases = []
    for c in found.cases:
        us, t1 = load_volume(c.fixed).data, load_volume(c.moving).data
        if us.shape != t1.shape:
            raise ValueError(f"case {c.case_id}: iUS {us.shape} and T1 {t1.shape} grids differ")
        if not (us > 0).any():
            raise ValueError(f"{c.fixed}: iUS has no voxel > 0 (empty field of view)")
        cases.append(make_case(c.case_id, us, t1))
    return cases


def load_paired_cases(data_dir: str | Path, spacing: float | None = None) -> list[StyleCase]:
    """Simulated pairs with known truth (``brainshift simulate`` output: ``truth/`` pull fields):
    per T1 case, the T1 pulled onto the iUS grid with the TRUE field (so voxel ``p`` of both shows
    the same tissue), both brought to ``spacing`` mm (None: the iUS grid as is) as inference brings
    an iUS (:func:`brainshift.style.real.to_spacing`, averaged over the field of view). The cases are
    marked ``paired``: the trainer's supervised term compares the generator's output with this T1."""
    from .. import fields
    from .real import to_spacing

    found = discover_cases(data_dir, "t1")
    if not found.cases:
        raise ValueError(f"{data_dir}: no iUS/T1 case found ({'; '.join(found.problems) or 'empty folder'})")
    cases = []
    for c in found.cases:
        truth = Path(c.fixed).parent.parent / "truth" / c.output_name
        if not truth.is_file():
            raise ValueError(f"{truth}: a paired case needs its true field (a brainshift simulate folder)")
        us, t1 = load_volume(c.fixed), load_volume(c.moving)
        fov = us.data > 0
        aligned = fields.warp(t1.data, fields.read_field(truth))
        if spacing is not None:
            img, fov_w = to_spacing(us.data, us.spacing, spacing, fov)
            aligned = to_spacing(aligned, us.spacing, spacing, fov)[0]
        else:
            img, fov_w = np.where(fov, us.data, 0.0), fov
        case = make_case(f"sim{c.case_id}", img, aligned, fov_w)
        case.paired = True
        cases.append(case)
    return cases


def crop(vol: np.ndarray, centre: np.ndarray, patch: int, fill: float) -> np.ndarray:
    """Cubic patch of side ``patch`` around ``centre``, kept inside the volume where it fits,
    padded with ``fill`` where the volume is smaller than the patch."""
    out = np.full((patch,) * 3, fill, dtype=np.float32)
    src, dst = [], []
    for c, n in zip(centre, vol.shape):
        start = int(c) - patch // 2
        start = min(max(start, 0), max(n - patch, 0)) if n >= patch else (n - patch) // 2
        lo, hi = max(start, 0), min(start + patch, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = vol[tuple(src)]
    return out


class PatchSampler:
    """Unpaired patches: the iUS patch and the T1 patch of one sample come from independently
    drawn volumes and centres (each centre inside that volume's iUS field of view); both are set
    to -1 outside the field of view at their own location. Random flips along each axis.
    iUS patches come from the cases that have an iUS, T1 patches from those that have a T1;
    ``paired_in_domains=False`` keeps the paired (simulated) cases out of both domains, so that they
    only feed :meth:`sample_paired` and the discriminators see real images alone."""

    def __init__(self, cases: list[StyleCase], patch: int, seed: int = 0, paired_in_domains: bool = True):
        self.patch = patch
        unpaired = [c for c in cases if paired_in_domains or not c.paired]
        self.domains = {"us": [c for c in unpaired if c.us is not None],
                        "t1": [c for c in unpaired if c.t1 is not None]}
        for name, found in self.domains.items():
            if not found:
                raise ValueError(f"no training volume of the {name} domain")
        self.paired = [c for c in cases if c.paired]
        self.rng = np.random.default_rng(seed)

    def _cut(self, case: StyleCase, images: list[np.ndarray]) -> list[np.ndarray]:
        """One random centre in ``case``'s FOV: each of ``images`` (then the FOV) cropped there, -1
        outside the FOV, all flipped alike."""
        centre = case.fov_index[self.rng.integers(len(case.fov_index))]
        fov = crop(case.fov.astype(np.float32), centre, self.patch, 0.0)
        out = [np.where(fov > 0, crop(img, centre, self.patch, -1.0), -1.0).astype(np.float32) for img in images]
        out.append(fov)
        for axis in range(3):
            if self.rng.random() < 0.5:
                out = [np.flip(x, axis) for x in out]
        return [np.ascontiguousarray(x) for x in out]

    def _one(self, domain: str) -> tuple[np.ndarray, np.ndarray]:
        cases = self.domains[domain]
        case = cases[self.rng.integers(len(cases))]
        img, fov = self._cut(case, [case.us if domain == "us" else case.t1])
        return img, fov

    def sample_paired(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(us, t1, fov)`` of ``batch`` aligned patches (one centre per pair), each
        ``(batch, 1, P, P, P)`` float32; needs paired cases."""
        if not self.paired:
            raise ValueError("no paired (simulated, aligned) training volume")
        cuts = []
        for _ in range(batch):
            case = self.paired[self.rng.integers(len(self.paired))]
            cuts.append(self._cut(case, [case.us, case.t1]))
        return tuple(np.stack([c[i] for c in cuts])[:, None] for i in range(3))   # type: ignore[return-value]

    def sample(self, batch: int) -> tuple[np.ndarray, ...]:
        """``(us, us_fov, t1, t1_fov)``, each ``(batch, 1, P, P, P)`` float32."""
        a = [self._one("us") for _ in range(batch)]
        b = [self._one("t1") for _ in range(batch)]
        stack = lambda xs: np.stack(xs)[:, None]  # noqa: E731
        return stack([x[0] for x in a]), stack([x[1] for x in a]), stack([x[0] for x in b]), stack([x[1] for x in b])
