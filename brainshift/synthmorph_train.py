"""Train brainshift's own SynthMorph (Hoffmann et al.): registration learnt from synthetic data only.

FreeSurfer's pretrained weights are not obtainable here, so this module follows SynthMorph's
recipe: random label maps (argmax of smooth noise) -> two random deformations of the map (fixed,
moving) -> two random images of arbitrary contrast from those maps (per-label intensities,
within-label noise, blur, bias field, gamma, resolution loss, noise, optional common field-of-view
mask) -> a U-Net predicts a stationary velocity field (SVF) that is integrated (scaling and
squaring) into a diffeomorphic displacement -> loss ``(1 - lam) * (1 - soft Dice)`` between the
fixed one-hot labels and the warped moving one-hot labels ``+ lam * mean |grad u|^2`` (SynthMorph's
form; ``lam`` is the regularisation, mri_synthmorph ``-r``, default 0.5).

Two optional training aids, off by default (pure SynthMorph), were used for the shipped CPU-trained
weights because a CPU budget of ~30 minutes allows only a few thousand iterations: a field
supervision term against the generator's known true field, decaying linearly to 0 over
``sup_warmup`` iterations, and a curriculum in which both images share one contrast with a
probability decaying from 1 over ``same_warmup`` iterations. The card records both.

Regularisation control: **one model per lambda value** (not HyperMorph conditioning). Each
trained model is ``synthmorph_l{lam:.2f}.pt`` with a JSON card beside it; :mod:`brainshift.deform`
picks the model whose lambda is nearest to the one asked for.

Conventions: tensors are ``(B, C, X, Y, Z)``; a displacement has channels ``(3)`` in voxel units of
the working grid, channel ``c`` along axis ``c``, and is a **pull** field on the fixed grid (the
moving voxel for fixed voxel ``p`` is ``p + u[p]``), the same convention as :mod:`brainshift.fields`.

Building blocks from voxelmorph 0.3.4 / neurite 0.3.4 (PyTorch): ``VxmPairwise`` (BasicUNet +
SVF integration), ``integrate_vec``, ``spatial_transform``, ``upsample_noise``,
``gaussian_smoothing``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

VAL_SEED_BASE = 10_000_000  # validation pairs use seeds VAL_SEED_BASE + i, never used in training


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class GeneratorConfig:
    """Parameters of the synthetic pair generator (lengths in voxels of the working grid)."""

    shape: int = 48                       # cubic working shape
    n_labels: int = 16                    # labels per map
    label_coarse: tuple[int, int] = (3, 6)    # coarse noise grid size range for label maps
    svf_coarse: int = 5                   # coarse grid size of the random SVFs
    svf_std_max: float = 3.0              # max std of the SVF (voxels at shape 48; scaled with shape)
    intensity_std_max: float = 0.08       # within-label noise std (intensity in [0, 1])
    blur_max: float = 1.0                 # Gaussian blur sigma max (voxels)
    bias_std_max: float = 0.3             # log-bias field std max
    gamma_std: float = 0.25               # log-gamma std
    noise_std_max: float = 0.05           # additive noise std max after normalisation
    speckle_prob: float = 0.3             # probability of multiplicative (speckle-like) noise
    res_prob: float = 0.3                 # probability of a resolution loss along one axis
    mask_prob: float = 0.5                # probability of a common field-of-view mask (both images)
    same_contrast_prob: float = 0.0       # probability that both images share one contrast (curriculum)


@dataclass
class NetConfig:
    """Network: voxelmorph ``VxmPairwise`` (neurite BasicUNet) with SVF integration."""

    nb_features: tuple[int, ...] = (16, 32, 32, 32)
    integration_steps: int = 5
    flow_init: float = 1e-2               # std of the final (velocity) conv's initial weights
    init: str = "kaiming"                 # U-Net convs: "kaiming" (He normal, leaky ReLU) or "torch" (default)


@dataclass
class TrainConfig:
    out: str = "model/synthmorph"
    iterations: int = 1000
    lam: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    checkpoint_every: int = 100
    val_every: int = 250
    val_pairs: int = 8
    sup_warmup: int = 0        # iterations over which an auxiliary field-supervision weight decays 1 -> 0
    sup_weight: float = 0.05   # its initial weight (x mean squared endpoint error, voxels^2)
    same_warmup: int = 0       # curriculum: same-contrast probability decays 1 -> generator's value over these iterations
    resume: bool = False
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    net: NetConfig = field(default_factory=NetConfig)


def model_stem(lam: float) -> str:
    """File stem of the model trained with regularisation ``lam``: ``synthmorph_l0.50``."""
    return f"synthmorph_l{lam:.2f}"


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------
def build_network(net: NetConfig | dict | None = None) -> torch.nn.Module:
    """The registration network: (moving, fixed) ``(B,1,X,Y,Z)`` each -> pull displacement ``(B,3,X,Y,Z)``.

    ``VxmPairwise`` concatenates (source=moving, target=fixed), predicts an SVF and integrates it
    (``integration_steps`` squarings); the displacement warps the moving image onto the fixed grid.
    Each spatial size must be divisible by ``2 ** (len(nb_features) - 1)``.
    """
    import voxelmorph as vxm

    if net is None:
        net = NetConfig()
    if isinstance(net, dict):
        net = NetConfig(nb_features=tuple(net["nb_features"]), integration_steps=int(net["integration_steps"]),
                        flow_init=float(net.get("flow_init", 1e-2)), init=str(net.get("init", "torch")))
    model = vxm.nn.models.VxmPairwise(
        ndim=3, source_channels=1, target_channels=1, nb_features=list(net.nb_features),
        integration_steps=net.integration_steps, activations="leaky_relu", flow_initializer=net.flow_init,
    )
    if net.init == "kaiming":
        # PyTorch's default conv init (uniform, a=sqrt(5)) shrinks the activations about 3x per layer,
        # so the deep U-Net levels start with gradients ~1e-7..1e-8 and hardly contribute. He-normal
        # init for leaky ReLU keeps them at unit scale (measured in docs/MEASUREMENTS.md, session 3).
        for module in model.model.modules():
            if isinstance(module, torch.nn.Conv3d):
                torch.nn.init.kaiming_normal_(module.weight, a=0.01, nonlinearity="leaky_relu")
                torch.nn.init.zeros_(module.bias)
    return model


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """``out[p] = image(p + disp[p])`` for ``(B,C,*)`` image and ``(B,3,*)`` voxel pull field; zeros outside."""
    import voxelmorph as vxm

    return vxm.nn.functional.spatial_transform(image, disp, method=mode)


def integrate(svf: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity ``(B,3,*)`` (voxels) into a displacement."""
    import voxelmorph as vxm

    return vxm.nn.functional.integrate_vec(svf, steps=steps)


