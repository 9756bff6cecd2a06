"""A profile's segments in instructions and estimated cycles on a core."""

import dataclasses
from collections import Counter
from dataclasses import dataclass

from pipeline.cycles.cores import Core
from pipeline.cycles.join import joined
from pipeline.cycles.mca import block_cycles
from pipeline.cycles.profile import Profile


@dataclass(frozen=True)
class Cost:
    instructions: int
    cycles: int  # estimated on the core: sum over blocks of executions x the block's llvm-mca cycles
    unmodelled_instructions: int = 0  # in blocks the core's model could not time, counted at one cycle each

    def ms(self, clock_mhz: float) -> float | None:
        return self.cycles / (clock_mhz * 1e3) if clock_mhz else None

    def scaled(self, divisor: int) -> "Cost":
        """One of `divisor` equal runs (N inferences counted together)."""
        return Cost(round(self.instructions / divisor), round(self.cycles / divisor),
                    round(self.unmodelled_instructions / divisor))


def cost_of(counts: Counter, profile: Profile, timing: dict) -> Cost:
    instructions = cycles = unmodelled = 0.0
    for block_id, executions in counts.items():
        block = profile.blocks[block_id]
        per_run, modelled = timing[block]
        instructions += executions * block.instructions
        cycles += executions * per_run
        unmodelled += 0 if modelled else executions * block.instructions
    return Cost(int(instructions), round(cycles), int(unmodelled))


def estimate_segments(profile: Profile, core: Core, groups: list[list[int]]) -> list[Cost]:
    """The cost of each group of segments (indices into `profile.segments`), all timed in one llvm-mca run, with
    the blocks QEMU cut where the code runs straight on timed whole (`join.joined`)."""
    whole = joined(profile, core)
    costs = []
    for group in groups:
        executed, run = Counter(), Counter()
        for index in group:
            executed.update(profile.segments[index])
            run.update(whole.segments[index])
        costs.append((executed, run))
    timing = block_cycles(core, {whole.blocks[b] for _, run in costs for b in run})
    # instructions as executed; cycles and what the model could not time on the joined blocks
    return [dataclasses.replace(cost_of(run, whole, timing),
                                instructions=sum(n * profile.blocks[b].instructions for b, n in executed.items()))
            for executed, run in costs]


def board_figures(cost: Cost, *, core: Core, clock_mhz: float, **extra) -> dict:
    """What report.json says of one inference on the board: instructions, estimated cycles and milliseconds."""
    ms = cost.ms(clock_mhz)
    return {"core": core.name, "clock_mhz": clock_mhz, "instructions": cost.instructions, "cycles": cost.cycles,
            "ms": round(ms, 4) if ms is not None else None,
            "unmodelled_share": round(cost.unmodelled_instructions / max(cost.instructions, 1), 5),
            "estimated_by": "llvm-mca on blocks executed in qemu", **extra}
