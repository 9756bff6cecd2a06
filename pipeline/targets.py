"""Target profiles: one TOML file per target in `targets/`, read into frozen dataclasses.

The defaults of every setting live here and nowhere else; a profile states what differs and why.
An unknown target, section or key is an error that names the known ones.
"""

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError, unknown

TARGETS_DIR = Path(__file__).resolve().parents[1] / "targets"


@dataclass(frozen=True)
class Quantization:
    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    calibration_method: str = "minmax"
    calibration_samples: int = 512
    reduce_range: bool = False


@dataclass(frozen=True)
class Decomposition:
    method: str = "tucker2"
    rank: str = "energy:0.9"
    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    # a global budget replaces `method` and `rank`: "" (off), "0.35" / "macs:0.35" or "params:0.5"
    budget: str = ""
    candidates: tuple[str, ...] = ("tucker2", "svd")  # methods the budget allocation may pick per conv
    rank_fractions: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
    fit_samples: int = 256  # training images the factors are fitted to (0: fit the weights instead)
    sensitivity_samples: int = 256  # held-out training images each candidate is judged on
    # second cost of the allocation: KL nats that the dense layers' summed host int8 latency is worth (0: off)
    latency_weight: float = 0.0


@dataclass(frozen=True)
class Finetune:
    """Knowledge-distillation fine-tuning of the factored model (pipeline/finetune.py)."""

    epochs: int = 0
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.9
    bn: str = "frozen"
    heldout_samples: int = 2000  # training images never trained on; they pick the best epoch


@dataclass(frozen=True)
class Thresholds:
    max_top1_drop: float = 0.03
    min_agreement: float = 0.85  # top-1 agreement of the deployed int8 model with dense_fp32
    # microcontroller targets: how closely TFLite Micro must follow the ONNX Runtime int8 model
    min_ort_agreement: float = 0.98
    max_output_diff_steps: float = 8.0


@dataclass(frozen=True)
class DeviceCheck:
    """Where `make regress` (and the deploy's last stage, when on) runs the int8 artefact."""

    default: str = "qemu"
    check_on_deploy: bool = False
    samples: int = 1000


@dataclass(frozen=True)
class Budget:
    """Memory of a microcontroller; 0 means unchecked (boards with an OS)."""

    ram_bytes: int = 0
    flash_bytes: int = 0
    ram_reserve_bytes: int = 0
    flash_reserve_bytes: int = 0
    arena_margin: float = 0.1


@dataclass(frozen=True)
class Evaluation:
    samples: int = 0
    latency_runs: int = 200
    latency_warmup: int = 20


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    runtime: str
    quantization: Quantization = field(default_factory=Quantization)
    decomposition: Decomposition = field(default_factory=Decomposition)
    finetune: Finetune = field(default_factory=Finetune)
    thresholds: Thresholds = field(default_factory=Thresholds)
    evaluation: Evaluation = field(default_factory=Evaluation)
    budget: Budget = field(default_factory=Budget)
    device: DeviceCheck = field(default_factory=DeviceCheck)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "runtime": ("onnxruntime", "tflite-micro"),
    "format": ("qdq", "qoperator"),
    "activation_type": ("int8", "uint8"),
    "weight_type": ("int8", "uint8"),
    "calibration_method": ("entropy", "minmax", "percentile"),
    "bn": ("frozen", "reestimate"),
}


def known_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def _build(cls, data: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(data) - set(fields)
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}; known: {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise unknown(f"{where}.{name} value", value, CHOICES[name])
        values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def load_target(name: str, *, folder: Path = TARGETS_DIR) -> TargetProfile:
    """A target by name (`targets/<name>.toml`), or a board of the user's own as a path to a .toml file."""
    path = Path(name) if name.endswith(".toml") else folder / f"{name}.toml"
    if not path.is_file():
        raise unknown("target", name, sorted(p.stem for p in folder.glob("*.toml")))
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    sections = {"quantization": Quantization, "decomposition": Decomposition, "finetune": Finetune, "thresholds": Thresholds,
                "evaluation": Evaluation, "budget": Budget, "device": DeviceCheck}
    top = {k: v for k, v in data.items() if k not in sections}
    profile = _build(TargetProfile, top, path.stem)
    return dataclasses.replace(profile, **{k: _build(cls, data.get(k, {}), f"{path.stem}.{k}") for k, cls in sections.items()})
