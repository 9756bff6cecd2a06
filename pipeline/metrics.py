"""What a model variant measures: top-1, per-class accuracy and top-1 agreement from logits of any runtime,
and the record of one measured variant (report.json's `variants` entries)."""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.util import host_machine


def torch_logits(module: nn.Module, x_nchw: np.ndarray, *, batch_size: int = 500, progress: str | None = None,
                 device: torch.device | None = None) -> np.ndarray:
    """The module's logits on `x_nchw`, in batches, on `device` (where the module is; default the CPU)."""
    module.eval()
    out = []
    batches = range(0, len(x_nchw), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=progress, disable=progress is None, leave=False, unit="batch"):
            x = torch.from_numpy(x_nchw[start:start + batch_size])
            out.append(module(x if device is None else x.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def per_class(logits: np.ndarray, labels: np.ndarray, class_names) -> dict[str, float]:
    """Accuracy of each class, as the founding document prints it ('Accuracy of cat : 45 %'); a class with no
    sample among `labels` has no accuracy and is left out."""
    predicted = logits.argmax(1)
    return {name: float((predicted[labels == i] == i).mean()) for i, name in enumerate(class_names) if (labels == i).any()}


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples whose top-1 class matches the reference's."""
    return float((logits.argmax(1) == reference.argmax(1)).mean())


@dataclass(frozen=True)
class VariantReport:
    macs: int
    params: int
    bytes: int
    peak_activation_bytes: int
    top1: float
    agreement: float
    latency_ms: float  # the board's: measured on it, else estimated for it, else this host's (see latency_on)
    runtime: str
    machine: str
    per_class: dict[str, float] = field(default_factory=dict)
    layers: tuple[dict, ...] = ()
    details: dict = field(default_factory=dict)  # runtime-specific figures (TFLM arena, ORT agreement, ...)
    host_latency_ms: float | None = None  # wall time on this host, whatever latency_ms is
    latency_source: str = "host"  # what latency_ms is: one of LATENCY_SOURCES
    latency_on: str = ""  # the same in words, for the report
    board: dict | None = None  # one inference estimated on the board's core: instructions, cycles, ms

    def __post_init__(self):
        if self.latency_source not in LATENCY_SOURCES:
            raise ValueError(f"latency_source {self.latency_source!r}; known: {', '.join(LATENCY_SOURCES)}")

    def with_latency(self, source: str, latency_ms: float, on: str) -> "VariantReport":
        """The same variant with its latency from a better source (see LATENCY_SOURCES)."""
        return dataclasses.replace(self, latency_ms=latency_ms, latency_source=source, latency_on=on)


# where a variant's latency_ms comes from, best first: timed on the board, estimated for it, this host's wall time
LATENCY_SOURCES = ("measured", "estimated", "host")


def on_this_host() -> str:
    return f"this host ({host_machine()}), not the board"


def estimated_on(board: dict) -> str:
    """`board` as `pipeline.cycles.board_figures` writes it."""
    return f"estimated for the {board['core']} at {board['clock_mhz']:g} MHz"
