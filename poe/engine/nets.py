"""Pre-activation Wide-ResNets split into the PoE library and experts (docs/METHOD.md).

A WRN-d-k has a 3x3 stem conv with 16 channels and three groups of (d - 4) / 6 pre-activation
basic blocks with 16k, 32k and 64k channels; groups 2 and 3 halve the resolution. PoE keeps the
stem and the first two groups of a small student as the shared *library* and trains one *expert*
per primitive task: the last group at a small width, then BN, ReLU, global pooling and a linear
layer over the task's classes.

Input normalisation lives inside every network, so all of them take pixels in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poe.engine import limits


@dataclass(frozen=True)
class WRNConfig:
    depth: int = 16
    width: int = 1
    in_channels: int = 1
    num_classes: int = 10
    stem_stride: int = 1
    dropout: float = 0.0
    # Per-channel normalisation applied inside the model (pixels arrive in [0, 1]).
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)

    def __post_init__(self) -> None:
        # The caps first: a config from a request or the registry is refused before any module exists.
        limits.check_network_config("config", {"depth": self.depth, "width": self.width,
                                               "in_channels": self.in_channels, "num_classes": self.num_classes})
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {self.depth}")
        if self.width < 1:
            raise ValueError(f"WRN width must be >= 1, got {self.width}")
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError("in_channels and num_classes must be >= 1")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 4) // 6

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Stem, group 1, group 2 and group 3 widths."""
        return 16, 16 * self.width, 32 * self.width, 64 * self.width


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # Pre-activation: a projection shortcut reads the activated input.
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout > 0:
            o = F.dropout(o, self.dropout, self.training)
        return self.conv2(o) + skip


def make_group(in_ch: int, out_ch: int, blocks: int, stride: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [PreActBlock(in_ch, out_ch, stride, dropout)]
    layers += [PreActBlock(out_ch, out_ch, 1, dropout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Head(nn.Module):
    """Last group, then BN, ReLU, global average pooling and a linear classifier."""

    def __init__(self, in_ch: int, width: int, blocks: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.group = make_group(in_ch, width, blocks, 2, dropout)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(self.group(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


class Library(nn.Module):
    """Normalisation, stem and the first two groups: [N, C, H, W] -> [N, 32k, H/2s, W/2s]."""

    def __init__(self, cfg: WRNConfig):
        super().__init__()
        c0, c1, c2, _ = cfg.channels
        n = cfg.blocks_per_group
        self.norm = Normalize(cfg.mean, cfg.std)
        self.stem = nn.Conv2d(cfg.in_channels, c0, 3, cfg.stem_stride, 1, bias=False)
        self.group1 = make_group(c0, c1, n, 1, cfg.dropout)
        self.group2 = make_group(c1, c2, n, 2, cfg.dropout)
        self.out_channels = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group2(self.group1(self.stem(self.norm(x))))


class WideResNet(nn.Module):
    """The whole network: library followed by a full-width head over all classes."""

    def __init__(self, cfg: WRNConfig):
        super().__init__()
        self.cfg = cfg
        self.library = Library(cfg)
        self.head = Head(cfg.channels[2], cfg.channels[3], cfg.blocks_per_group, cfg.num_classes, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.library(x))


@dataclass(frozen=True)
class ExpertConfig:
    in_channels: int  # the library's output channels
    width: int = 16
    blocks: int = 2
    num_classes: int = 2

    def __post_init__(self) -> None:
        limits.check_expert_config("config", {"in_channels": self.in_channels, "width": self.width,
                                              "blocks": self.blocks, "num_classes": self.num_classes})


def make_expert(cfg: ExpertConfig) -> Head:
    return Head(cfg.in_channels, cfg.width, cfg.blocks, cfg.num_classes)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of convolutions and linear layers for one input of `input_shape`
    ([C, H, W] for images, [C, H, W] of a feature map for an expert)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    handles = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in module.modules() if isinstance(m, nn.Linear)]
    was_training = module.training
    try:
        module.eval()(torch.zeros(1, *input_shape))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return total
