"""Built-in architectures whose ``state_dict`` keys and shapes match pytorch-nested-unet's ``archs.py``.

Users' checkpoints (``conv0_0.conv1.weight`` ... ``final.weight``, or ``final1`` .. ``final4`` with deep
supervision) load into these classes unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

FILTERS = (32, 64, 128, 256, 512)


class VGGBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU (key names conv1, bn1, conv2, bn2)."""

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, middle_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(middle_channels)
        self.conv2 = nn.Conv2d(middle_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class UNet(nn.Module):
    """The plain U-Net of pytorch-nested-unet (four 2x poolings, bilinear align_corners upsampling)."""

    def __init__(self, num_classes: int, input_channels: int = 3, **kwargs):
        super().__init__()
        f = FILTERS
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv0_0 = VGGBlock(input_channels, f[0], f[0])
        self.conv1_0 = VGGBlock(f[0], f[1], f[1])
        self.conv2_0 = VGGBlock(f[1], f[2], f[2])
        self.conv3_0 = VGGBlock(f[2], f[3], f[3])
        self.conv4_0 = VGGBlock(f[3], f[4], f[4])
        self.conv3_1 = VGGBlock(f[3] + f[4], f[3], f[3])
        self.conv2_2 = VGGBlock(f[2] + f[3], f[2], f[2])
        self.conv1_3 = VGGBlock(f[1] + f[2], f[1], f[1])
        self.conv0_4 = VGGBlock(f[0] + f[1], f[0], f[0])
        self.final = nn.Conv2d(f[0], num_classes, kernel_size=1)

    def forward(self, x):
        x0_0 = self.conv0_0(x)
        x1_0 = self.conv1_0(self.pool(x0_0))
        x2_0 = self.conv2_0(self.pool(x1_0))
        x3_0 = self.conv3_0(self.pool(x2_0))
        x4_0 = self.conv4_0(self.pool(x3_0))
        x3_1 = self.conv3_1(torch.cat([x3_0, self.up(x4_0)], 1))
        x2_2 = self.conv2_2(torch.cat([x2_0, self.up(x3_1)], 1))
        x1_3 = self.conv1_3(torch.cat([x1_0, self.up(x2_2)], 1))
        x0_4 = self.conv0_4(torch.cat([x0_0, self.up(x1_3)], 1))
        return self.final(x0_4)


class NestedUNet(nn.Module):
    """UNet++ as in pytorch-nested-unet; with ``deep_supervision`` it returns four heads."""

    def __init__(self, num_classes: int, input_channels: int = 3, deep_supervision: bool = False,
                 **kwargs):
        super().__init__()
        f = FILTERS
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

        self.conv0_0 = VGGBlock(input_channels, f[0], f[0])
        self.conv1_0 = VGGBlock(f[0], f[1], f[1])
        self.conv2_0 = VGGBlock(f[1], f[2], f[2])
        self.conv3_0 = VGGBlock(f[2], f[3], f[3])
        self.conv4_0 = VGGBlock(f[3], f[4], f[4])

        self.conv0_1 = VGGBlock(f[0] + f[1], f[0], f[0])
        self.conv1_1 = VGGBlock(f[1] + f[2], f[1], f[1])
        self.conv2_1 = VGGBlock(f[2] + f[3], f[2], f[2])
        self.conv3_1 = VGGBlock(f[3] + f[4], f[3], f[3])

        self.conv0_2 = VGGBlock(f[0] * 2 + f[1], f[0], f[0])
        self.conv1_2 = VGGBlock(f[1] * 2 + f[2], f[1], f[1])
        self.conv2_2 = VGGBlock(f[2] * 2 + f[3], f[2], f[2])

        self.conv0_3 = VGGBlock(f[0] * 3 + f[1], f[0], f[0])
        self.conv1_3 = VGGBlock(f[1] * 3 + f[2], f[1], f[1])

        self.conv0_4 = VGGBlock(f[0] * 4 + f[1], f[0], f[0])

        if deep_supervision:
            self.final1 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final2 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final3 = nn.Conv2d(f[0], num_classes, kernel_size=1)
            self.final4 = nn.Conv2d(f[0], num_classes, kernel_size=1)
        else:
            self.final = nn.Conv2d(f[0], num_classes, kernel_size=1)

    def forward(self, x):
        up, pool, cat = self.up, self.pool, torch.cat
        x0_0 = self.conv0_0(x)
        x1_0 = self.conv1_0(pool(x0_0))
        x0_1 = self.conv0_1(cat([x0_0, up(x1_0)], 1))

        x2_0 = self.conv2_0(pool(x1_0))
        x1_1 = self.conv1_1(cat([x1_0, up(x2_0)], 1))
        x0_2 = self.conv0_2(cat([x0_0, x0_1, up(x1_1)], 1))

        x3_0 = self.conv3_0(pool(x2_0))
        x2_1 = self.conv2_1(cat([x2_0, up(x3_0)], 1))
        x1_2 = self.conv1_2(cat([x1_0, x1_1, up(x2_1)], 1))
        x0_3 = self.conv0_3(cat([x0_0, x0_1, x0_2, up(x1_2)], 1))

        x4_0 = self.conv4_0(pool(x3_0))
        x3_1 = self.conv3_1(cat([x3_0, up(x4_0)], 1))
        x2_2 = self.conv2_2(cat([x2_0, x2_1, up(x3_1)], 1))
        x1_3 = self.conv1_3(cat([x1_0, x1_1, x1_2, up(x2_2)], 1))
        x0_4 = self.conv0_4(cat([x0_0, x0_1, x0_2, x0_3, up(x1_3)], 1))

        if self.deep_supervision:
            return [self.final1(x0_1), self.final2(x0_2), self.final3(x0_3), self.final4(x0_4)]
        return self.final(x0_4)


ARCHS = {"nested_unet": NestedUNet, "unet": UNet}
CONFIG_NAMES = {"NestedUNet": "nested_unet", "UNet": "unet"}


def arch_name(name: str) -> str:
    """Map a config name (``NestedUNet``) or a built-in name (``nested_unet``) to the built-in name."""
    if name in ARCHS:
        return name
    if name in CONFIG_NAMES:
        return CONFIG_NAMES[name]
    lowered = {k.lower(): v for k, v in CONFIG_NAMES.items()}
    return lowered.get(name.lower(), name)
