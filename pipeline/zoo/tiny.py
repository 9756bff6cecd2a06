"""PyTorch versions of the MLPerf Tiny reference architectures (github.com/mlcommons/tiny, benchmark/training).

Same layers, widths, strides and classifier as the Keras references; padding is PyTorch's symmetric padding
(Keras 'same' pads stride-2 layers on the bottom/right only), so weights do not transfer from the .h5 files.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResNet8Block(nn.Module):
    """Two 3x3 convs; a 1x1 strided conv projects the shortcut when the shape changes (image classification)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """MLPerf Tiny image classification: 32x32x3 CIFAR-10, 3 stacks of 16/32/64 filters (about 12.5M MACs)."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.stack1 = ResNet8Block(16, 16, 1)
        self.stack2 = ResNet8Block(16, 32, 2)
        self.stack3 = ResNet8Block(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stack3(self.stack2(self.stack1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DSCNN(nn.Module):
    """MLPerf Tiny keyword spotting: 49x10x1 MFCC features, a 10x4 stride-2 conv then four depthwise-separable
    blocks of 64 channels, 12 classes (the Speech Commands v2 words, silence and unknown)."""

    input_shape = (1, 49, 10)

    def __init__(self, num_classes: int = 12, width: int = 64):
        super().__init__()
        self.stem = _conv_bn(1, width, (10, 4), stride=2, padding=(5, 1))
        self.blocks = nn.Sequential(*(nn.Sequential(_conv_bn(width, width, 3, padding=1, groups=width),
                                                    _conv_bn(width, width, 1)) for _ in range(4)))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MobileNetV1(nn.Module):
    """MLPerf Tiny visual wake words: MobileNetV1 at width 0.25 on 96x96x3 images, 2 classes (person or not)."""

    input_shape = (3, 96, 96)
    # (output channels at width 1, stride) of the 13 depthwise-separable blocks
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 2, width: float = 0.25):
        super().__init__()
        channels = int(32 * width)
        layers = [_conv_bn(3, channels, 3, stride=2, padding=1)]
        for out, stride in self.BLOCKS:
            out = int(out * width)
            layers += [_conv_bn(channels, channels, 3, stride=stride, padding=1, groups=channels),
                       _conv_bn(channels, out, 1)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class FashionNet(nn.Module):
    """A small 1-channel net for 28x28 grey images (Fashion-MNIST): three 3x3 convs of 16/32/64 filters with
    max-pooling, global average pooling, one linear classifier (about 1.9M MACs, 24k parameters)."""

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(_conv_bn(1, 16, 3, padding=1), nn.MaxPool2d(2),
                                      _conv_bn(16, 32, 3, padding=1), nn.MaxPool2d(2),
                                      _conv_bn(32, 64, 3, padding=1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))
