"""Unpaired 3D CycleGAN training, iUS <-> T1 (the paper's style transfer).

Domains: A = iUS, B = T1. Either the iUS (``_0000``) and T1 (``_0001``) of every T1 case of a
simulated ReMIND2Reg-layout folder (``--data``), or real images (``--real-ius``, ``--real-t1``): real
iUS volumes and real/template T1 cut to iUS fields of view, at a 1 mm working grid
(:mod:`brainshift.style.real`); the working spacing is stored in the model for inference.
The CycleGAN terms are unpaired: each iteration draws the iUS patch and the T1 patch from
independently chosen cases and centres (:class:`brainshift.style.data.PatchSampler`). Optionally
(``--paired DIR``, ``lam_sup > 0``) simulated pairs with known truth add a supervised term: the T1
pulled onto the iUS grid with the true field is the target of ``G`` at the same place
(:func:`brainshift.style.data.load_paired_cases`); their iUS and T1 also join the two domains, unless
``--paired-supervised-only`` (then the discriminators see real images alone).

Loss of the generators (``G``: US->T1, ``F``: T1->US; discriminators ``D_T1``, ``D_US``)::

    L = lam_gan * (LSGAN(D_T1(G(a))) + LSGAN(D_US(F(b))))
      + lam_cyc * (|F(G(a)) - a|_1 + |G(F(b)) - b|_1)
      + lam_idt * (|G(b) - b|_1 + |F(a) - a|_1)
      + lam_cor * (L_cor(a, G(a)) + L_cor(b, F(b)))         L_cor = 1 - mean(local NCC^2)
      + lam_sup * (|G(p) - t|_1 + 1 - mean(local NCC(G(p), t)))  p, t: an aligned simulated pair
      + lam_ssc * SSC-MSE(G(p), t)          the pipeline's structural measure (sharp, right edges)

all restricted to the iUS field of view (outputs are set to -1 outside it). Optimiser AdamW
(betas 0.5, 0.999), learning rate constant for the first half of the epochs and decayed linearly
to 0 over the second half (CycleGAN schedule).

An **epoch** is ``patches_per_volume`` iterations per training volume, i.e.
``ceil(n_volumes * patches_per_volume / batch)`` optimiser steps of ``batch`` patch pairs.

Files in ``out``: ``checkpoint.pt`` (everything, every epoch; ``resume=True`` continues from it),
``us2t1.pt`` (the US->T1 generator for :func:`brainshift.style.infer.load_style_model`),
``loss_log.csv`` (one row per epoch), ``val_epochNNNN.png`` (iUS / synthetic T1 / T1 slices),
``train_card.json`` (configuration, timings, final losses).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..training import CsvLog, Dist, progress as progress_bar, rng_state, save_atomic, set_rng_state
from .data import PatchSampler, StyleCase, load_cases, load_paired_cases
from .evaluate import ncc
from .infer import StyleModel, save_generator, synthesize_t1
from .losses import correlation_loss, local_ncc, lsgan_loss, masked_l1, ssc_loss
from .networks import D_NORMS, UPSAMPLE, PatchGAN3D, UNet3D, count_parameters, init_weights, load_matching, max_depth

LOSS_KEYS = ("g_gan", "cycle", "identity", "corr", "sup", "ssc", "g_total", "d_t1", "d_us")


@dataclass
class StyleTrainConfig:
    """Options of ``brainshift train-style`` (lengths in voxels)."""

    data: str = ""                  # simulated pairs (ReMIND2Reg layout), or:
    real_ius: str = ""              # a folder of real iUS volumes (iUS domain) ...
    real_t1: tuple[str, ...] = ()   # ... and whole-head T1 files cut to iUS fields of view (T1 domain)
    paired: tuple[str, ...] = ()    # simulated folders with truth/: aligned pairs for the supervised term
    hold_out: tuple[str, ...] = ("4", "16", "27")   # real iUS case numbers kept out of training
    t1_crops: int = 24              # FOV-shaped crops per real T1 file
    mni_crops: int = 8              # FOV-shaped crops of the packaged MNI template
    spacing: float = 1.0            # working spacing (mm) of the real volumes; stored in their model
    out: str = "model/style"
    epochs: int = 400               # paper: 400
    lr: float = 2e-4                # CycleGAN's default (the paper names AdamW, not the rate)
    weight_decay: float = 1e-2      # AdamW default
    d_norm: str = "instance"        # discriminator normalisation: "instance" (pix2pix) or "none"
    d_lr_factor: float = 1.0        # discriminators' rate = lr x this (two time-scale update rule: > 1)
    d_highpass: bool = False        # the discriminators also see the image's Laplacian (how sharp it is)
    patch: int = 64
    batch: int = 1
    base_width: int = 8
    depth: int = 0                  # U-Net levels; 0 = min(7, deepest the patch allows) (paper: 7)
    upsample: str = "transpose"     # U-Net up-sampling: "transpose" (pix2pix) or "resize" (no checkerboard)
    patches_per_volume: int = 4     # defines an epoch
    lam_gan: float = 1.0            # adversarial terms (CycleGAN: 1)
    lam_cyc: float = 10.0
    lam_idt: float = 5.0
    lam_cor: float = 1.0
    lam_sup: float = 0.0            # supervised term on the paired cases (0: none)
    lam_ssc: float = 0.0            # SSC-MSE term on the paired cases (0: none)
    paired_supervised_only: bool = False   # paired cases feed the supervised terms only, not the two domains
    init_generator: str = ""        # start the US->T1 generator from these weights (a us2t1.pt)
    cor_window: int = 9
    val_every: int = 5              # epochs between validation PNGs (also after the last epoch)
    max_steps: int = 0              # stop after this many optimiser steps in total (0 = no limit)
    time_limit_min: float = 0.0     # stop at the end of the epoch that passes this (0 = no limit)
    device: str = ""                # '' = cuda when present, else cpu
    amp: bool = True                # bfloat16 autocast on CUDA (ignored on CPU)
    seed: int = 0
    threads: int = 0                # torch CPU threads (0 = leave torch's default)
    resume: bool = False


def _lr_factor(epoch: int, epochs: int) -> float:
    """Constant for the first half, then linear decay to 0 at the end (``epoch`` 0-based)."""
    half = epochs // 2
    return 1.0 if epoch < half else max(0.0, 1.0 - (epoch - half + 1) / (epochs - half + 1))


def _validation_png(path: Path, case: StyleCase, synth: np.ndarray, title: str) -> None:
    """Mid slice of the iUS, its synthetic T1 and (simulated pairs) the case's own T1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(np.median(case.fov_index[:, 2]))
    panels = [((case.us + 1) / 2 * case.fov, "iUS"), (synth, "synthetic T1")]
    if case.t1 is not None:
        panels.append(((case.t1 + 1) / 2, "T1 (not aligned)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6))
    for ax, (img, name) in zip(axes, panels):
        ax.imshow(img[:, :, k].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_style(cfg: StyleTrainConfig, cases: list[StyleCase] | None = None, progress: bool = True) -> dict:
    """Train (or resume) the CycleGAN; returns the training card (also written to ``out``).

    ``cases`` overrides ``cfg.data`` (tests pass small in-memory volumes).
    """
    dist = Dist.from_env(cfg.device)   # one process, or one rank of torchrun (gradients averaged)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if cfg.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
        for key in ("patch", "base_width", "depth"):  # the architecture comes from the checkpoint
            setattr(cfg, key, saved[key])
        cfg.upsample = saved.get("upsample", "transpose")   # runs before session 20 had transposed convolutions
        cfg.d_norm = saved.get("d_norm", "instance")        # and before session 21, instance-normalised critics
        cfg.d_highpass = saved.get("d_highpass", False)     # before session 22, no high-pass channel
    if cfg.depth <= 0:
        cfg.depth = min(7, max_depth(cfg.patch))
    if cfg.patch % (2 ** cfg.depth):
        raise ValueError(f"patch {cfg.patch} is not divisible by 2**depth = {2 ** cfg.depth}")
    dev = dist.device
    use_amp = cfg.amp and dev.type == "cuda"
    torch.manual_seed(cfg.seed)

    held_out: list[str] = []
    if cases is None and cfg.real_ius:
        from .real import real_cases
        cases, held_out = real_cases(cfg.real_ius, list(cfg.real_t1), list(cfg.hold_out), cfg.t1_crops,
                                     cfg.mni_crops, cfg.spacing, cfg.seed, cache_dir=out)
    elif cases is None and cfg.data:
        cases = load_cases(cfg.data)
    if cases is None:
        cases = []
    for folder in cfg.paired:   # resampled to the real data's working spacing when there is real data
        cases = cases + load_paired_cases(folder, cfg.spacing if cfg.real_ius else None)
    g_ab = init_weights(UNet3D(cfg.base_width, cfg.depth, upsample=cfg.upsample)).to(dev)   # US -> T1
    g_ba = init_weights(UNet3D(cfg.base_width, cfg.depth, upsample=cfg.upsample)).to(dev)   # T1 -> US
    d_layers = 3 if cfg.patch >= 32 else 2  # small (test) patches: one layer less, output > 1 voxel
    d_t1 = init_weights(PatchGAN3D(cfg.base_width, d_layers, norm=cfg.d_norm, highpass=cfg.d_highpass)).to(dev)
    d_us = init_weights(PatchGAN3D(cfg.base_width, d_layers, norm=cfg.d_norm, highpass=cfg.d_highpass)).to(dev)
    if cfg.init_generator and ckpt is None:
        from .infer import load_style_model
        start = load_style_model(cfg.init_generator, "cpu").net
        if start.upsample == cfg.upsample:
            g_ab.load_state_dict(start.state_dict())
        else:   # another decoder: take the encoder (and whatever else has the same name and shape)
            n = load_matching(g_ab, start.state_dict())
            if dist.main:
                print(f"--init-generator: {n} of {len(g_ab.state_dict())} tensors copied (upsample "
                      f"{start.upsample} -> {cfg.upsample}: the decoder starts fresh)")
    opt_g = torch.optim.AdamW(list(g_ab.parameters()) + list(g_ba.parameters()), lr=cfg.lr,
                              betas=(0.5, 0.999), weight_decay=cfg.weight_decay)
    d_lr = cfg.lr * cfg.d_lr_factor   # the discriminators' base rate (the schedule scales both alike)
    opt_d = torch.optim.AdamW(list(d_t1.parameters()) + list(d_us.parameters()), lr=d_lr,
                              betas=(0.5, 0.999), weight_decay=cfg.weight_decay)
    sampler = PatchSampler(cases, cfg.patch, seed=cfg.seed + 1000 * dist.rank,   # each rank its own patches
                           paired_in_domains=not cfg.paired_supervised_only)
    epoch, step, wall_before = 0, 0, 0.0
    if ckpt is not None:
        for net, key in ((g_ab, "g_us2t1"), (g_ba, "g_t12us"), (d_t1, "d_t1"), (d_us, "d_us")):
            net.load_state_dict(ckpt[key])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        epoch, step, wall_before = ckpt["epoch"], ckpt["step"], ckpt.get("wall_s", 0.0)
        sampler.rng.bit_generator.state = ckpt["sampler_rng"]
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        else:   # checkpoints written before brainshift.training
            torch.set_rng_state(ckpt["torch_rng"])

    steps_per_epoch = math.ceil(len(cases) * cfg.patches_per_volume / cfg.batch)
    log_path = out / "loss_log.csv"
    log = CsvLog(log_path, ["epoch", "step", "lr", "wall_s", *LOSS_KEYS, "val_ncc_synth_t1", "val_ncc_us_t1"],
                 restart=not (cfg.resume and log_path.is_file()), enabled=dist.main, keep_until=epoch)
    if held_out:   # real data: look at a held-out iUS (there is no aligned T1 to score against)
        from .data import make_case
        from .real import load_ius
        img, fov = load_ius(Path(cfg.real_ius) / held_out[0], cfg.spacing)
        val_case = make_case(held_out[0], img, None, fov)
    else:
        val_case = next(c for c in cases if c.us is not None)
    t_start = time.time()
    last: dict[str, float] = {}
    val_ncc = (float("nan"), float("nan"))  # NCC inside the FOV vs the case's own (unaligned) T1

    def where_fov(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.where(m > 0, x, torch.full_like(x, -1.0))

    while epoch < cfg.epochs and not (cfg.max_steps and step >= cfg.max_steps):
        factor = _lr_factor(epoch, cfg.epochs)
        for opt, base in ((opt_g, cfg.lr), (opt_d, d_lr)):
            for group in opt.param_groups:
                group["lr"] = base * factor
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        n_steps = 0
        bar = progress_bar(range(steps_per_epoch), progress and dist.main, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           leave=False)
        for _ in bar:
            if cfg.max_steps and step >= cfg.max_steps:
                break
            a, ma, b, mb = (torch.from_numpy(x).to(dev) for x in sampler.sample(cfg.batch))
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                fake_b = where_fov(g_ab(a), ma)
                fake_a = where_fov(g_ba(b), mb)
                rec_a = where_fov(g_ba(fake_b), ma)
                rec_b = where_fov(g_ab(fake_a), mb)
                for d in (d_t1, d_us):
                    d.requires_grad_(False)
                g_gan = lsgan_loss(d_t1(fake_b), True) + lsgan_loss(d_us(fake_a), True)
            cycle = masked_l1(rec_a, a, ma) + masked_l1(rec_b, b, mb)
            identity = torch.zeros((), device=dev)
            if cfg.lam_idt > 0:   # two more generator passes: only when the term counts
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    idt_b = where_fov(g_ab(b), mb)
                    idt_a = where_fov(g_ba(a), ma)
                identity = masked_l1(idt_b, b, mb) + masked_l1(idt_a, a, ma)
            corr = correlation_loss(a, fake_b, ma, cfg.cor_window) + correlation_loss(b, fake_a, mb, cfg.cor_window)
            sup = torch.zeros((), device=dev)
            ssc = torch.zeros((), device=dev)
            if (cfg.lam_sup > 0 or cfg.lam_ssc > 0) and sampler.paired:
                p, t, mp = (torch.from_numpy(x).to(dev) for x in sampler.sample_paired(cfg.batch))
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    pred = where_fov(g_ab(p), mp)
                sup = masked_l1(pred, t, mp) + 1.0 - (local_ncc(pred, t, cfg.cor_window) * mp).sum() / mp.sum().clamp_min(1.0)
                if cfg.lam_ssc > 0:
                    ssc = ssc_loss(pred, t, mp)
            g_total = (cfg.lam_gan * g_gan + cfg.lam_cyc * cycle + cfg.lam_idt * identity + cfg.lam_cor * corr
                       + cfg.lam_sup * sup + cfg.lam_ssc * ssc)
            opt_g.zero_grad(set_to_none=True)
            g_total.backward()
            dist.average_gradients(list(g_ab.parameters()) + list(g_ba.parameters()))
            opt_g.step()

            for d in (d_t1, d_us):
                d.requires_grad_(True)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                d_t1_loss = 0.5 * (lsgan_loss(d_t1(b), True) + lsgan_loss(d_t1(fake_b.detach()), False))
                d_us_loss = 0.5 * (lsgan_loss(d_us(a), True) + lsgan_loss(d_us(fake_a.detach()), False))
            opt_d.zero_grad(set_to_none=True)
            (d_t1_loss + d_us_loss).backward()
            dist.average_gradients(list(d_t1.parameters()) + list(d_us.parameters()))
            opt_d.step()

            values = dict(g_gan=g_gan, cycle=cycle, identity=identity, corr=corr, sup=sup, ssc=ssc, g_total=g_total,
                          d_t1=d_t1_loss, d_us=d_us_loss)
            for key, v in values.items():
                sums[key] += float(v.detach())
            n_steps += 1
            step += 1
            bar.set_postfix(g=f"{g_total.item():.3f}", cyc=f"{cycle.item():.3f}", cor=f"{corr.item():.3f}",
                            d=f"{(d_t1_loss + d_us_loss).item():.3f}")
        bar.close()
        epoch += 1
        last = {k: v / max(n_steps, 1) for k, v in sums.items()}
        wall = wall_before + time.time() - t_start
        # ranks must agree on when to stop: the decision is the mean of their clocks' verdicts
        out_of_time = bool(cfg.time_limit_min) and dist.mean(
            torch.tensor(float(time.time() - t_start > 60 * cfg.time_limit_min))) > 0
        final = epoch >= cfg.epochs or out_of_time or (cfg.max_steps and step >= cfg.max_steps)
        val_ncc = (float("nan"), float("nan"))  # logged on validation epochs only
        if dist.main and (epoch % cfg.val_every == 0 or final):
            g_ab.eval()
            model = StyleModel(g_ab, cfg.patch)
            synth = synthesize_t1((val_case.us + 1) / 2 * val_case.fov, model, dev)
            g_ab.train()
            if val_case.t1 is not None:
                t1 = (val_case.t1 + 1) / 2
                val_ncc = (ncc(synth, t1, val_case.fov), ncc((val_case.us + 1) / 2, t1, val_case.fov))
            _validation_png(out / f"val_epoch{epoch:04d}.png", val_case, synth,
                            f"case {val_case.name}, epoch {epoch}, step {step}")
        log.row([epoch, step, f"{cfg.lr * factor:.3g}", f"{wall:.1f}", *(f"{last[k]:.5f}" for k in LOSS_KEYS),
                 f"{val_ncc[0]:.4f}", f"{val_ncc[1]:.4f}"])
        card = {
            "model": "3D CycleGAN generator iUS -> T1 (U-Net, pix2pix-style, instance norm, tanh)",
            "config": asdict(cfg), "epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch,
            "epoch_definition": f"{cfg.patches_per_volume} random patches per training volume",
            "n_training_volumes": len(cases), "device": str(dev), "amp": use_amp, "processes": dist.world,
            "torch_threads": torch.get_num_threads(), "wall_s": round(wall, 1),
            "generator_parameters": count_parameters(g_ab), "final_epoch_losses": last,
            "val_ncc_synth_vs_t1_unaligned": val_ncc[0], "val_ncc_us_vs_t1_unaligned": val_ncc[1],
        }
        if dist.main:
            save_atomic({"config": asdict(cfg), "epoch": epoch, "step": step, "wall_s": wall,
                         "g_us2t1": g_ab.state_dict(), "g_t12us": g_ba.state_dict(),
                         "d_t1": d_t1.state_dict(), "d_us": d_us.state_dict(),
                         "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                         "sampler_rng": sampler.rng.bit_generator.state, "rng": rng_state(),
                         "losses": last}, ckpt_path)
            save_generator(out / "us2t1.pt", g_ab, cfg.patch, meta={"spacing_mm": cfg.spacing if cfg.real_ius else None, "held_out": held_out,
                                                                       **{k: card[k] for k in ("epoch", "step", "wall_s")}})
            (out / "train_card.json").write_text(json.dumps(card, indent=2))
        if out_of_time:
            break
    dist.close()
    if not dist.main:
        return card if epoch else {}
    return json.loads((out / "train_card.json").read_text()) if (out / "train_card.json").is_file() else {}


# --------------------------------------------------------------------------------------------
# command line (``python -m brainshift.style.train``; the ``brainshift train-style`` sub-command
# can reuse build_parser / config_from_args)
# --------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of ``train-style``; pass an existing (sub)parser to add them to it."""
    d = StyleTrainConfig()
    p = parser or argparse.ArgumentParser(prog="brainshift train-style", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="simulated pairs: a ReMIND2Reg-layout folder (iUS _0000 + T1 _0001 per case)")
    src.add_argument("--real-ius", help="real data: a folder of real iUS volumes (e.g. ../shared/data/real_ius)")
    p.add_argument("--real-t1", nargs="*", default=[], help="with --real-ius: whole-head T1 files cut to iUS "
                   "fields of view for the T1 domain (e.g. ../shared/data/real_mr/ReMIND022_ceT1.nii.gz)")
    p.add_argument("--paired", nargs="*", default=[], help="simulated folders with truth/ (brainshift simulate): "
                   "aligned iUS/T1 pairs for the supervised term (--lam-sup) and both domains")
    p.add_argument("--hold-out", default=",".join(d.hold_out), help="real iUS case numbers kept out of training")
    p.add_argument("--t1-crops", type=int, default=d.t1_crops, help="FOV-shaped crops per --real-t1 file")
    p.add_argument("--mni-crops", type=int, default=d.mni_crops, help="FOV-shaped crops of the MNI template")
    p.add_argument("--spacing", type=float, default=d.spacing, help="working spacing of real volumes (mm)")
    p.add_argument("--out", default=d.out, help="output folder (checkpoint, us2t1.pt, loss log, PNGs)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (paper: 400)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--d-norm", choices=D_NORMS, default=d.d_norm, help="discriminator normalisation: instance "
                   "(pix2pix; divides out how sharp a patch is) or none")
    p.add_argument("--d-highpass", action="store_true", help="the discriminators also see each patch's Laplacian "
                   "(a critic given only the image stays near chance on smooth outputs)")
    p.add_argument("--d-lr-factor", type=float, default=d.d_lr_factor,
                   help="the discriminators' learning rate is --lr times this (two time-scale update: > 1)")
    p.add_argument("--patch", type=int, default=d.patch, help="cubic patch side in voxels")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--base-width", type=int, default=d.base_width, help="channels of the first U-Net level")
    p.add_argument("--depth", type=int, default=d.depth, help="U-Net levels (0: min(7, what the patch allows))")
    p.add_argument("--upsample", choices=UPSAMPLE, default=d.upsample, help="U-Net up-sampling: transposed "
                   "convolutions (pix2pix) or trilinear resizing + 3^3 convolution (no checkerboard)")
    p.add_argument("--patches-per-volume", type=int, default=d.patches_per_volume, help="defines an epoch")
    p.add_argument("--lam-gan", type=float, default=d.lam_gan, help="weight of the adversarial terms")
    p.add_argument("--lam-cyc", type=float, default=d.lam_cyc)
    p.add_argument("--lam-idt", type=float, default=d.lam_idt)
    p.add_argument("--lam-cor", type=float, default=d.lam_cor)
    p.add_argument("--lam-sup", type=float, default=d.lam_sup, help="weight of the supervised term on --paired")
    p.add_argument("--lam-ssc", type=float, default=d.lam_ssc, help="weight of the SSC-MSE term on --paired")
    p.add_argument("--paired-supervised-only", action="store_true", help="the --paired cases feed the supervised "
                   "and SSC terms only; the unpaired domains (and so the discriminators) see real images alone")
    p.add_argument("--init-generator", default="", help="start the US->T1 generator from this us2t1.pt")
    p.add_argument("--val-every", type=int, default=d.val_every, help="epochs between validation PNGs")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps (0: no limit)")
    p.add_argument("--time-limit-min", type=float, default=d.time_limit_min, help="stop after this many minutes")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p


def config_from_args(args: argparse.Namespace) -> StyleTrainConfig:
    return StyleTrainConfig(
        data=args.data or "", real_ius=args.real_ius or "", real_t1=tuple(args.real_t1), paired=tuple(args.paired),
        hold_out=tuple(x for x in args.hold_out.split(",") if x), t1_crops=args.t1_crops, mni_crops=args.mni_crops,
        spacing=args.spacing, out=args.out, epochs=args.epochs, lr=args.lr, d_lr_factor=args.d_lr_factor,
        d_norm=args.d_norm, d_highpass=args.d_highpass, patch=args.patch, batch=args.batch,
        base_width=args.base_width, depth=args.depth, upsample=args.upsample, patches_per_volume=args.patches_per_volume,
        lam_gan=args.lam_gan, lam_cyc=args.lam_cyc, lam_idt=args.lam_idt, lam_cor=args.lam_cor, lam_sup=args.lam_sup,
        lam_ssc=args.lam_ssc, paired_supervised_only=args.paired_supervised_only,
        init_generator=args.init_generator, val_every=args.val_every,
        max_steps=args.max_steps, time_limit_min=args.time_limit_min, device=args.device, amp=not args.no_amp,
        threads=args.threads, seed=args.seed, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    card = train_style(config_from_args(build_parser().parse_args(argv)))
    print(json.dumps({k: card[k] for k in ("epoch", "step", "wall_s", "final_epoch_losses")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
