"""The deformable stage's networks: (moving, fixed) images -> a stationary velocity field (SVF).

Two designs, chosen by ``NetConfig.design``:

* ``"corr"`` (default since session 9): handed correspondence, after PDD-Net (Heinrich 2019) and
  the optical-flow correlation networks. A shared encoder turns each image, together with its SSC
  descriptor (:mod:`brainshift.ssc`, contrast-invariant by construction), into unit-length feature
  vectors on a grid of half the working resolution. The correlation of the fixed features with the
  moving features shifted by every displacement ``d`` in ``[-radius, radius]^3`` (half-resolution
  voxels) is a cost volume with one channel per displacement. A small 3D CNN, whose channels are
  the displacements, regularises it (it learns which matches to trust and how neighbours agree);
  a softmax over the displacements and the expected displacement give a field, upsampled to the
  working grid. The network's job is to regularise evidence it is given, not to discover matching
  from scratch, which a U-Net on raw intensities did not do in thousands of CPU iterations.
* ``"unet"``: voxelmorph's ``VxmPairwise`` (neurite BasicUNet) as in SynthMorph, kept for
  comparison and for the models trained before session 9.

Conventions: tensors ``(B, C, X, Y, Z)``; images in [0, 1]; a velocity or displacement has
channels ``(3)`` in voxels of the working grid, channel ``c`` along axis ``c``, and is a **pull**
field on the fixed grid (the moving voxel for fixed voxel ``p`` is ``p + u[p]``). Both designs are
called as ``net(moving, fixed, return_field_type="velocity" | "displacement")``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssc import ssc_descriptor


@dataclass
class NetConfig:
    """Architecture of the registration network (see the module docstring)."""

    design: str = "corr"                  # "corr" (cost volume) or "unet" (VxmPairwise)
    # corr
    features: int = 16                    # encoder output channels (unit length per voxel)
    width: int = 32                       # encoder and regulariser width
    radius: int = 3                       # search radius, half-resolution voxels ((2r+1)^3 displacements)
    ssc_input: bool = True                # feed each image's SSC descriptor to the encoder
    # unet
    nb_features: tuple[int, ...] = (16, 32, 32, 32)
    flow_init: float = 1e-2               # std of the final (velocity) conv's initial weights
    init: str = "kaiming"                 # U-Net convs: "kaiming" (He normal, leaky ReLU) or "torch" (default)
    # both
    integration_steps: int = 5

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        """From a saved ``asdict``; models saved before ``design`` existed are ``"unet"`` with torch init."""
        d = dict(d)
        d.setdefault("design", "unet")
        d.setdefault("init", "torch")
        if "nb_features" in d:
            d["nb_features"] = tuple(d["nb_features"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def divisor(self) -> int:
        """Every working-grid side must be a multiple of this."""
        return 2 if self.design == "corr" else 2 ** (len(self.nb_features) - 1)


def integrate(svf: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity ``(B,3,*)`` (voxels) into a displacement."""
    import voxelmorph as vxm

    return vxm.nn.functional.integrate_vec(svf, steps=steps)


