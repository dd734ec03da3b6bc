"""Held-out synthetic evaluation of a deformable network, and its learning-curve figure.

``python -m brainshift.deform.evaluate [--model PATH] [--pairs 16]`` prints, for held-out pairs of
the model's own generator (seeds ``VAL_SEED_BASE + 1000 + i``, never used in training or in the
training's validation) with related contrasts, with independent contrasts, and with the model's
training mixture: hard Dice of the labels, endpoint error (EPE) over the grid and near label
boundaries (working voxels), for the identity and for the network.
``--curves OUT.png LOG.csv[=NAME] ...`` plots learning curves (validation rows of the logs).
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

import torch

from .network import build_network
from .synthetic import VAL_SEED_BASE, GeneratorConfig, held_out_metrics

EVAL_SEED_BASE = VAL_SEED_BASE + 1000


def load_trained(path: str | Path | None = None) -> tuple[torch.nn.Module, GeneratorConfig, dict]:
    """(network in eval mode on the CPU, its training generator, card) from a ``synthmorph_l*.pt`` file."""
    from .. import model_dir

    path = Path(path) if path else model_dir() / "synthmorph" / "synthmorph_l0.50.pt"
    ck = torch.load(path, map_location="cpu", weights_only=False)
    net = build_network(ck["net"])
    net.load_state_dict(ck["model"])
    gen = ck.get("card", {}).get("config", {}).get("generator", {"shape": int(ck["shape"])})
    known = set(GeneratorConfig.__dataclass_fields__)
    gen = GeneratorConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in gen.items() if k in known})
    return net.eval(), gen, ck.get("card", {})


def evaluate(net: torch.nn.Module, gen: GeneratorConfig, pairs: int = 16) -> dict[str, float]:
    """Mean Dice / EPE / boundary EPE over ``pairs`` held-out pairs, identity (``*_before``) and network."""
    return held_out_metrics(net, gen, range(EVAL_SEED_BASE, EVAL_SEED_BASE + pairs))


def plot_curves(out: str | Path, logs: list[tuple[str, Path]]) -> None:
    """Dice gain and boundary-EPE ratio (network / identity) against iterations, one line per log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in logs:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("val_dice_after")]
        it = [int(r["iteration"]) for r in rows]
        axes[0].plot(it, [float(r["val_dice_after"]) - float(r["val_dice_before"]) for r in rows], label=name)
        line, = axes[1].plot(it, [float(r["val_bepe_after"]) / float(r["val_bepe_before"]) for r in rows], label=name)
        fov = [r for r in rows if r.get("val_bepe_fov_after")]   # logged since session 19: dashed
        if fov:
            axes[1].plot([int(r["iteration"]) for r in fov], [float(r["val_bepe_fov_after"]) /
                         float(r["val_bepe_fov_before"]) for r in fov], ls="--", color=line.get_color())
    axes[0].axhline(0.05, color="k", ls=":", lw=1)
    axes[1].axhline(0.7, color="k", ls=":", lw=1)
    axes[0].set(xlabel="iteration", ylabel="Dice gain over identity", title="held-out synthetic pairs: Dice")
    axes[1].set(xlabel="iteration", ylabel="boundary EPE / identity's",
                title="EPE near label boundaries (dashed: in the FOV)")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m brainshift.deform.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="weights file (default: the shipped lambda 0.5 model)")
    p.add_argument("--pairs", type=int, default=16, help="held-out pairs per setting")
    p.add_argument("--curves", nargs="+", metavar="ARG", help="OUT.png LOG.csv[=NAME] ...: plot learning curves")
    args = p.parse_args(argv)
    if args.curves:
        logs = [(a.split("=", 1)[1] if "=" in a else Path(a).parent.name, Path(a.split("=", 1)[0]))
                for a in args.curves[1:]]
        plot_curves(args.curves[0], logs)
        print(f"wrote {args.curves[0]}")
        return 0
    torch.set_num_threads(2)
    net, gen, card = load_trained(args.model)
    print(f"model: {card.get('architecture', '?')}, {card.get('iterations', '?')} iterations, shape {gen.shape}")
    print("| held-out pairs | n | Dice identity | Dice network | EPE identity | EPE network | boundary EPE identity "
          "| boundary EPE network | ratio | in the FOV: identity | network | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, g in (("training mixture", gen), ("related contrasts", replace(gen, related_prob=1.0)),
                    ("independent contrasts", replace(gen, related_prob=0.0, same_contrast_prob=0.0))):
        m = evaluate(net, g, args.pairs)
        print(f"| {name} | {args.pairs} | {m['dice_before']:.3f} | {m['dice_after']:.3f} | {m['epe_before']:.2f} | "
              f"{m['epe_after']:.2f} | {m['bepe_before']:.2f} | {m['bepe_after']:.2f} | "
              f"{m['bepe_after'] / m['bepe_before']:.2f} | {m['bepe_fov_before']:.2f} | {m['bepe_fov_after']:.2f} | "
              f"{m['bepe_fov_after'] / m['bepe_fov_before']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