# --------------------------------------------------------------------------------------------
# synthetic pairs
# --------------------------------------------------------------------------------------------
def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _smooth_noise(g: torch.Generator, shape: tuple[int, ...], coarse: int, device) -> torch.Tensor:
    """Smooth noise ``shape=(B,C,X,Y,Z)`` by linear upsampling of a ``coarse``^3 grid of N(0,1)."""
    import neurite.nn.functional as nef

    scale = [s / max(coarse, 2) for s in shape[2:]]
    return nef.upsample_noise(shape, scale, device=device, generator=g)


def _random_svf(g: torch.Generator, cfg: GeneratorConfig, batch: int, device) -> torch.Tensor:
    """A random smooth stationary velocity field ``(B,3,n,n,n)`` in voxels."""
    n = cfg.shape
    std = _u(g, 0.0, cfg.svf_std_max) * n / 48.0
    return _smooth_noise(g, (batch, 3, n, n, n), cfg.svf_coarse, device) * std


def _random_mask(g: torch.Generator, n: int, device) -> torch.Tensor:
    """A random smooth-edged field-of-view mask (ellipsoid cut by a plane), ``(1,1,n,n,n)`` in [0,1]."""
    ax = torch.linspace(-1, 1, n, device=device)
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    c = [_u(g, -0.3, 0.3) for _ in range(3)]
    r = [_u(g, 0.6, 1.1) for _ in range(3)]
    ell = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
    normal = torch.randn(3, generator=g).to(device)
    normal = normal / normal.norm()
    plane = normal[0] * x + normal[1] * y + normal[2] * z - _u(g, -0.2, 0.6)
    inside = torch.minimum(1 - ell, -plane)
    return torch.sigmoid(inside * 20)[None, None]


