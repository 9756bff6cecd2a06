"""Cycle estimation for the boards (shared by every target): the real runtime runs on the target's ISA in
emulation with a block-profile plugin of our own (`blockprof.c`), the guest marks what to count (one inference,
one operator), and every executed block is timed by LLVM's scheduling model of the target core (`llvm-mca`).

Deterministic: the same artefact gives the same figures on any host, loaded or idle (firmware exactly; ONNX
Runtime under qemu-user to a few parts in a million for whole models, ~6e-4 for small graphs under heavy load). What the estimate leaves out: caches, memory and flash wait
states, and (on the Pi) more than one core.
"""

from pipeline.cycles.cores import CORES, Core, core_named
from pipeline.cycles.estimate import Cost, board_figures, cost_of, estimate_segments
from pipeline.cycles.plugin import plugin_path
from pipeline.cycles.profile import Profile, read_profile

__all__ = ["CORES", "Core", "Cost", "board_figures", "Profile", "core_named", "cost_of", "estimate_segments", "plugin_path",
           "read_profile"]
