import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from targets import TARGETS_DIR, Decomposition, Thresholds, known_targets, load_target
from targets.schema import BASES_DIR, SECTIONS


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
    for name in ("nucleo-l4r5zi", "nucleo-h743zi", "nrf52840"):
        profile = load_target(name)
        assert profile.runtime == "tflite-micro" and profile.quantization.activation_type == "int8"
        assert 0 < profile.memory.ram_reserve_bytes < profile.memory.ram_bytes
        assert profile.core == profile.firmware.cpu and profile.board.clock_mhz > 0
    l4, h7, nrf = (load_target(n) for n in ("nucleo-l4r5zi", "nucleo-h743zi", "nrf52840"))
    assert (l4.core, l4.board.clock_mhz, l4.memory.ram_bytes, l4.memory.flash_bytes) == ("cortex-m4", 120, 640 * 1024,
                                                                                        2 * 1024 * 1024)
    # the arena gets the one contiguous 512 KB AXI SRAM, not the H743's 1 MB in five blocks
    assert (h7.core, h7.board.clock_mhz, h7.memory.ram_bytes) == ("cortex-m7", 480, 512 * 1024)
    assert (nrf.core, nrf.board.clock_mhz, nrf.memory.ram_bytes) == ("cortex-m4", 64, 256 * 1024)
    rpi4 = load_target("rpi4")
    assert (rpi4.core, rpi4.board.clock_mhz) == ("cortex-a72", 1500)


def test_the_old_core_names_are_the_nucleo_boards():
    assert load_target("cortex-m4") == load_target("nucleo-l4r5zi")
    assert load_target("cortex-m7") == load_target("nucleo-h743zi")


def test_an_alias_names_one_real_profile(tmp_path):
    (tmp_path / "a.toml").write_text('alias = "b"\n')
    (tmp_path / "b.toml").write_text('alias = "a"\n')
    with pytest.raises(ConfigError, match="b: an alias file holds only .* via alias 'a'"):
        load_target("a", folder=tmp_path)
    (tmp_path / "c.toml").write_text('alias = "nowhere"\n')
    with pytest.raises(ConfigError, match="Unknown target \\(named by alias 'c'\\) 'nowhere'; known: a, b, c"):
        load_target("c", folder=tmp_path)
    (tmp_path / "d.toml").write_text('alias = "b"\nname = "d"\n')
    with pytest.raises(ConfigError, match="d: an alias file holds only"):
        load_target("d", folder=tmp_path)


def test_a_board_core_the_runtime_cannot_be_estimated_on_is_refused(tmp_path):
    (tmp_path / "pi.toml").write_text('name = "pi"\ndescription = "x"\nruntime = "onnxruntime"\n'
                                      '[board]\ncore = "cortex-m4"\n')
    with pytest.raises(ConfigError, match="board.core 'cortex-m4' cannot be estimated for runtime onnxruntime; known: cortex-a72, or"):
        load_target("pi", folder=tmp_path)
    (tmp_path / "mcu.toml").write_text('name = "mcu"\ndescription = "x"\nextends = "microcontroller"\n'
                                       '[firmware]\ncpu = "cortex-m4"\n[board]\ncore = "cortex-m7"\n')
    with pytest.raises(ConfigError, match="board.core 'cortex-m7' differs from firmware.cpu 'cortex-m4'"):
        load_target("mcu", folder=tmp_path)


