"""Where torch work runs (fine-tuning, training, the sensitivity sweep's forward passes): the CPU, or a CUDA
device when there is one. The board the model is deployed to is another matter (`DEVICE=`).

On the CPU nothing changes: the same operations in the same order, bit for bit (tested). On CUDA the run is
seeded and asks torch for deterministic algorithms where the ops have them, mixed precision (bf16 autocast) is
optional, and batches are copied from pinned memory while the last one computes.
"""

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ConfigError

CHOICES = ("auto", "cpu", "cuda")  # and cuda:N


def check_choice(requested: str) -> None:
    """A device setting is one of `CHOICES` or `cuda:N`: checked when the profile is read, resolved later."""
    base, _, index = requested.partition(":")
    if base not in CHOICES or (index and (base != "cuda" or not index.isdigit())):
        raise ConfigError(f"Torch device {requested!r}; expected auto, cpu, cuda or cuda:N")


def gpus_asked(requested: str) -> int:
    """GPUs a job asks a cluster for: one where the profile says CUDA (`auto` takes what the node has)."""
    return 1 if requested.startswith("cuda") else 0


@dataclass(frozen=True)
class TorchDevice:
    device: torch.device
    name: str  # what the report says: "cpu", "cuda:0 (NVIDIA H200)"
    mixed_precision: bool  # bf16 autocast for forward passes and losses; never on the CPU
    deterministic: bool  # bit-identical reruns: always on the CPU; on CUDA where the ops allow
    # False on the CPU path, which must stay bit-identical to the code before devices: no copies, moves or casts.
    # A test runs the accelerator path on the CPU with it True.
    accelerated: bool = False

    @property
    def is_cpu(self) -> bool:
        return not self.accelerated

    def autocast(self):
        """bf16 autocast on CUDA when asked; nothing at all on the CPU (so the CPU path is unchanged)."""
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A host array on this device: from pinned memory without waiting on CUDA, as is on the CPU."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def about(self) -> dict:
        return {"torch_device": self.name, "mixed_precision": self.mixed_precision,
                "deterministic": self.deterministic}


CPU = TorchDevice(torch.device("cpu"), "cpu", mixed_precision=False, deterministic=True)


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU"


def torch_device(requested: str = "auto", *, mixed_precision: bool = True) -> TorchDevice:
    """`auto`: CUDA when torch sees a GPU, else the CPU; `cpu`; `cuda` or `cuda:N`, an error when absent."""
    check_choice(requested)
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return CPU
    if not torch.cuda.is_available():
        raise ConfigError(f"TORCH_DEVICE={requested}, but no CUDA device is available: {_why_no_cuda()}; expected "
                          "auto or cpu here")
    device = torch.device("cuda" if requested == "auto" else requested)
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"TORCH_DEVICE={requested}, but torch sees {torch.cuda.device_count()} CUDA device(s); "
                          f"expected cuda:0..cuda:{torch.cuda.device_count() - 1}")
    # what torch needs for deterministic CUDA kernels (cuBLAS's workspace setting must be set before its first use)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # ops without a deterministic kernel only warn
    torch.backends.cudnn.benchmark = False
    return TorchDevice(torch.device("cuda", index), f"cuda:{index} ({torch.cuda.get_device_name(index)})",
                       mixed_precision=mixed_precision, deterministic=torch.are_deterministic_algorithms_enabled(),
                       accelerated=True)


def prefetch(items: Iterator, *, depth: int = 2) -> Iterator:
    """`items` made on a worker thread, up to `depth` ahead of the consumer, in the same order (and so with the
    same random draws): the CPU prepares the next batches while the GPU computes. An error in the worker is
    raised here."""
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put(item)
            ready.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put(exc)

    worker = threading.Thread(target=work, daemon=True, name="prefetch")
    worker.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # let a worker blocked on a full queue see `stop`
            with contextlib.suppress(queue.Empty):
                ready.get_nowait()
            worker.join(timeout=0.01)
