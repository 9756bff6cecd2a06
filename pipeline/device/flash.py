"""`make flash`: a microcontroller build's board image (firmware/board.hex) programmed into its board through the
board's debug probe (the NUCLEO boards' on-board ST-LINK) with pyOCD, pinned in the `board` extra."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import DeviceError, InputError
from pipeline.tflm.boards import board_named

PYOCD = "pyocd==0.46.0"  # as pinned in pyproject.toml's `board` extra


def _pyocd() -> str:
    found = shutil.which("pyocd") or str(Path(sys.executable).with_name("pyocd"))
    if not Path(found).is_file():
        raise DeviceError(f"pyOCD is not installed: `make setup-board` (pip install '.[board]', {PYOCD}); or flash "
                          "firmware/board.elf with OpenOCD: openocd -f interface/stlink.cfg -f target/<part>.cfg "
                          "-c 'program board.elf verify reset exit'")
    return found


def _run(argv: list[str], what: str, timeout: float = 600) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"pyOCD did not finish {what} in {timeout:.0f} s") from exc
    if done.returncode:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise DeviceError(f"pyOCD could not {what}: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout


def flash_command(build_dir: Path, *, probe: str = "") -> tuple[list[str], str]:
    """The pyOCD command that programs the build's board image, and the pyOCD target it needs."""
    try:
        profile = json.loads((build_dir / "manifest.json").read_text())["target_profile"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{build_dir} holds no complete build ({exc}); run `make deploy` first") from exc
    board = (profile.get("firmware") or {}).get("board", "")
    if not board:
        raise InputError(f"Target {profile['name']!r} names no real board ([firmware] board): there is nothing to "
                         "flash; its firmware runs on the emulated board (`make regress DEVICE=qemu`)")
    image = build_dir / "firmware" / "board.hex"
    if not image.is_file():
        raise InputError(f"{image} is missing; deploy again with the arm-none-eabi toolchain installed")
    target = board_named(board).pyocd_target
    return ["flash", "-W", "-t", target, *(["-u", probe] if probe else []), str(image)], target


def flash(build_dir: str | Path, *, probe: str = "", log=print) -> None:
    """Program `build_dir`'s board.hex into the board on the first probe attached (or the probe with this unique
    ID), installing the target's CMSIS pack first where pyOCD does not build the target in."""
    args, target = flash_command(Path(build_dir), probe=probe)
    pyocd = _pyocd()
    probes = _run([pyocd, "list", "--probes"], "list the debug probes")
    if "No available debug probes" in probes or (probe and probe not in probes):
        raise DeviceError(f"No debug probe{' ' + probe if probe else ''} is connected: plug in the board's ST-LINK USB "
                          "(`pyocd list` shows what is attached)")
    if target not in _run([pyocd, "list", "--targets"], "list its targets"):
        log(f"[flash] installing pyOCD's pack for {target} (downloads ST's device pack once)")
        _run([pyocd, "pack", "install", target], f"install the pack for {target}")
        if target not in _run([pyocd, "list", "--targets"], "list its targets"):
            raise DeviceError(f"pyOCD found no pack for {target} (`pyocd pack install {target}` needs the internet "
                              "once); or flash firmware/board.elf with OpenOCD or STM32CubeProgrammer")
    log(f"[flash] pyocd {' '.join(args)}")
    _run([pyocd, *args], f"flash {args[-1]} ({target}): is the board plugged in, and its ST-LINK free?")
