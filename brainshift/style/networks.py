"""3D CycleGAN networks: a U-Net generator and a PatchGAN discriminator.

Tensors are ``(B, C, X, Y, Z)``; intensities are normalised to ``[-1, 1]`` (see
:mod:`brainshift.style.data`), ``-1`` being "no signal / outside the iUS field of view".

The generator follows the CycleGAN/pix2pix U-Net (Isola et al.) in 3D: ``depth`` down-sampling
steps (4^3 convolution, stride 2), each halving the size, then as many up-sampling steps with skip
connections: transposed convolutions (4^3, stride 2; pix2pix, ``upsample="transpose"``), or
trilinear x2 resizing followed by a 3^3 convolution (``upsample="resize"``), which cannot make the
period-2 checkerboard that a transposed convolution leaves when its 8 output phases learn unequal
gains (Odena et al. 2016, "Deconvolution and checkerboard artifacts"). The paper uses 7 levels,
which reduces a 128^3 patch to 1^3; the input side must be divisible by ``2**depth`` (a 64^3 patch
allows at most 6 levels, 32^3 at most 5). ``base`` is the width of the first level; level ``l`` has
``base * 2**l`` channels capped at ``base * 8``, as in pix2pix.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def max_depth(patch: int) -> int:
    """Deepest U-Net that a cubic patch of side ``patch`` allows (sizes halve down to 1)."""
    d = 0
    while patch % 2 == 0 and patch > 1:
        patch //= 2
        d += 1
    return d


UPSAMPLE = ("transpose", "resize")


def load_matching(net: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy the tensors of ``state`` whose name and shape match ``net``'s (e.g. the encoder of a
    generator with the other ``upsample``); the rest keep their values. Returns how many matched."""
    own = net.state_dict()
    hits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(hits)
    net.load_state_dict(own)
    return len(hits)


class UNet3D(nn.Module):
    """U-Net generator, 1 channel in, 1 channel out (tanh, range ``[-1, 1]``)."""

    def __init__(self, base: int = 8, depth: int = 7, in_ch: int = 1, out_ch: int = 1, dropout: float = 0.0,
                 upsample: str = "transpose"):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be at least 1")
        if upsample not in UPSAMPLE:
            raise ValueError(f"upsample must be one of {UPSAMPLE}, not {upsample!r}")
        self.base, self.depth, self.upsample = base, depth, upsample
        widths = [base * min(2 ** level, 8) for level in range(depth)]
        self.down = nn.ModuleList()
        prev = in_ch
        for level, w in enumerate(widths):
            layers: list[nn.Module] = []
            if level > 0:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
            layers.append(nn.Conv3d(prev, w, 4, stride=2, padding=1, bias=level in (0, depth - 1)))
            if 0 < level < depth - 1:  # no norm on the first level (as pix2pix) nor on the 1^3 bottleneck
                layers.append(nn.InstanceNorm3d(w, affine=True))
            self.down.append(nn.Sequential(*layers))
            prev = w
        self.up = nn.ModuleList()
        for level in reversed(range(depth)):
            w_in = widths[level] if level == depth - 1 else 2 * widths[level]
            w_out = out_ch if level == 0 else widths[level - 1]
            layers = [nn.ReLU(inplace=True)]
            if upsample == "transpose":
                layers.append(nn.ConvTranspose3d(w_in, w_out, 4, stride=2, padding=1, bias=level == 0))
            else:
                layers += [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                           nn.Conv3d(w_in, w_out, 3, padding=1, bias=level == 0)]
            if level > 0:
                layers.append(nn.InstanceNorm3d(w_out, affine=True))
                if dropout > 0 and level >= depth - 3:
                    layers.append(nn.Dropout3d(dropout))
            else:
                layers.append(nn.Tanh())
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = 2 ** self.depth
        if any(s % step for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} must be divisible by 2**depth = {step}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck itself
        for block in self.up:
            x = block(x)
            if skips:
                x = torch.cat([x, skips.pop()], dim=1)
        return x


D_NORMS = ("instance", "none")


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """6-neighbour discrete Laplacian of ``(B, C, X, Y, Z)`` images, each channel on its own, negated
    (a bright dot is positive), edges replicated: the high-pass channels of :class:`PatchGAN3D` (``highpass``)."""
    pad = F.pad(x, (1,) * 6, mode="replicate")
    core = pad[:, :, 1:-1, 1:-1, 1:-1]
    neighbours = (pad[:, :, :-2, 1:-1, 1:-1] + pad[:, :, 2:, 1:-1, 1:-1] + pad[:, :, 1:-1, :-2, 1:-1]
                  + pad[:, :, 1:-1, 2:, 1:-1] + pad[:, :, 1:-1, 1:-1, :-2] + pad[:, :, 1:-1, 1:-1, 2:])
    return 6 * core - neighbours


class PatchGAN3D(nn.Module):
    """3D PatchGAN discriminator (pix2pix, `layers` strided blocks; 3 = the 70-voxel receptive field):
    a grid of logits, one per overlapping sub-patch. ``norm="instance"`` (pix2pix) divides out each
    feature's spread over the patch, which is also how sharp a patch is; ``"none"`` keeps it.
    ``highpass`` adds the image's :func:`laplacian` as a second input channel: how sharp a patch is
    then shows in the first layer's input instead of having to be learned."""

    def __init__(self, base: int = 8, layers: int = 3, in_ch: int = 1, norm: str = "instance",
                 highpass: bool = False):
        super().__init__()
        if norm not in D_NORMS:
            raise ValueError(f"norm must be one of {D_NORMS}, not {norm!r}")
        self.highpass = highpass
        first_in = in_ch * (2 if highpass else 1)
        seq: list[nn.Module] = [nn.Conv3d(first_in, base, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        w = base
        for n in range(1, layers + 1):
            w_next = base * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv3d(w, w_next, 4, stride=stride, padding=1, bias=norm == "none"),
                    nn.InstanceNorm3d(w_next, affine=True) if norm == "instance" else nn.Identity(),
                    nn.LeakyReLU(0.2, inplace=True)]
            w = w_next
        seq.append(nn.Conv3d(w, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.highpass:
            x = torch.cat([x, laplacian(x)], 1)
        return self.net(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """CycleGAN's N(0, 0.02) initialisation for convolutions, N(1, 0.02) for norm scales."""
    for m in net.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm3d) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
