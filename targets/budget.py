"""The budget language (`BUDGET=`, `[decomposition] budget`): one or more constraints joined by commas, all of
which must hold, e.g. `cycles:0.58,arena:40KiB`.

Its own home, importing nothing of the pipeline but its errors: the profile schema checks a budget when a profile
is read, and the allocator meets one, without either importing the other.
"""

import re
from dataclasses import dataclass

from pipeline.errors import ConfigError

# a constraint's resource, and what it counts
RESOURCES = {
    "macs": "multiply-accumulates of the conv and linear layers",
    "params": "parameters",
    "cycles": "the board's estimated cycles of the whole int8 model",
    "arena": "RAM for activations: the TFLite Micro arena on a microcontroller, the peak activation memory on a "
             "Linux board",
}
ALIASES = {"latency": "cycles"}  # BUDGET=latency:F, the earlier name, is a cycle budget
UNITS = {"B": 1, "KB": 1000, "KiB": 1024, "MB": 1000 ** 2, "MiB": 1024 ** 2}
EXAMPLES = "e.g. BUDGET=0.35, BUDGET=params:0.5, BUDGET=cycles:0.58,arena:40KiB"


@dataclass(frozen=True)
class Constraint:
    """One resource held to a fraction of the dense model's figure, or (arena only) to a number of bytes."""

    resource: str  # a key of RESOURCES
    fraction: float | None = None  # of the dense model's total, in (0, 1]
    limit_bytes: int | None = None  # an absolute arena limit

    def limit(self, dense: float) -> float:
        """The most this constraint allows, given the dense model's figure."""
        return float(self.limit_bytes) if self.limit_bytes is not None else self.fraction * dense

    def __str__(self) -> str:
        if self.limit_bytes is not None:
            kib = self.limit_bytes / 1024
            return f"{self.resource}:{kib:g}KiB" if kib == int(kib) else f"{self.resource}:{self.limit_bytes}B"
        return f"{self.resource}:{self.fraction:g}"


@dataclass(frozen=True)
class Budget:
    """Every constraint a compressed model must meet; the first is the one compression spends (its `fraction`
    is what intermediate budgets step down to), the others bound it."""

    constraints: tuple[Constraint, ...]

    @property
    def first(self) -> Constraint:
        return self.constraints[0]

    @property
    def resource(self) -> str:
        return self.first.resource

    @property
    def fraction(self) -> float | None:
        return self.first.fraction

    def get(self, resource: str) -> Constraint | None:
        return next((c for c in self.constraints if c.resource == resource), None)

    @property
    def resources(self) -> tuple[str, ...]:
        return tuple(c.resource for c in self.constraints)

    def with_first(self, fraction: float) -> "Budget":
        """The same budget with the first constraint at another fraction (a gradual step)."""
        first = Constraint(self.first.resource, fraction=fraction)
        return Budget((first, *self.constraints[1:]))

    def replacing(self, constraint: Constraint) -> "Budget":
        """This budget with `constraint` in place of the one on its resource (a tightened retry)."""
        return Budget(tuple(constraint if c.resource == constraint.resource else c for c in self.constraints))

    def adding(self, constraint: Constraint) -> "Budget":
        """This budget with `constraint` added, unless it already bounds that resource."""
        return self if self.get(constraint.resource) else Budget((*self.constraints, constraint))

    def __str__(self) -> str:
        return ",".join(map(str, self.constraints))


def _arena(text: str, value: str) -> Constraint:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(B|KB|KiB|MB|MiB)?\s*", value)
    if match is None:
        raise ConfigError(f"Budget {text!r}: arena {value!r}; expected bytes with a unit (40KiB, 40960B, 0.5MiB) or "
                          "a fraction of the dense model's arena in (0, 1] (arena:0.8)")
    number, unit = float(match.group(1)), match.group(2)
    if unit:
        limit = number * UNITS[unit]
        if limit < 1 or limit != int(limit):
            raise ConfigError(f"Budget {text!r}: arena {value!r} is {limit:g} bytes; expected a whole number of bytes")
        return Constraint("arena", limit_bytes=int(limit))
    if not 0 < number <= 1:
        raise ConfigError(f"Budget {text!r}: arena {value!r} is a bare number; give bytes with a unit (arena:{value}B, "
                          "arena:40KiB) or a fraction of the dense model's arena in (0, 1] (arena:0.8)")
    return Constraint("arena", fraction=number)


def _constraint(text: str, part: str) -> Constraint:
    resource, _, value = part.strip().rpartition(":")
    resource = ALIASES.get(resource.strip(), resource.strip() or "macs")
    if resource not in RESOURCES:
        raise ConfigError(f"Budget {text!r}: unknown resource {resource!r}; known: "
                          f"{', '.join([*RESOURCES, *ALIASES])} ({EXAMPLES})")
    if resource == "arena":
        return _arena(text, value)
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction <= 1:
        which = f"Budget {text!r}" if part.strip() == text.strip() else f"Budget {text!r}: {resource} {value!r}"
        raise ConfigError(f"{which}; expected the fraction of the dense model's {resource} to keep, in (0, 1] "
                          f"({EXAMPLES})")
    return Constraint(resource, fraction=fraction)


def parse_budget(text: str | float) -> Budget:
    """'0.35' (of MACs), 'macs:0.35', 'params:0.5', 'cycles:0.5' ('latency:0.5' is the same), 'arena:40KiB' or
    'arena:0.8', or several joined by commas ('cycles:0.58,arena:40KiB'), each resource at most once."""
    parts = [p for p in str(text).split(",")]
    if not str(text).strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"Budget {text!r}: expected one or more constraints joined by commas ({EXAMPLES})")
    constraints = tuple(_constraint(str(text), p) for p in parts)
    seen = [c.resource for c in constraints]
    repeated = sorted({r for r in seen if seen.count(r) > 1})
    if repeated:
        raise ConfigError(f"Budget {text!r} bounds {', '.join(repeated)} more than once; expected each resource once")
    return Budget(constraints)
