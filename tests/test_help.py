"""The help is written from the registries, so it names every command, method, budget form, target and zoo
model there is; make and the CLI run the same default model and budget."""

import subprocess
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.compress.methods import METHODS
from pipeline.deploy import DEFAULT_BUDGET, DEFAULT_MODEL, NO_BUDGET, default_budget
from pipeline.zoo import ZOO
from targets import known_targets
from targets.budget import ALIASES, RESOURCES

REPO = Path(__file__).resolve().parents[1]


def help_of(*command: str) -> str:
    """The options part of a command's help, on one line (argparse wraps to the terminal's COLUMNS)."""
    parser = build_parser()
    for name in command:  # the subcommand's own parser
        parser = next(a for a in parser._subparsers._group_actions).choices[name]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "100000")
        text = parser.format_help()
    return text[text.index("\n\n"):]  # past the usage line


def test_the_top_help_names_every_command():
    commands = next(a for a in build_parser()._subparsers._group_actions).choices
    assert {"deploy", "firmware", "regress", "bench", "mlperf-tiny", "decompose", "train", "setup-device"} <= set(commands)
    text = help_of()
    assert all(name in text for name in commands)


@pytest.mark.parametrize("command", ["deploy", "decompose"])
def test_option_helps_name_every_registered_choice(command):
    text = help_of(command)
    method_help = text[text.index("--method METHOD"):text.index("--rank RANK")]
    assert all(name in method_help for name in METHODS), method_help
    budget_help = text[text.index("--budget BUDGET"):]
    assert all(f"{r}:F" in budget_help for r in RESOURCES) and all(f"{a}:" in budget_help for a in ALIASES)
    target_help = text[text.index("--target TARGET"):]
    assert all(name in target_help for name in known_targets())
    model_help = text[text.index("--model MODEL"):]
    assert all(name in model_help for name in ZOO) and f"(default: {DEFAULT_MODEL})" in model_help


def test_every_command_with_a_target_lists_the_profiles():
    for command in ("deploy", "regress", "firmware", "decompose", "bench", "mlperf-tiny"):
        text = help_of(command)
        assert all(name in text for name in known_targets()), command


def test_make_and_the_cli_run_the_same_default():
    """make passes MODEL and BUDGET only when given, so the CLI's defaults are make's."""
    dry = subprocess.run(["make", "-n", "--no-print-directory", "deploy", "TARGET=rpi4"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    line = next(line for line in dry.splitlines() if "cnn-deploy deploy" in line)
    assert "--model" not in line and "--budget" not in line, line
    args = build_parser().parse_args(["deploy"])
    assert args.model == DEFAULT_MODEL and args.budget is None
    assert default_budget(None, method=None, rank=None, profile_budget="") == DEFAULT_BUDGET
    assert default_budget(None, method=None, rank=None, profile_budget="params:0.5") == "params:0.5"
    assert default_budget(None, method="cp", rank=None, profile_budget="") == ""
    assert default_budget(NO_BUDGET, method=None, rank=None, profile_budget="0.5") == ""
    assert default_budget("cycles:0.8", method="cp", rank=None, profile_budget="") == "cycles:0.8"
