"""Target profiles: TOML files read into frozen dataclasses, validated once when they are built.

Every default lives in `targets/base/common.toml`, with its reason; the dataclasses read their defaults from
it, so code and profiles cannot disagree. A profile (`targets/<name>.toml`) states only what differs, on top
of the family base it names with `extends` (`targets/base/<family>.toml`). An unknown target, section or
key is an error that names the known ones.
"""

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError, unknown
from targets.budget import parse_budget

TARGETS_DIR = Path(__file__).resolve().parent
BASES_DIR = TARGETS_DIR / "base"
ROOT_BASE = "common"


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


_COMMON = _read(BASES_DIR / f"{ROOT_BASE}.toml")


def defaults_from(section: str):
    """A frozen dataclass whose fields default to `targets/base/common.toml`'s [section] (lists become
    tuples): the one home of every default, so code and profiles cannot disagree."""
    def build(cls):
        for name in cls.__annotations__:
            value = _COMMON[section][name]
            setattr(cls, name, tuple(value) if isinstance(value, list) else value)
        return dataclass(frozen=True)(cls)
    return build


def _choice(where: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise unknown(f"{where} value", value, allowed)


def _at_least(where: str, value, low, expected: str) -> None:
    if not value >= low:
        raise ConfigError(f"{where}={value}; expected {expected}")


@defaults_from("quantization")
class Quantization:
    """ONNX Runtime static int8 quantization; the TFLite writer reads the same QDQ graph."""

    format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    calibration_method: str
    calibration_samples: int
    reduce_range: bool

    def __post_init__(self):
        _choice("format", self.format, ("qdq", "qoperator"))
        _choice("activation_type", self.activation_type, ("int8", "uint8"))
        _choice("weight_type", self.weight_type, ("int8", "uint8"))
        _choice("calibration_method", self.calibration_method, ("entropy", "minmax", "percentile"))
        _at_least("calibration_samples", self.calibration_samples, 1, "at least one image")


@defaults_from("decomposition")
class Decomposition:
    """Stage 1: which layers are factored, how, and at what ranks (or under what compression budget)."""

    method: str  # a conv method of the registry; linear layers always get truncated SVD
    rank: str  # evbmf, energy:<fraction>, an integer, or a fraction of each mode's maximum
    layers: tuple[str, ...]  # fnmatch patterns
    exclude: tuple[str, ...]
    keep_first_and_last: bool
    round_to: int
    # the compression budget (of MACs or parameters); the part's memory is `Memory`
    budget: str
    candidates: tuple[str, ...]  # conv methods the budget allocation may pick
    rank_fractions: tuple[float, ...]
    channel_fractions: tuple[float, ...]  # the channel counts a group may keep under a budget, of its dense count
    fit_samples: int  # 0: the factors fit the weights, not the activations
    sensitivity_samples: int
    latency_weight: float  # 0: MACs (or parameters) are the only cost
    gradual: tuple[float, ...]  # intermediate budgets when fine-tuning, in the budget's resource
    arena_never_grows: bool  # a budget without an arena constraint gets arena:1 (the dense model's arena at most)
    arena_records: bool  # the arena also holds the runtime's per-operator and per-channel records (TFLM)
    cut_then_factor: bool  # a layer a channel cut reshapes may also be factored (its chains timed at each cut shape)

    def __post_init__(self):
        # imported here: the method registry needs torch, and reading a profile should not
        from pipeline.compress.methods import METHOD_NAMES
        from pipeline.compress.ranks import parse_rank

        if self.method not in METHOD_NAMES:
            raise unknown("method", self.method, METHOD_NAMES)
        for method in self.candidates:
            if method not in METHOD_NAMES:
                raise unknown("candidate method", method, METHOD_NAMES)
        parse_rank(self.rank)
        if self.budget:
            parse_budget(self.budget)
        _at_least("round_to", self.round_to, 1, "a positive integer")
        if not self.rank_fractions or not all(0 < f <= 1 for f in self.rank_fractions):
            raise ConfigError(f"rank_fractions {self.rank_fractions}; expected fractions in (0, 1]")
        if not self.channel_fractions or not all(0 <= f < 1 for f in self.channel_fractions):
            raise ConfigError(f"channel_fractions {self.channel_fractions}; expected fractions in [0, 1) (0: a group "
                              "may be removed whole)")
        _at_least("latency_weight", self.latency_weight, 0, "0 (off) or a positive weight")
        _at_least("fit_samples", self.fit_samples, 0, "0 (fit the weights) or a positive count")
        _at_least("sensitivity_samples", self.sensitivity_samples, 1, "at least one image")
        if list(self.gradual) != sorted(set(self.gradual), reverse=True) or not all(0 < f < 1 for f in self.gradual):
            raise ConfigError(f"gradual {list(self.gradual)}; expected falling fractions in (0, 1), e.g. [0.65, 0.45]")


@defaults_from("finetune")
class Finetune:
    """Knowledge-distillation fine-tuning of the factored model (pipeline/compress/finetune.py)."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    temperature: float
    alpha: float
    feature_weight: float
    bn: str
    optimizer: str
    step_epochs: int  # at each intermediate budget of `Decomposition.gradual`
    ema_decay: float  # 0: no weight averaging
    mixup: float  # Beta(mixup, mixup) mixing of each batch; 0: none
    seed: int  # added to the run's seed for shuffling, augmentation and mixing
    heldout_samples: int
    device: str  # where torch work runs: auto, cpu, cuda, cuda:N (pipeline/compute.py)
    mixed_precision: bool  # bf16 autocast on CUDA

    def __post_init__(self):
        if self.epochs < 0:
            raise ConfigError(f"FINETUNE_EPOCHS={self.epochs}; expected 0 (no fine-tuning) or a positive count")
        _choice("bn", self.bn, ("frozen", "reestimate"))
        _choice("optimizer", self.optimizer, ("adamw", "sgd"))
        _at_least("batch_size", self.batch_size, 1, "a positive batch size")
        _at_least("heldout_samples", self.heldout_samples, 0, "0 or a positive count")
        _at_least("step_epochs", self.step_epochs, 1, "at least one epoch per intermediate budget")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay}; expected 0 (no averaging) or a decay in (0, 1)")
        _at_least("mixup", self.mixup, 0.0, "0 (no mixing) or a positive Beta concentration")
        _at_least("seed", self.seed, 0, "0 or a positive offset")
        from pipeline.compute import check_choice  # the device names the compute module knows

        check_choice(self.device)


@defaults_from("thresholds")
class Thresholds:
    """What a deployed int8 model must reach; `failures` is the one check deploy, regress and reports use."""

    max_top1_drop: float  # fraction of top-1: factored_int8 against dense_fp32
    min_agreement: float  # fraction of images: the int8 model's top-1 equals dense_fp32's
    # microcontrollers: how closely TFLite Micro must follow ONNX Runtime's int8 model
    min_ort_agreement: float
    max_output_diff_steps: float  # in output quantization steps

    def failures(self, *, top1_drop: float, agreement: float | None = None, ort_agreement: float | None = None,
                 max_output_diff_steps: float | None = None) -> list[str]:
        """Every threshold the measured figures miss, in words; a figure not measured (None) is not checked."""
        found = []
        if top1_drop > self.max_top1_drop + 1e-12:
            found.append(f"top-1 drop {top1_drop * 100:.2f} points > {self.max_top1_drop * 100:.2f} allowed")
        if agreement is not None and agreement < self.min_agreement:
            found.append(f"agreement with dense_fp32 {agreement:.2%} < {self.min_agreement:.2%}")
        if ort_agreement is not None and ort_agreement < self.min_ort_agreement:
            found.append(f"TFLM agrees with ONNX Runtime int8 on {ort_agreement:.2%} of images "
                         f"< {self.min_ort_agreement:.2%}")
        if max_output_diff_steps is not None and max_output_diff_steps > self.max_output_diff_steps:
            found.append(f"TFLM output differs from ONNX Runtime int8 by {max_output_diff_steps:g} steps "
                         f"> {self.max_output_diff_steps:g}")
        return found


@defaults_from("device")
class DeviceCheck:
    """Where `make regress` (and the deploy's last stage, when on) runs the int8 artefact."""

    default: str
    check_on_deploy: bool
    samples: int

    def __post_init__(self):
        _at_least("samples", self.samples, 0, "0 (the full test set) or a positive count")


@defaults_from("memory")
class Memory:
    """Memory of a microcontroller; 0 means unchecked (boards with an OS)."""

    ram_bytes: int
    flash_bytes: int
    ram_reserve_bytes: int
    flash_reserve_bytes: int
    arena_margin: float

    def __post_init__(self):
        _at_least("arena_margin", self.arena_margin, 0, "a fraction >= 0")
        if self.ram_reserve_bytes > self.ram_bytes or self.flash_reserve_bytes > self.flash_bytes:
            raise ConfigError(f"reserves ({self.ram_reserve_bytes:,} B RAM, {self.flash_reserve_bytes:,} B flash) "
                              f"exceed the part ({self.ram_bytes:,} B RAM, {self.flash_bytes:,} B flash)")


@defaults_from("firmware")
class Firmware:
    """Firmware for a Cortex-M part, built and run on its emulated board (pipeline/tflm/build.py)."""

    cpu: str  # "" = none
    samples: int
    max_instruction_rise: float  # a fraction of the baseline's instructions per inference
    sources: str  # "" = `make third-party`'s cached copy, else ../shared/third_party
    board: str  # the real board's layer (pipeline/tflm/boards); "" = the emulated board only
    baud: int  # the benchmark firmware's UART rate (8N1)

    def __post_init__(self):
        from pipeline.tflm.boards import EMULATED, load_boards  # the board layers the firmware build knows
        from pipeline.tflm.build import CPUS  # the cores the firmware build knows

        _choice("cpu", self.cpu, ("", *CPUS))
        _choice("board", self.board, ("", *(b for b in load_boards() if b != EMULATED)))
        _at_least("baud", self.baud, 1200, "a UART rate such as 115200")
        _at_least("samples", self.samples, 1, "at least one image")
        _at_least("max_instruction_rise", self.max_instruction_rise, 0, "a fraction >= 0")


@defaults_from("board")
class Board:
    """The board the figures are for: the core whose model estimates its cycles, and its clock."""

    core: str  # "" = the firmware's cpu (microcontrollers), else none
    clock_mhz: float  # 0 = unknown: cycles without milliseconds
    max_cycle_rise: float  # a fraction of the baseline's estimated cycles per inference

    def __post_init__(self):
        from pipeline.cycles.cores import CORES

        _choice("core", self.core, ("", *CORES))
        _at_least("clock_mhz", self.clock_mhz, 0, "0 (unknown) or the core's clock in MHz")
        _at_least("max_cycle_rise", self.max_cycle_rise, 0, "a fraction >= 0")


@defaults_from("evaluation")
class Evaluation:
    """How the four variants are measured: on how many test images, and how latency is timed."""

    samples: int  # 0: the full test set
    latency_runs: int
    latency_warmup: int
    latency_tolerance: float  # share by which a timed latency may exceed dense before it is a warning

    def __post_init__(self):
        _at_least("samples", self.samples, 0, "0 (the full test set) or a positive count")
        _at_least("latency_runs", self.latency_runs, 1, "at least one run")
        _at_least("latency_tolerance", self.latency_tolerance, 0, "a share of at least 0")


def check_gradual(decomposition: Decomposition, tuning: Finetune) -> None:
    """Intermediate budgets are only reached when fine-tuning, need a budget above which they lie, and must
    leave the final budget at least one epoch. Checked when a profile is built and again by `compress`, which
    takes the two sections without a profile."""
    steps = decomposition.gradual
    if not steps or not tuning.epochs:
        return
    if not decomposition.budget:
        raise ConfigError(f"decomposition.gradual {list(steps)} needs a budget to end at; none is set "
                          "(BUDGET=0.35 or decomposition.budget)")
    final = parse_budget(decomposition.budget).fraction
    if final is None:
        raise ConfigError(f"decomposition.gradual {list(steps)} steps down the budget's first constraint, and "
                          f"{parse_budget(decomposition.budget).first} is a number of bytes; put a fraction first")
    if steps[-1] <= final:
        raise ConfigError(f"decomposition.gradual {list(steps)} must stay above the budget {final:g}")
    needed = len(steps) * tuning.step_epochs
    if tuning.epochs <= needed:
        raise ConfigError(f"{tuning.epochs} fine-tuning epochs for {len(steps)} intermediate budgets of "
                          f"{tuning.step_epochs} epochs each; expected more than {needed}, so the budget gets some")


RUNTIMES = ("onnxruntime", "tflite-micro")
SECTIONS = {"quantization": Quantization, "decomposition": Decomposition, "finetune": Finetune,
            "thresholds": Thresholds, "evaluation": Evaluation, "memory": Memory, "device": DeviceCheck,
            "firmware": Firmware, "board": Board}
# the cores each runtime's board can be estimated on: ONNX Runtime runs in the emulated Pi's aarch64 guest
RUNTIME_CORES = {"onnxruntime": ("cortex-a72",), "tflite-micro": ("cortex-m4", "cortex-m7")}


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
    memory: Memory = field(default_factory=Memory)
    device: DeviceCheck = field(default_factory=DeviceCheck)
    firmware: Firmware = field(default_factory=Firmware)
    board: Board = field(default_factory=Board)

    def __post_init__(self):
        _choice("runtime", self.runtime, RUNTIMES)
        check_gradual(self.decomposition, self.finetune)
        cores = RUNTIME_CORES[self.runtime]
        if self.board.core not in ("", *cores):
            raise ConfigError(f"board.core {self.board.core!r} cannot be estimated for runtime {self.runtime}; known: "
                              f"{', '.join(cores)}, or \"\" for none")
        if self.board.core and self.firmware.cpu and self.board.core != self.firmware.cpu:
            raise ConfigError(f"board.core {self.board.core!r} differs from firmware.cpu {self.firmware.cpu!r}; "
                              "the firmware runs on the board's core: leave board.core empty")

    @property
    def core(self) -> str:
        """The core whose cycles are estimated: the board's, else the firmware's; "" = none."""
        return self.board.core or self.firmware.cpu

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def override(self, **sections: dict) -> "TargetProfile":
        """A copy with some settings replaced, e.g. `override(finetune={"epochs": 3})`; None values are
        left as they are (a flag not given), and the new values are validated like a profile's."""
        replaced = {}
        for section, values in sections.items():
            if section not in SECTIONS:
                raise unknown("profile section", section, SECTIONS)
            given = {k: v for k, v in values.items() if v is not None}
            replaced[section] = _build(SECTIONS[section], given, section, base=getattr(self, section))
        return dataclasses.replace(self, **replaced)


def known_targets(folder: Path = TARGETS_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml"))


ALIAS = "alias"  # a profile file that only names another: an older name kept for a board profile


def _build(cls, data: dict, where: str, *, base=None):
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - fields
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}; known: {', '.join(sorted(fields))}")
    switches = {f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
    for key in sorted(switches & set(data)):
        if not isinstance(data[key], bool):  # TOML's own true / false: a string "yes" would read as on
            raise ConfigError(f"{where}: {key} must be true or false; got {data[key]!r}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:  # a missing top-level key
        raise ConfigError(f"{where}: {exc}") from None


def _merge(base: dict, top: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in top.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def _resolve(data: dict, where: str) -> dict:
    """The profile's own values on top of its family base (`extends`), which sits on the common base."""
    family = data.pop("extends", None)
    if family is None:
        return data
    path = BASES_DIR / f"{family}.toml"
    bases = sorted(p.stem for p in BASES_DIR.glob("*.toml") if p.stem != ROOT_BASE)
    if family == ROOT_BASE or not path.is_file():
        raise unknown(f"{where}: base to extend", family, bases)
    return _merge(_resolve(_read(path), family), data)


def load_target(name: str, *, folder: Path = TARGETS_DIR, _alias_of: str | None = None) -> TargetProfile:
    """A target by name (`targets/<name>.toml`), or a board of the user's own as a path to a .toml file."""
    path = Path(name) if name.endswith(".toml") else folder / f"{name}.toml"
    if not path.is_file():
        raise unknown("target" if _alias_of is None else f"target (named by alias {_alias_of!r})", name,
                      known_targets(folder))
    data = _read(path)
    if ALIAS in data:
        if set(data) != {ALIAS} or not isinstance(data[ALIAS], str) or _alias_of is not None:
            raise ConfigError(f"{path.stem}: an alias file holds only `{ALIAS} = \"<target>\"`, naming a profile that "
                              f"is not itself an alias; got {sorted(data)}" + (f" via alias {_alias_of!r}" if _alias_of else ""))
        return load_target(data[ALIAS], folder=folder, _alias_of=path.stem)
    data = _resolve(data, path.stem)
    top = {k: v for k, v in data.items() if k not in SECTIONS}
    sections = {k: _build(cls, data.get(k, {}), f"{path.stem}.{k}") for k, cls in SECTIONS.items()}
    unknown_sections = [k for k, v in top.items() if isinstance(v, dict)]
    if unknown_sections:
        raise ConfigError(f"{path.stem}: unknown section {unknown_sections[0]!r}; known: {', '.join(sorted(SECTIONS))}")
    return _build(TargetProfile, {**top, **sections}, path.stem)