def correlation(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Cost volume ``(B, (2r+1)^3, X, Y, Z)``: ``<f_fixed[p], f_moving[p + d]>`` for every shift ``d``.

    Channel order: ``d = (dx, dy, dz)`` with ``dz`` fastest, as :func:`displacements`. Shifts that
    leave the volume see zeros (correlation 0).
    """
    r = radius
    x, y, z = feat_fixed.shape[2:]
    pad = F.pad(feat_moving, (r,) * 6)
    out = []
    for dx in range(-r, r + 1):
        for dy in range(-r, r + 1):
            for dz in range(-r, r + 1):
                shifted = pad[:, :, r + dx:r + dx + x, r + dy:r + dy + y, r + dz:r + dz + z]
                out.append((feat_fixed * shifted).sum(1))
    return torch.stack(out, 1)


def displacements(radius: int, device=None) -> torch.Tensor:
    """The ``((2r+1)^3, 3)`` integer shifts of :func:`correlation`, in its channel order."""
    ax = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)


def _conv(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, padding=1)


class CorrNet(nn.Module):
    """Cost-volume registration network (design ``"corr"``; see the module docstring)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        w, cin = cfg.width, 1 + (12 if cfg.ssc_input else 0)
        act = nn.LeakyReLU(0.2)
        # plain 3x3 convolutions only: on CPU, strided and dilated 3D convolutions fall back to
        # PyTorch's slow kernels (3-5x the time of the oneDNN ones); pooling does the downsampling
        self.encoder = nn.Sequential(nn.AvgPool3d(2), _conv(cin, w), nn.InstanceNorm3d(w), act,
                                     _conv(w, w), act, _conv(w, w), act, nn.Conv3d(w, cfg.features, 1))
        n_disp = (2 * cfg.radius + 1) ** 3
        # 1x1 convolutions mix the displacement channels, 3x3 ones let neighbours agree (7^3
        # half-resolution voxels): 1.3 GFLOP per 24^3 pair, not 20 with 3x3 convolutions on all channels
        self.regulariser = nn.Sequential(nn.Conv3d(n_disp, w, 1), act, _conv(w, w), act, _conv(w, w), act,
                                         _conv(w, w), act, nn.Conv3d(w, n_disp, 1))
        nn.init.zeros_(self.regulariser[-1].weight)   # at the start the softmax sees the raw correlation
        nn.init.zeros_(self.regulariser[-1].bias)
        self.log_beta = nn.Parameter(torch.tensor(3.0))   # inverse temperature of the smoothed correlation (e^3 = 20)
        self.register_buffer("disps", displacements(cfg.radius), persistent=False)

    def _encode(self, img: torch.Tensor) -> torch.Tensor:
        x = img
        if self.cfg.ssc_input:
            with torch.no_grad():
                ssc = torch.stack([ssc_descriptor(v[0].float(), radius=1, dilation=1) for v in img])
            x = torch.cat([img, ssc.to(img.dtype)], 1)
        return F.normalize(self.encoder(x), dim=1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, return_field_type: str = "displacement") -> torch.Tensor:
        cost = correlation(self._encode(fixed), self._encode(moving), self.cfg.radius)
        # a fixed prior first: the cost averaged over 5^3 neighbours (the true field is smooth), then
        # the learned correction; at the start the network is a smoothed soft-argmin of the evidence
        smooth = F.avg_pool3d(cost, 5, stride=1, padding=2, count_include_pad=False)
        logits = self.log_beta.exp() * smooth + self.regulariser(cost)
        prob = torch.softmax(logits.float(), 1)
        coarse = torch.einsum("bdxyz,dc->bcxyz", prob, self.disps)        # half-resolution voxels
        svf = 2.0 * F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)
        if return_field_type == "velocity":
            return svf
        return integrate(svf, self.cfg.integration_steps)


def build_network(net: NetConfig | dict | None = None) -> nn.Module:
    """The registration network for ``net`` (a :class:`NetConfig` or its saved dict)."""
    if net is None:
        net = NetConfig()
    if isinstance(net, dict):
        net = NetConfig.from_dict(net)
    if net.design == "corr":
        return CorrNet(net)
    if net.design != "unet":
        raise ValueError(f"unknown network design {net.design!r} (corr or unet)")
    import voxelmorph as vxm

    model = vxm.nn.models.VxmPairwise(
        ndim=3, source_channels=1, target_channels=1, nb_features=list(net.nb_features),
        integration_steps=net.integration_steps, activations="leaky_relu", flow_initializer=net.flow_init,
    )
    if net.init == "kaiming":
        # PyTorch's default conv init shrinks the activations about 3x per layer, so the deep U-Net
        # levels start with gradients ~1e-7..1e-8 (docs/MEASUREMENTS.md, session 3).
        for module in model.model.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, a=0.01, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
    return model
