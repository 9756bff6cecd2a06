"""Target profiles: the schema (`targets.schema`), the shared bases (`targets/base/`) and one TOML file per
board, stating only what differs from its base, each value with its reason."""

from targets.schema import (
    TARGETS_DIR,
    Board,
    Decomposition,
    DeviceCheck,
    Evaluation,
    Finetune,
    Firmware,
    Memory,
    Quantization,
    TargetProfile,
    Thresholds,
    check_gradual,
    known_targets,
    load_target,
)

__all__ = ["TARGETS_DIR", "Board", "Decomposition", "DeviceCheck", "Evaluation", "Finetune", "Firmware", "Memory", "Quantization",
           "TargetProfile", "Thresholds", "check_gradual", "known_targets", "load_target"]