RECIPES = sorted((TARGETS_DIR / "recipes").glob("*.toml"))
PROFILE_FILES = sorted(TARGETS_DIR.glob("*.toml")) + sorted(BASES_DIR.glob("*.toml")) + RECIPES


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_profile_and_base_value_has_a_reason(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+\s*=", line):
            assert lines[i - 1].startswith("#"), f"{path.name}: no reason given above {line!r}"


ALIASES = {"cortex-m4", "cortex-m7"}


@pytest.mark.parametrize("name", sorted(set(known_targets()) - ALIASES))
def test_profiles_load_under_their_own_name(name):
    assert load_target(name).name == name


def test_the_common_base_holds_every_setting_and_nothing_else():
    data = tomllib.loads((BASES_DIR / "common.toml").read_text())
    for section, cls in SECTIONS.items():
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_load_by_path_under_their_own_name_and_are_not_boards(path):
    assert load_target(str(path)).name == path.stem and path.stem not in known_targets()


def test_profiles_state_only_what_differs_from_their_base():
    for path in [*TARGETS_DIR.glob("*.toml"), *RECIPES]:
        own = tomllib.loads(path.read_text())
        family = tomllib.loads((BASES_DIR / f"{own['extends']}.toml").read_text()) if "extends" in own else {}
        for section, values in own.items():
            if isinstance(values, dict):
                defaults = {**dataclasses.asdict(SECTIONS[section]()), **family.get(section, {})}
                same = [k for k, v in values.items() if defaults[k] in (v, tuple(v) if isinstance(v, list) else v)]
                assert not same, f"{path.name} [{section}] restates {same}"


def test_a_family_base_is_inherited_and_the_profile_wins(tmp_path):
    (tmp_path / "mine.toml").write_text('name = "mine"\ndescription = "x"\nextends = "microcontroller"\n'
                                        "[memory]\nram_bytes = 131072\nflash_bytes = 524288\n"
                                        '[quantization]\ncalibration_method = "percentile"\n')
    profile = load_target(str(tmp_path / "mine.toml"))
    assert profile.runtime == "tflite-micro" and profile.quantization.activation_type == "int8"
    assert profile.quantization.calibration_method == "percentile" and profile.memory.ram_bytes == 131072
    assert profile.device.default == "tflm" and profile.decomposition.round_to == 8  # family, then common


def test_an_unknown_base_names_the_known_ones(tmp_path):
    (tmp_path / "b.toml").write_text('name = "b"\ndescription = "x"\nextends = "cortex-a"\n')
    with pytest.raises(ConfigError, match=r"Unknown b: base to extend 'cortex-a'; known: microcontroller"):
        load_target("b", folder=tmp_path)


def test_settings_are_validated_when_built_from_a_profile_an_override_or_code():
    profile = load_target("rpi4")
    with pytest.raises(ConfigError, match="Unknown method 'pca'; known: channel-svd, cp, prune, slice-svd, svd, tucker2"):
        profile.override(decomposition={"method": "pca"})
    with pytest.raises(ConfigError, match="FINETUNE_EPOCHS=-1"):
        profile.override(finetune={"epochs": -1})
    with pytest.raises(ConfigError, match="unknown key 'rnak'"):
        profile.override(decomposition={"rnak": "0.5"})
    with pytest.raises(ConfigError, match="Budget 'half'"):
        Decomposition(budget="half")
    assert profile.override(decomposition={"method": None}).decomposition == profile.decomposition  # not given


def test_the_threshold_check_names_every_miss_and_skips_what_was_not_measured():
    t = Thresholds(max_top1_drop=0.02, min_agreement=0.9, min_ort_agreement=0.97, max_output_diff_steps=16.0)
    assert t.failures(top1_drop=0.02) == []
    assert t.failures(top1_drop=0.025, agreement=0.85, ort_agreement=0.99, max_output_diff_steps=17) == [
        "top-1 drop 2.50 points > 2.00 allowed", "agreement with dense_fp32 85.00% < 90.00%",
        "TFLM output differs from ONNX Runtime int8 by 17 steps > 16"]


def test_the_readmes_own_board_example_loads(tmp_path):
    """The profile the README shows a user is a working profile."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```toml\n")[1].split("```")[0]
    path = tmp_path / "my-m4.toml"
    path.write_text(example)
    profile = load_target(str(path))
    assert profile.name == "my-m4" and profile.runtime == "tflite-micro" and profile.core == "cortex-m4"
    assert profile.memory.ram_bytes == 131072 and profile.board.clock_mhz == 180.0
    assert profile.firmware.board == ""  # a core without a board layer: the emulated board only


def test_a_switch_that_is_not_true_or_false_is_refused(tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text('name = "bad"\ndescription = "x"\nruntime = "onnxruntime"\n[decomposition]\ncut_then_factor = "yes"\n')
    with pytest.raises(ConfigError, match=r"bad.decomposition: cut_then_factor must be true or false; got 'yes'"):
        load_target(str(profile))
