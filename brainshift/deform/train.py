"""Train the deformable network on synthetic pairs (SynthMorph's idea: no real data needed).

``brainshift train-synthmorph`` (or ``python -m brainshift.deform.train``). Each iteration draws
``batch`` pairs from :func:`brainshift.deform.synthetic.generate_pair`; the pair of iteration ``i``,
slot ``j`` of the global batch has seed ``seed * 1_000_003 + i * global_batch + j``, so the data is
a pure function of the iteration and a resumed run sees exactly what an uninterrupted one would.

Loss per pair (mean over the batch)::

    (1 - lam) * (1 - soft Dice(fixed labels, warped moving labels))   SynthMorph's term
    + lam * 1/2 mean |grad u|^2                                         SynthMorph's regulariser
    + sup_weight * mean |u - u_true|^2                                  the known field (voxels^2)

The supervised term is kept for the whole run by default (``sup_decay`` 0); the curriculum
``same_warmup`` starts with both images in one contrast and fades that out. ``u`` is the network's
displacement on the working grid (voxels, pull, fixed grid).

Files in ``out`` (stem ``synthmorph_l{lam:.2f}``): ``<stem>.pt`` (weights and configs, what
inference loads; rewritten at every checkpoint), ``<stem>.json`` (card), ``<stem>.log.csv`` (the
learning curve: losses every iteration, validation every ``val_every``), ``<stem>.ckpt.pt``
(weights, optimiser, iteration, RNG states, for ``--resume``).

Distributed: ``torchrun --nproc_per_node N -m brainshift.deform.train ...`` runs N ranks under
DistributedDataParallel (NCCL on GPU, gloo on CPU); ``batch`` is per rank, each rank draws its own
slots of the global batch, and the logged loss is the global batch's mean.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..training import CsvLog, Dist, progress, rng_state, save_atomic, set_rng_state
from .network import NetConfig, build_network
from .synthetic import (VAL_SEED_BASE, GeneratorConfig, generate_pair, grad_penalty, held_out_metrics, onehot,
                        soft_dice_loss, warp)

LOG_HEADER = ["iteration", "loss", "dice_loss", "grad", "sup", "wall_s", "val_dice_before", "val_dice_after",
              "val_epe_before", "val_epe_after", "val_bepe_before", "val_bepe_after", "val_bepe_fov_before",
              "val_bepe_fov_after"]
VAL_KEYS = [h[len("val_"):] for h in LOG_HEADER if h.startswith("val_")]   # validate()'s keys, in log order


@dataclass
class TrainConfig:
    """Options of ``brainshift train-synthmorph`` (lengths in working-grid voxels)."""

    out: str = "model/synthmorph"
    iterations: int = 1000
    lam: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch: int = 1             # pairs per rank and iteration
    seed: int = 0
    device: str = ""           # '' = cuda when present
    threads: int = 2           # CPU threads (CPU only)
    workers: int = 0           # DataLoader processes generating pairs (0: in the training process)
    checkpoint_every: int = 100
    val_every: int = 250
    val_pairs: int = 8
    sup_weight: float = 0.05   # weight of the supervised term (x mean squared endpoint error, voxels^2)
    sup_decay: int = 0         # iterations over which it decays linearly to 0 (0: kept for the whole run)
    same_warmup: int = 0       # curriculum: same-contrast probability decays 1 -> generator's value
    decay: int = 0             # the last ``decay`` iterations before ``iterations`` anneal lr to 0 (cosine)
    time_limit_min: float = 0  # stop (checkpoint first) after this many minutes (0: no limit)
    init_weights: str = ""     # start from this model's weights (a synthmorph_l*.pt), with a fresh optimiser
    resume: bool = False
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    net: NetConfig = field(default_factory=NetConfig)


def model_stem(lam: float) -> str:
    """File stem of the model trained with regularisation ``lam``: ``synthmorph_l0.50``."""
    return f"synthmorph_l{lam:.2f}"


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate of ``iteration``: ``cfg.lr``, then a cosine from ``cfg.lr`` to 0 over the last
    ``cfg.decay`` iterations of the run (a warmup-stable-decay schedule: a run continued at the stable
    rate resumes from a checkpoint taken before the decay)."""
    start = cfg.iterations - cfg.decay
    if not cfg.decay or iteration < start:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (iteration - start) / cfg.decay))


