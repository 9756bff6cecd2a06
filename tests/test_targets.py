import re

import pytest

from pipeline.errors import ConfigError
from targets import TARGETS_DIR, known_targets, load_target


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"Unknown target 'rpi5'; known: .*rpi4"):
        load_target("rpi5")


def test_unknown_key_names_the_known_keys(tmp_path):
    (tmp_path / "board.toml").write_text('name = "board"\ndescription = "x"\nruntime = "onnxruntime"\n'
                                         "[quantization]\nreduce_rnage = true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'reduce_rnage'; known: .*reduce_range"):
        load_target("board", folder=tmp_path)


def test_a_bad_choice_names_the_allowed_values(tmp_path):
    (tmp_path / "board.toml").write_text('name = "board"\ndescription = "x"\nruntime = "tflite"\n')
    with pytest.raises(ConfigError, match="known: onnxruntime"):
        load_target("board", folder=tmp_path)


def test_rpi4_keeps_arm_int8_range():
    profile = load_target("rpi4")
    assert profile.quantization.reduce_range is False
    assert profile.quantization.activation_type == "uint8"


def test_microcontrollers_are_full_int8_with_budgets():
    for name in ("cortex-m4", "cortex-m7"):
        profile = load_target(name)
        assert profile.runtime == "tflite-micro" and profile.quantization.activation_type == "int8"
        assert 0 < profile.memory.ram_reserve_bytes < profile.memory.ram_bytes
    assert load_target("cortex-m4").memory.ram_bytes == 256 * 1024
    assert load_target("cortex-m7").memory.flash_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize("name", known_targets())
def test_every_profile_value_has_a_reason(name):
    assert load_target(name).name == name
    lines = (TARGETS_DIR / f"{name}.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+\s*=", line):
            assert lines[i - 1].startswith("#"), f"no reason given above {line!r}"