def _synth_image(g: torch.Generator, labels: torch.Tensor, cfg: GeneratorConfig) -> torch.Tensor:
    """A random-contrast image ``(B,1,*)`` in [0,1] from integer labels ``(B,1,*)``."""
    import neurite.nn.functional as nef

    device = labels.device
    b = labels.shape[0]
    n = cfg.shape
    means = torch.rand(b, cfg.n_labels, generator=g).to(device)
    stds = torch.rand(b, cfg.n_labels, generator=g).to(device) * cfg.intensity_std_max
    lab = labels[:, 0].long()
    flat = lab.reshape(b, -1)
    img = torch.gather(means, 1, flat).reshape(lab.shape)
    img = img + torch.gather(stds, 1, flat).reshape(lab.shape) * torch.randn(lab.shape, generator=g).to(device)
    img = img[:, None]
    sigma = _u(g, 0.0, cfg.blur_max)
    if sigma > 0.3:
        img = nef.gaussian_smoothing(img, sigma=sigma)
    if float(torch.rand((), generator=g)) < cfg.res_prob:   # thick slices along one axis
        axis = int(torch.randint(0, 3, (), generator=g))
        factor = _u(g, 1.5, 4.0)
        size = [n, n, n]
        size[axis] = max(int(n / factor), 4)
        img = F.interpolate(F.interpolate(img, size=size, mode="trilinear", align_corners=True),
                            size=(n, n, n), mode="trilinear", align_corners=True)
    bias = _smooth_noise(g, (b, 1, n, n, n), 4, device) * _u(g, 0.0, cfg.bias_std_max)
    img = img * torch.exp(bias)
    img = _minmax(img)
    img = img.clamp_min(0) ** math.exp(float(torch.randn((), generator=g)) * cfg.gamma_std)
    if float(torch.rand((), generator=g)) < cfg.speckle_prob:
        img = img * (1 + 0.3 * torch.randn(img.shape, generator=g).to(device)).clamp_min(0)
    img = img + torch.randn(img.shape, generator=g).to(device) * _u(g, 0.0, cfg.noise_std_max)
    return _minmax(img)


def _minmax(img: torch.Tensor) -> torch.Tensor:
    lo = img.flatten(1).min(1)[0].view(-1, 1, 1, 1, 1)
    hi = img.flatten(1).max(1)[0].view(-1, 1, 1, 1, 1)
    return (img - lo) / (hi - lo).clamp_min(1e-6)


