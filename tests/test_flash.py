"""`make flash`: the pyOCD command for a build's board image, and the errors a user without a board, a probe or
pyOCD meets (a board cannot be attached here: what runs is everything up to the probe)."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.device.flash import flash, flash_command
from pipeline.errors import DeviceError, InputError


def _build(tmp_path, board: str, name: str = "nucleo-l4r5zi") -> Path:
    out = tmp_path / name
    (out / "firmware").mkdir(parents=True)
    (out / "firmware" / "board.hex").write_text(":00000001FF\n")
    manifest = {"target_profile": {"name": name, "firmware": {"cpu": "cortex-m4" if board else "", "board": board}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_flash_command_names_the_boards_pyocd_target_and_image(tmp_path):
    out = _build(tmp_path, "nucleo-l4r5zi")
    assert flash_command(out) == (["flash", "-W", "-t", "stm32l4r5zitx", str(out / "firmware" / "board.hex")],
                                  "stm32l4r5zitx")
    assert flash_command(out, probe="0668FF")[0][4:6] == ["-u", "0668FF"]
    out = _build(tmp_path, "nucleo-h743zi", "nucleo-h743zi")
    assert flash_command(out)[1] == "stm32h743xx"  # built into pyOCD: no pack to install


def test_a_build_without_a_board_or_its_image_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"names no real board .*emulated board"):
        flash_command(_build(tmp_path, "", "cortex-m7"))
    out = _build(tmp_path, "nucleo-l4r5zi")
    (out / "firmware" / "board.hex").unlink()
    with pytest.raises(InputError, match=r"board.hex is missing"):
        flash_command(out)


def test_flashing_without_pyocd_or_without_a_probe_says_what_to_do(tmp_path):
    out = _build(tmp_path, "nucleo-l4r5zi")
    installed = shutil.which("pyocd") or Path(sys.executable).with_name("pyocd").is_file()
    expected = r"No debug probe is connected: plug in the board's ST-LINK" if installed else r"make setup-board"
    with pytest.raises(DeviceError, match=expected):
        flash(out, log=lambda *_: None)
