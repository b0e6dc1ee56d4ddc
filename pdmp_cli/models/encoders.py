"""Encoders: map one modality's input [B, T, C, H, W] to a feature vector [B, D].

Every modality uses the same axis convention (audio spectrograms are T=1, C=1), so one encoder
class serves audio and video: the T frames are folded into the batch, the backbone pools over
space, and features are averaged over time.
"""
from __future__ import annotations

import torch
from torch import nn

from pdmp_cli.registry import Registry

ENCODERS: Registry[type["Encoder"]] = Registry("encoder")


class Encoder(nn.Module):
    out_dim: int
    description = ""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()

    def backbone(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, D]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        z = self.backbone(x.flatten(0, 1))
        return z.view(b, t, -1).mean(dim=1)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@ENCODERS.register("small")
class SmallEncoder(Encoder):
    description = "4 conv-BN-ReLU layers (width, 2w, 4w, 4w), max-pooled; for CPU runs and tests"

    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__(in_channels, width)
        w = width
        self.net = nn.Sequential(
            conv_bn_relu(in_channels, w), nn.MaxPool2d(2),
            conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
            conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_dim = 4 * w
        init_weights(self)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@ENCODERS.register("resnet18")
class ResNet18(Encoder):
    description = "ResNet-18 (plain torch, from scratch, Kaiming convs), 512-d; the papers' encoder, for GPUs"

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__(in_channels, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 512
        init_weights(self)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


def init_weights(module: nn.Module) -> None:
    """Kaiming for convs, Xavier for linear layers, BN at identity (as in methods.md)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