def generate_pair(seed: int, cfg: GeneratorConfig | None = None, batch: int = 1,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One synthetic training pair, fully determined by ``seed`` (and ``cfg``).

    Returns ``moving``/``fixed`` images ``(B,1,n,n,n)`` in [0,1], ``moving_labels``/
    ``fixed_labels`` integer maps ``(B,1,n,n,n)`` (int64), and ``truth``, the true pull field
    ``(B,3,n,n,n)`` (voxels) from the fixed to the moving grid: both maps are the same smooth noise
    seen through ``phi_f`` and ``phi_m`` (exponentials of random SVFs), so
    ``truth = d_f + d_m_inv o phi_f`` with ``d_m_inv = exp(-v_m) - id``. Random numbers are drawn on
    the CPU (so a seed gives the same pair on every device) and moved to ``device``.
    """
    cfg = cfg or GeneratorConfig()
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    n = cfg.shape
    with torch.no_grad():
        coarse = int(torch.randint(cfg.label_coarse[0], cfg.label_coarse[1] + 1, (), generator=g))
        noise = _smooth_noise(g, (batch, cfg.n_labels, n, n, n), coarse, "cpu").to(device)
        out = {}
        svfs = {}
        for name in ("fixed", "moving"):
            svfs[name] = _random_svf(g, cfg, batch, "cpu").to(device)
            out[f"{name}_labels"] = warp(noise, integrate(svfs[name])).argmax(1, keepdim=True)
        d_f = integrate(svfs["fixed"])
        out["truth"] = d_f + warp(integrate(-svfs["moving"]), d_f)
        mask = None
        if float(torch.rand((), generator=g)) < cfg.mask_prob:
            mask = _random_mask(g, n, "cpu").to(device)
        same = float(torch.rand((), generator=g)) < cfg.same_contrast_prob
        contrast_seeds = torch.randint(0, 2 ** 62, (2,), generator=g).tolist()
        for name, cs in zip(("fixed", "moving"), contrast_seeds):
            gc = torch.Generator(device="cpu").manual_seed(contrast_seeds[0] if same else cs)
            img = _synth_image(gc, out[f"{name}_labels"].cpu(), cfg).to(device)
            out[name] = img * mask if mask is not None else img
    return out


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def soft_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor) -> torch.Tensor:
    """``1 - mean_label Dice`` between ``(B,L,*)`` probability maps."""
    dims = tuple(range(2, fixed_onehot.ndim))
    inter = (fixed_onehot * warped_onehot).sum(dims)
    denom = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return 1 - dice.mean()


def grad_penalty(disp: torch.Tensor) -> torch.Tensor:
    """SynthMorph's regulariser ``1/2 mean |grad u|^2`` (forward differences, voxel units)."""
    total = 0.0
    for d in range(2, disp.ndim):
        diff = disp.diff(dim=d)
        total = total + (diff ** 2).mean()
    return 0.5 * total


def onehot(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    return F.one_hot(labels[:, 0], n_labels).movedim(-1, 1).float()


def hard_dice(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, disp: torch.Tensor | None,
              n_labels: int) -> float:
    """Mean Dice over labels present in the fixed map after warping the moving labels (nearest)."""
    warped = moving_labels if disp is None else warp(moving_labels.float(), disp, mode="nearest").long()
    scores = []
    for lab in range(n_labels):
        a = fixed_labels == lab
        b = warped == lab
        s = int(a.sum()) + int(b.sum())
        if int(a.sum()) > 0:
            scores.append(2 * int((a & b).sum()) / s)
    return float(sum(scores) / max(len(scores), 1))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def validate(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean hard Dice on ``cfg.val_pairs`` held-out synthetic pairs: before (identity) and after."""
    model.eval()
    before, after, epe0, epe1 = [], [], [], []
    with torch.no_grad():
        for i in range(cfg.val_pairs):
            p = generate_pair(VAL_SEED_BASE + i, cfg.generator, 1, device)
            disp = model(p["moving"], p["fixed"]).float()
            before.append(hard_dice(p["fixed_labels"], p["moving_labels"], None, cfg.generator.n_labels))
            after.append(hard_dice(p["fixed_labels"], p["moving_labels"], disp, cfg.generator.n_labels))
            epe0.append(float(p["truth"].norm(dim=1).mean()))
            epe1.append(float((disp - p["truth"]).norm(dim=1).mean()))
    model.train()
    k = len(before)
    return {"dice_before": sum(before) / k, "dice_after": sum(after) / k,
            "epe_before": sum(epe0) / k, "epe_after": sum(epe1) / k}


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train one model; write checkpoint, weights, log CSV and JSON card under ``cfg.out``.

    Files (stem ``synthmorph_l{lam:.2f}``): ``<stem>.pt`` (weights + configs, for inference),
    ``<stem>.json`` (card), ``<stem>.log.csv`` (per-iteration losses; validation rows too),
    ``<stem>.ckpt.pt`` (weights + optimiser + iteration, for ``resume``). The pair for iteration
    ``i`` is ``generate_pair(cfg.seed * 1_000_003 + i)``, so a resumed run sees the same data.
    Returns the card (dict).
    """
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = model_stem(cfg.lam)
    ckpt_path, log_path = out / f"{stem}.ckpt.pt", out / f"{stem}.log.csv"
    device = torch.device(cfg.device)
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    n = cfg.generator.shape
    levels = len(cfg.net.nb_features) - 1
    if n % (2 ** levels):
        raise ValueError(f"shape {n} must be divisible by {2 ** levels} for nb_features {cfg.net.nb_features}")

    model = build_network(cfg.net).to(device)
    # eps far below Adam's default: the per-weight gradients of this loss (a mean over all voxels,
    # through a velocity layer with small initial weights) are ~1e-8..1e-11, and with eps = 1e-8
    # the U-Net would not move at all.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-12)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start, wall_before = 0, 0.0
    if cfg.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if use_amp and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start, wall_before = int(ck["iteration"]), float(ck.get("wall_s", 0.0))
    elif log_path.exists():
        log_path.unlink()
    new_log = not log_path.exists()
    log_f = open(log_path, "a", newline="")
    log = csv.writer(log_f)
    if new_log:
        log.writerow(["iteration", "loss", "dice_loss", "grad", "wall_s", "val_dice_before", "val_dice_after",
                      "val_epe_before", "val_epe_after"])

    def checkpoint(it: int, wall: float) -> None:
        _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "scaler": scaler.state_dict() if use_amp else None, "iteration": it, "wall_s": wall,
                      "config": _cfg_dict(cfg)}, ckpt_path)

    t0 = time.time()
    model.train()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, disable=not progress,
               desc=f"synthmorph lam={cfg.lam}", dynamic_ncols=True)
    val = {}
    for it in bar:
        gen = cfg.generator
        if it < cfg.same_warmup:   # curriculum (not in SynthMorph): start with same-contrast pairs
            frac = it / cfg.same_warmup
            gen = replace(gen, same_contrast_prob=(1 - frac) + frac * gen.same_contrast_prob)
        pair = generate_pair(cfg.seed * 1_000_003 + it, gen, cfg.batch, device)
        fixed_oh = onehot(pair["fixed_labels"], cfg.generator.n_labels)
        moving_oh = onehot(pair["moving_labels"], cfg.generator.n_labels)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            disp = model(pair["moving"], pair["fixed"])
        disp = disp.float()
        dice_l = soft_dice_loss(fixed_oh, warp(moving_oh, disp))
        reg = grad_penalty(disp)
        loss = (1 - cfg.lam) * dice_l + cfg.lam * reg
        if it < cfg.sup_warmup:   # optional warm-up (not in SynthMorph): supervise the field with the truth
            w_sup = cfg.sup_weight * (1 - it / cfg.sup_warmup)
            loss = loss + w_sup * ((disp - pair["truth"]) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        wall = wall_before + time.time() - t0
        row = [it + 1, f"{loss.item():.5f}", f"{dice_l.item():.5f}", f"{reg.item():.6f}", f"{wall:.1f}", "", "", "", ""]
        done = it + 1
        if cfg.val_every and (done % cfg.val_every == 0 or done == cfg.iterations):
            val = validate(model, cfg, device)
            row[5:] = [f"{val[k]:.4f}" for k in ("dice_before", "dice_after", "epe_before", "epe_after")]
        log.writerow(row)
        log_f.flush()
        bar.set_postfix(loss=f"{loss.item():.3f}", dice=f"{1 - dice_l.item():.3f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            checkpoint(done, wall)
    log_f.close()
    wall = wall_before + time.time() - t0
    if not val:
        val = validate(model, cfg, device)
    card = {
        "model": f"{stem}.pt", "architecture": "voxelmorph VxmPairwise (neurite BasicUNet), SVF integration",
        "shape": [n, n, n], "lambda": cfg.lam, "iterations": cfg.iterations, "device": str(device),
        "threads": cfg.threads if device.type == "cpu" else None, "wall_time_s": round(wall, 1),
        "validation": {"pairs": cfg.val_pairs, "seeds": f"{VAL_SEED_BASE}..{VAL_SEED_BASE + cfg.val_pairs - 1}",
                       **{k: round(v, 4) for k, v in val.items()},
                       "note": "hard Dice of nearest-warped labels; EPE = mean endpoint error vs the true field (working voxels)"},
        "loss": "(1-lam)*(1-softDice(onehot labels)) + lam*0.5*mean|grad u|^2"
                + (f"; + field supervision {cfg.sup_weight}*(1-it/{cfg.sup_warmup})*mean|u-truth|^2 for it < {cfg.sup_warmup}"
                   if cfg.sup_warmup else "")
                + (f"; curriculum: same-contrast probability 1 -> {cfg.generator.same_contrast_prob} over {cfg.same_warmup} it"
                   if cfg.same_warmup else ""),
        "optimizer": {"name": "AdamW", "eps": 1e-12, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch": cfg.batch},
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": _cfg_dict(cfg), "log": log_path.name,
        "torch": torch.__version__,
    }
    _save_atomic({"model": model.state_dict(), "net": asdict(cfg.net), "shape": n, "lambda": cfg.lam,
                  "card": card}, out / f"{stem}.pt")
    (out / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("resume", None)
    return d


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of ``brainshift train-synthmorph`` (the lead's CLI can pass its sub-parser here)."""
    p = parser or argparse.ArgumentParser(prog="brainshift train-synthmorph", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="model/synthmorph", help="output folder (weights, card, log, checkpoint)")
    p.add_argument("--shape", type=int, default=48, help="cubic working shape in voxels")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lambda", dest="lam", type=float, default=0.5, help="regularisation weight (mri_synthmorph -r)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--labels", type=int, default=16)
    p.add_argument("--features", default="16,32,32,32", help="U-Net features per level, comma separated")
    p.add_argument("--flow-init", type=float, default=1e-2, help="std of the velocity layer's initial weights")
    p.add_argument("--init", choices=("kaiming", "torch"), default="kaiming",
                   help="initialisation of the U-Net convolutions (default: He normal)")
    p.add_argument("--sup-warmup", type=int, default=0,
                   help="iterations of an auxiliary, linearly decaying field-supervision term (0: pure SynthMorph)")
    p.add_argument("--sup-weight", type=float, default=0.05, help="initial weight of the field-supervision term")
    p.add_argument("--same-warmup", type=int, default=0,
                   help="curriculum: iterations over which same-contrast pairs fade out (0: none, pure SynthMorph)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU only)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-pairs", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="continue from <out>/<stem>.ckpt.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(
        out=args.out, iterations=args.iterations, lam=args.lam, lr=args.lr, seed=args.seed, device=device,
        threads=args.threads, checkpoint_every=args.checkpoint_every, val_every=args.val_every,
        val_pairs=args.val_pairs, resume=args.resume, sup_warmup=args.sup_warmup, sup_weight=args.sup_weight, same_warmup=args.same_warmup,
        generator=GeneratorConfig(shape=args.shape, n_labels=args.labels),
        net=NetConfig(nb_features=tuple(int(f) for f in args.features.split(",")), flow_init=args.flow_init,
                      init=args.init),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``brainshift train-synthmorph``; prints the card's validation numbers."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a training from parsed options (for a CLI that built its sub-parser with :func:`build_parser`)."""
    card = train(config_from_args(args), progress=not args.quiet)
    v = card["validation"]
    print(f"wrote {Path(args.out) / card['model']}: Dice {v['dice_before']:.3f} -> {v['dice_after']:.3f} "
          f"on {v['pairs']} held-out synthetic pairs, {card['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