def generator_at(cfg: TrainConfig, iteration: int) -> GeneratorConfig:
    """The generator's configuration at ``iteration`` (the curriculum)."""
    gen = cfg.generator
    if iteration < cfg.same_warmup:
        frac = iteration / cfg.same_warmup
        gen = replace(gen, same_contrast_prob=(1 - frac) + frac * gen.same_contrast_prob)
    return gen


class PairStream(torch.utils.data.Dataset):
    """Item ``k`` = the synthetic pair of global slot ``k`` (iteration ``k // global_batch``).

    Pairs are made on ``device``: the CPU in loader worker processes, or the GPU in the training
    process (no workers), where the warps and integrations run many times faster.
    """

    def __init__(self, cfg: TrainConfig, global_batch: int, device: torch.device | str = "cpu"):
        self.cfg, self.global_batch, self.device = cfg, global_batch, device

    def __len__(self) -> int:
        return self.cfg.iterations * self.global_batch

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        gen = generator_at(self.cfg, k // self.global_batch)
        pair = generate_pair(self.cfg.seed * 1_000_003 + k, gen, 1, self.device)
        return {key: v[0] for key, v in pair.items()}


def _loader(cfg: TrainConfig, dist: Dist, start: int) -> torch.utils.data.DataLoader:
    gb = cfg.batch * dist.world
    slots = [it * gb + dist.rank * cfg.batch + j for it in range(start, cfg.iterations) for j in range(cfg.batch)]
    device = dist.device if cfg.workers == 0 else "cpu"
    return torch.utils.data.DataLoader(PairStream(cfg, gb, device), batch_size=cfg.batch, sampler=slots,
                                       num_workers=cfg.workers, persistent_workers=False,
                                       prefetch_factor=4 if cfg.workers else None)


def pair_loss(net: torch.nn.Module, pair: dict[str, torch.Tensor], cfg: TrainConfig, iteration: int):
    """(loss, dice_loss, grad, sup) of one batch; ``pair`` tensors on the network's device."""
    n_labels = cfg.generator.n_labels
    disp = net(pair["moving"], pair["fixed"]).float()
    dice_l = soft_dice_loss(onehot(pair["fixed_labels"], n_labels), warp(onehot(pair["moving_labels"], n_labels), disp))
    reg = grad_penalty(disp)
    sup = ((disp - pair["truth"]) ** 2).sum(1).mean()
    w_sup = cfg.sup_weight * (max(0.0, 1 - iteration / cfg.sup_decay) if cfg.sup_decay else 1.0)
    loss = (1 - cfg.lam) * dice_l + cfg.lam * reg + w_sup * sup
    return loss, dice_l, reg, sup


def validate(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean Dice, EPE and boundary EPE on ``cfg.val_pairs`` held-out pairs, identity (before) and network (after).

    The held-out pairs use seeds ``VAL_SEED_BASE + i`` and the final generator (no curriculum).
    """
    return held_out_metrics(model, cfg.generator, range(VAL_SEED_BASE, VAL_SEED_BASE + cfg.val_pairs), device)


def init_from(model: torch.nn.Module, path: str | Path) -> None:
    """Copy the weights of a saved model (``synthmorph_l*.pt``) into ``model`` (same architecture)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit this network ({err})") from None


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("resume", None)
    return d


def train(cfg: TrainConfig, progress_bar: bool = True) -> dict:
    """Train (or resume) one model; returns its card (also written to ``out``). See the module docstring."""
    dist = Dist.from_env(cfg.device)
    device = dist.device
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    div = cfg.net.divisor()
    if cfg.generator.shape % div:
        raise ValueError(f"shape {cfg.generator.shape} must be divisible by {div} for this network")
    out = Path(cfg.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    stem = model_stem(cfg.lam)
    ckpt_path = out / f"{stem}.ckpt.pt"

    torch.manual_seed(cfg.seed)
    model = build_network(cfg.net).to(device)
    if cfg.init_weights and not (cfg.resume and ckpt_path.is_file()):
        init_from(model, cfg.init_weights)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            eps=1e-8 if cfg.net.design == "corr" else 1e-12)
    start, wall_before, val = 0, 0.0, {}
    if cfg.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, wall_before = int(ck["iteration"]), float(ck.get("wall_s", 0.0))
        set_rng_state(ck["rng"])
        val = ck.get("val", {})
    net = dist.wrap(model)
    log = CsvLog(out / f"{stem}.log.csv", LOG_HEADER, restart=start == 0, enabled=dist.main, keep_until=start)

    def save(done: int, wall: float) -> None:
        if not dist.main:
            return
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": done, "wall_s": wall,
                     "rng": rng_state(), "val": val, "config": _cfg_dict(cfg)}, ckpt_path)
        card = make_card(cfg, model, done, wall, val, device, dist.world)
        save_atomic({"model": model.state_dict(), "net": asdict(cfg.net), "shape": cfg.generator.shape,
                     "lambda": cfg.lam, "card": card}, out / f"{stem}.pt")
        (out / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")

    t0 = time.time()
    net.train()
    done = start
    bar = progress(_loader(cfg, dist, start), dist.main and progress_bar, initial=start, total=cfg.iterations,
                   desc=f"{cfg.net.design} lam={cfg.lam}")
    for it, batch in enumerate(bar, start=start):
        pair = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss, dice_l, reg, sup = pair_loss(net, pair, cfg, it)
        for group in opt.param_groups:   # from the config, not the checkpoint: a resumed run may change it
            group["lr"] = lr_at(cfg, it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = it + 1
        wall = wall_before + time.time() - t0
        values = [dist.mean(x) for x in (loss, dice_l, reg, sup)]
        row = [done, *(f"{v:.6f}" for v in values), f"{wall:.1f}"] + [""] * len(VAL_KEYS)
        # ranks must agree on when to stop: the decision is the mean of their clocks' verdicts
        out_of_time = bool(cfg.time_limit_min) and dist.mean(torch.tensor(
            float(time.time() - t0 > 60 * cfg.time_limit_min))) > 0
        last = done == cfg.iterations or out_of_time
        if dist.main and cfg.val_every and (done % cfg.val_every == 0 or last):
            val = validate(model, cfg, device)
            row[-len(VAL_KEYS):] = [f"{val[k]:.4f}" for k in VAL_KEYS]
        log.row(row)
        bar.set_postfix(loss=f"{values[0]:.3f}", dice=f"{1 - values[1]:.3f}", sup=f"{values[3]:.2f}")
        if done % cfg.checkpoint_every == 0 or last:
            save(done, wall)
        if out_of_time:
            break
    bar.close()
    wall = wall_before + time.time() - t0
    if dist.main and not val:
        val = validate(model, cfg, device)
    if dist.main:
        save(done, wall)
    dist.barrier()
    dist.close()
    return make_card(cfg, model, done, wall, val, device, dist.world)


def make_card(cfg: TrainConfig, model: torch.nn.Module, iteration: int, wall: float, val: dict,
              device: torch.device, world: int) -> dict:
    """The model card: what was trained, on what, how long, and its held-out validation."""
    design = {"corr": "cost-volume network (SSC + learned features, correlation, CNN regulariser, soft-argmin)",
              "unet": "voxelmorph VxmPairwise (neurite BasicUNet), SVF integration"}[cfg.net.design]
    return {
        "model": f"{model_stem(cfg.lam)}.pt", "architecture": design, "shape": [cfg.generator.shape] * 3,
        "lambda": cfg.lam, "iterations": iteration, "iterations_planned": cfg.iterations, "device": str(device),
        "processes": world, "threads": cfg.threads if device.type == "cpu" else None, "wall_time_s": round(wall, 1),
        "validation": {"pairs": cfg.val_pairs, "seeds": f"{VAL_SEED_BASE}..{VAL_SEED_BASE + cfg.val_pairs - 1}",
                       **{k: round(v, 4) for k, v in val.items()},
                       "note": "hard Dice of nearest-warped labels; EPE = mean endpoint error vs the true field "
                               "(working voxels), bepe = EPE within 1 voxel of a fixed-label boundary, "
                               "bepe_fov = the same inside the field of view"},
        "loss": f"(1-lam)*(1-softDice) + lam*0.5*mean|grad u|^2 + {cfg.sup_weight}*mean|u-truth|^2"
                + (f" decaying to 0 over {cfg.sup_decay} it" if cfg.sup_decay else " (whole run)")
                + (f"; curriculum: same-contrast probability 1 -> {cfg.generator.same_contrast_prob} over "
                   f"{cfg.same_warmup} it" if cfg.same_warmup else ""),
        "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_per_process": cfg.batch,
                      "schedule": f"constant, then cosine to 0 over iterations {cfg.iterations - cfg.decay}.."
                                  f"{cfg.iterations}" if cfg.decay else "constant"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": _cfg_dict(cfg), "log": f"{model_stem(cfg.lam)}.log.csv", "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of ``brainshift train-synthmorph`` (the CLI passes its sub-parser here)."""
    d, n = TrainConfig(), NetConfig()
    p = parser or argparse.ArgumentParser(prog="brainshift train-synthmorph", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=d.out, help="output folder (weights, card, learning curve, checkpoint)")
    p.add_argument("--design", choices=("corr", "unet"), default=n.design, help="network design (see deform.network)")
    p.add_argument("--shape", type=int, default=GeneratorConfig().shape, help="cubic working shape in voxels")
    p.add_argument("--iterations", type=int, default=d.iterations,
                   help="total iterations (a resumed run continues to it)")
    p.add_argument("--batch", type=int, default=d.batch, help="pairs per process and iteration")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam, help="regularisation weight (mri_synthmorph -r)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate (with --resume too: this one, not the checkpoint's)")
    p.add_argument("--labels", type=int, default=GeneratorConfig().n_labels, help="labels per synthetic map")
    p.add_argument("--svf-std", type=float, default=GeneratorConfig().svf_std_max,
                   help="largest std of each random SVF (voxels at shape 48, scaled with shape)")
    p.add_argument("--related", type=float, default=GeneratorConfig().related_prob,
                   help="probability that the moving contrast is a monotone map of the fixed's (else independent)")
    p.add_argument("--radius", type=int, default=n.radius, help="corr: search radius (half-resolution voxels)")
    p.add_argument("--width", type=int, default=n.width, help="corr: encoder/regulariser width")
    p.add_argument("--no-ssc", action="store_true", help="corr: learned features only (no SSC input)")
    p.add_argument("--init-weights", default="",
                   help="start from this model's weights (synthmorph_l*.pt of the same design; fresh optimiser)")
    p.add_argument("--features", default=",".join(map(str, n.nb_features)), help="unet: features per level")
    p.add_argument("--sup-weight", type=float, default=d.sup_weight, help="weight of the supervised field term")
    p.add_argument("--sup-decay", type=int, default=d.sup_decay, help="iterations over which it decays (0: kept)")
    p.add_argument("--same-warmup", type=int, default=d.same_warmup,
                   help="curriculum: iterations over which same-contrast pairs fade out (0: none)")
    p.add_argument("--decay", type=int, default=d.decay,
                   help="anneal the learning rate to 0 (cosine) over the last DECAY iterations (0: constant)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (CPU only)")
    p.add_argument("--workers", type=int, default=d.workers, help="processes generating pairs (0: none)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-pairs", type=int, default=d.val_pairs)
    p.add_argument("--time-limit-min", type=float, default=0, help="checkpoint and stop after this many minutes")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<stem>.ckpt.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out=args.out, iterations=args.iterations, lam=args.lam, lr=args.lr, batch=args.batch, seed=args.seed,
        device=args.device, threads=args.threads, workers=args.workers, checkpoint_every=args.checkpoint_every,
        val_every=args.val_every, val_pairs=args.val_pairs, sup_weight=args.sup_weight, sup_decay=args.sup_decay,
        same_warmup=args.same_warmup, decay=args.decay, time_limit_min=args.time_limit_min, resume=args.resume,
        init_weights=args.init_weights,
        generator=GeneratorConfig(shape=args.shape, n_labels=args.labels, svf_std_max=args.svf_std,
                                  related_prob=args.related),
        net=NetConfig(design=args.design, radius=args.radius, width=args.width, ssc_input=not args.no_ssc,
                      nb_features=tuple(int(f) for f in args.features.split(","))),
    )


def run(args: argparse.Namespace) -> int:
    """Run a training from parsed options; prints the card's validation numbers."""
    card = train(config_from_args(args), progress_bar=not args.quiet)
    v = card["validation"]
    if v.get("dice_before") is not None:   # only rank 0 validates
        print(f"wrote {Path(args.out) / card['model']}: Dice {v['dice_before']:.3f} -> {v['dice_after']:.3f}, "
              f"boundary EPE {v['bepe_before']:.2f} -> {v['bepe_after']:.2f} voxels on {v['pairs']} held-out "
              f"synthetic pairs, {card['iterations']} iterations, {card['wall_time_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``brainshift train-synthmorph`` / ``python -m brainshift.deform.train``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
