"""The one exception family of the pipeline.

Every error a user can cause is a `PipelineError`: the CLI prints its message (what was got, what was
expected, what is known) and exits non-zero without a traceback unless `--debug` is given.
"""


class PipelineError(Exception):
    """A failure the user can act on; the message says what was got and what was expected."""


class ConfigError(PipelineError):
    """Unknown target, model, method or key; a value out of range."""


class BudgetOutOfReach(ConfigError):
    """A budget below what the model's options can reach; `floors` holds each constrained resource's floor as a
    fraction of the dense model's, for callers that try another budget or report it."""

    def __init__(self, message: str, *, floors: dict[str, float] | None = None):
        super().__init__(message)
        self.floors = dict(floors or {})

    def __reduce__(self):  # picklable with its floors (Ray carries errors between processes)
        return type(self), (str(self),), {"floors": self.floors}


class InputError(PipelineError):
    """Missing or malformed checkpoint, data set or model file."""


class StageError(PipelineError):
    """A stage ran but its result failed a check (tolerance, budget, threshold)."""


class DeviceError(PipelineError):
    """A device could not be set up, reached or run; the message says what to do."""


class ClusterError(PipelineError):
    """A Ray cluster could not be reached, or a task on it was lost twice or failed; names the task and node."""


def unknown(kind: str, got: str, known) -> ConfigError:
    """`Unknown target 'rpi5'; known: cortex-m7, rpi4`."""
    return ConfigError(f"Unknown {kind} {got!r}; known: {', '.join(sorted(known))}")
