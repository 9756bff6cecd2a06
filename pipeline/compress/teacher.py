"""The model a compressed one is distilled from: the dense model itself by default, or a larger one the user names
(`TEACHER=`): a better teacher's softened outputs carry more of what the labels do not say (Hinton et al. 2015), and
function matching keeps paying with a stronger, patient teacher (Beyer et al. 2022, "Knowledge distillation: A good
teacher is patient and consistent").

A teacher must read the same images and answer in the same classes. It may expect another normalisation (the CIFAR
ResNets take ImageNet's mean and std, MLPerf Tiny's ResNet-8 CIFAR-10's): the batch the student sees is turned back
into pixels and normalised the teacher's way inside `Renormalised`, so each model gets what its file expects.
"""

import torch
from torch import nn

from pipeline.errors import ConfigError, InputError
from pipeline.zoo import ModelSpec


class Renormalised(nn.Module):
    """`teacher` fed inputs normalised with (`mean`, `std`) as if they had been normalised with its own."""

    def __init__(self, teacher: nn.Module, *, mean, std, teacher_mean, teacher_std):
        super().__init__()
        self.teacher = teacher

        def column(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1)
        # x_teacher = (x * std + mean - teacher_mean) / teacher_std = x * scale + shift
        self.register_buffer("scale", column(std) / column(teacher_std))
        self.register_buffer("shift", (column(mean) - column(teacher_mean)) / column(teacher_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x * self.scale + self.shift)


def check_teacher_settings(teacher: str | None, teacher_weights: str | None, *, epochs: int, profile: str) -> None:
    """Refuses, before any work, a teacher there is no fine-tuning for and teacher weights without a teacher."""
    if teacher is None and teacher_weights is not None:
        raise ConfigError(f"TEACHER_WEIGHTS={teacher_weights} without TEACHER=: name the model they belong to "
                          "(TEACHER=resnet56, say), or leave TEACHER_WEIGHTS out")
    if teacher is not None and not epochs:
        raise ConfigError(f"TEACHER={teacher} is what fine-tuning distils from, and FINETUNE_EPOCHS is 0 in "
                          f"{profile}: give FINETUNE_EPOCHS=10, say, or leave TEACHER out")


def _channels(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values


def as_teacher(teacher: ModelSpec, student: ModelSpec) -> nn.Module:
    """`teacher`'s module ready to judge the batches `student` is trained on; refuses a teacher that reads other
    images or answers in other classes."""
    named = f"TEACHER={teacher.name}"
    if tuple(teacher.input_shape) != tuple(student.input_shape):
        raise InputError(f"{named} takes inputs of {'x'.join(map(str, teacher.input_shape))} (C x H x W); the model "
                         f"{student.name!r} takes {'x'.join(map(str, student.input_shape))}: a teacher must read the "
                         "same images")
    if teacher.num_classes != student.num_classes:
        raise InputError(f"{named} answers in {teacher.num_classes} classes; the model {student.name!r} in "
                         f"{student.num_classes}: a teacher must answer in the same classes, in the same order")
    if teacher.class_names and student.class_names and tuple(teacher.class_names) != tuple(student.class_names):
        raise InputError(f"{named} names its classes {', '.join(teacher.class_names)}; the model {student.name!r} "
                         f"{', '.join(student.class_names)}: a teacher must answer in the same classes, in the same "
                         "order")
    channels = student.input_shape[0]
    mean, std = _channels(student.mean, channels), _channels(student.std, channels)
    teacher_mean, teacher_std = _channels(teacher.mean, channels), _channels(teacher.std, channels)
    module = teacher.module.eval()
    if (mean, std) == (teacher_mean, teacher_std):
        return module
    return Renormalised(module, mean=mean, std=std, teacher_mean=teacher_mean, teacher_std=teacher_std).eval()
