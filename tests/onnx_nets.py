"""Small versions of the nets users bring as ONNX files, written in torch, trained briefly on data they can learn,
and exported the way a user would export them (`torch.onnx.export`, opset 18, batch dynamic)."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from stripes import stripes
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.down, self.up = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand, depthwise, squeeze-and-excite, project; hard-swish throughout."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.Hardswish())
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """96x96 RGB, 2 classes, normalisation inside the graph (as Keras exports often have it)."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(16, 32, 16, 2), InvertedResidual(16, 48, 24, 2),
                                    InvertedResidual(24, 72, 24, 1), InvertedResidual(24, 96, 32, 2))
        self.last = nn.Sequential(nn.Conv2d(32, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish())
        self.head = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, classes))

    def forward(self, x):
        x = self.last(self.blocks(self.stem((x - 0.5) / 0.25)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FireModule(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1, self.expand3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(x)), F.relu(self.expand3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1's shape at 32x32: fire modules (Concat), a conv classifier, a softmax at the end."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.fires = nn.Sequential(FireModule(32, 8, 16), FireModule(32, 8, 16), nn.MaxPool2d(2),
                                   FireModule(32, 16, 32), FireModule(64, 16, 32), nn.MaxPool2d(2))
        self.classifier = nn.Conv2d(64, classes, 1)

    def forward(self, x):
        x = self.fires(F.max_pool2d(F.relu(self.stem(x)), 2))
        return F.softmax(torch.flatten(F.adaptive_avg_pool2d(self.classifier(x), 1), 1), 1)


def channel_shuffle(x, groups: int = 2):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet V2's unit: half the channels pass, half go through 1x1, depthwise 3x3, 1x1; concat; shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
                                    nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half),
                                    nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        half = x.shape[1] // 2
        return channel_shuffle(torch.cat([x[:, :half], self.branch(x[:, half:])], 1))


class ShuffleNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 128, 3, 2, 1), nn.BatchNorm2d(128), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(128), ShuffleUnit(128), nn.MaxPool2d(2), ShuffleUnit(128))
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.units(self.stem(x)), 1), 1))


NETS = {"mobilenetv3": (MobileNetV3Small, 96, 2), "squeezenet": (SqueezeNet, 32, 4), "shufflenet": (ShuffleNet, 32, 4)}
KERAS = Path(__file__).parent / "data/keras_cnn.onnx"  # Keras through tf2onnx: see data/make_keras_onnx.py


def write_stripes(data: Path, size: int, classes: int, *, train: int = 768, test: int = 256) -> Path:
    x_train, y_train = stripes(size, classes, train, seed=0)
    x_test, y_test = stripes(size, classes, test, seed=1)
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return data


def keras_onnx(folder: Path) -> tuple[Path, Path]:
    """The committed tf2onnx file, copied as a user's, with the data it was trained on (32x32 stripes, 4 classes)."""
    path = folder / "keras_cnn.onnx"
    path.write_bytes(KERAS.read_bytes())
    return path, write_stripes(folder / "keras.npz", 32, 4)


def make_onnx(name: str, folder: Path, *, train: int = 768, test: int = 256, epochs: int = 10) -> tuple[Path, Path]:
    """Train `name` on stripes, export it to `folder/<name>.onnx`, and write the data as `folder/<name>.npz`."""
    build, size, classes = NETS[name]
    data = write_stripes(folder / f"{name}.npz", size, classes, train=train, test=test)
    x_train, y_train = np.load(data)["x_train"], np.load(data)["y_train"]
    torch.manual_seed(0)
    model = build(classes)
    mean, std = (0.0, 1.0) if name == "mobilenetv3" else (0.5, 0.25)  # MobileNet normalises inside its graph
    xs = torch.from_numpy((x_train.transpose(0, 3, 1, 2) - mean) / std)
    ys = torch.from_numpy(y_train)
    optimiser = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(xs), generator=torch.Generator().manual_seed(_)).split(64):
            out = model(xs[i])
            # the squeezenet ends in a softmax, as many exported classifiers do: train on its log
            loss = F.nll_loss(torch.log(out + 1e-6), ys[i]) if name == "squeezenet" else F.cross_entropy(out, ys[i])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    path = folder / f"{name}.onnx"
    torch.onnx.export(model, (xs[:1],), str(path), dynamo=False, opset_version=18, input_names=["image"],
                      output_names=["scores"], dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}})
    return path, data
