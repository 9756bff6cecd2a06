"""Settings and conditions the tests share."""

import contextlib
import subprocess
import sys

from targets import Decomposition


def plain(**overrides) -> Decomposition:
    """Decomposition settings without the profile's conveniences, so a test sees exactly the ranks it asks for:
    EVBMF ranks unless given, no rounding, and the first and last layers factored like any other."""
    return Decomposition(**{"rank": "evbmf", "round_to": 1, "keep_first_and_last": False, **overrides})


@contextlib.contextmanager
def busy_host(processes: int = 2, seconds: int = 300):
    """CPU-bound processes beside whatever runs inside: figures that must not depend on the host's load."""
    burners = [subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"])
               for _ in range(processes)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()


# The suite's own deploy: the small seednet with the profile's method and rank (no budget sweep), so a deploy takes
# seconds; a test that exercises a budget gives one.
SEEDNET = ("--model", "seednet")
NO_BUDGET = ("--budget", "none")


def firmware_missing() -> str | None:
    """Why a microcontroller deploy cannot build and time its firmware here (the apt toolchain, the cycle tools or
    the TFLM sources), or None: such tests skip with it, as the firmware tests do."""
    from pipeline.cycles.tools import missing
    from pipeline.errors import DeviceError
    from pipeline.tflm.build import check_toolchain, sources_root

    try:
        check_toolchain()
        sources_root()
    except DeviceError as exc:
        return str(exc)
    return missing("llvm-mca", "gcc", "qemu-system-arm")
