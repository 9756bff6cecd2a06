"""Network definitions of the zoo: the founding document's net and the classic CIFAR ResNets."""

import torch
import torch.nn.functional as F
from torch import nn


class SeedNet(nn.Module):
    """The founding document's CIFAR-10 net: two 5x5 convs with max-pooling, three fully connected layers."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class OptionAShortcut(nn.Module):
    """He et al.'s parameter-free shortcut: stride-2 subsampling plus zero-padded channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = OptionAShortcut(planes - in_planes) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR-10, layer names as in akamaster/pytorch_resnet_cifar10 so its checkpoints load."""

    input_shape = (3, 32, 32)

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        blocks_per_stage, remainder = divmod(depth - 2, 6)
        if remainder or blocks_per_stage < 1:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
