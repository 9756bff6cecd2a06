"""`cnn-deploy families`: factorisation only, channel pruning only and both at one budget, side by side."""

import json

import pytest
from helpers import SEEDNET

from pipeline.bench.families import family_candidates, report_text
from pipeline.cli import main
from pipeline.compress.methods import PRUNE
from pipeline.deploy import deploy
from pipeline.errors import BudgetOutOfReach


def test_each_family_names_its_methods():
    profile = ("tucker2", "svd", PRUNE)
    assert family_candidates("factorisation", profile) == ["tucker2", "svd"]
    assert family_candidates("pruning", profile) == [PRUNE]
    assert family_candidates("both", ("svd",)) == ["svd", PRUNE]


def test_a_refused_family_shows_its_floor():
    row = {"model": "m", "target": "rpi4", "core": "cortex-a72", "family": "factorisation", "refused": "...",
           "floors": {"cycles": 0.5741}}
    text = report_text({"budget": "cycles:0.5", "finetune_epochs": 0, "eval_samples": 100, "host": "h",
                        "wall_seconds": 1.0, "rows": [row]})
    cells = [c.strip() for c in text.splitlines()[-1].split("|")[1:-1]]
    assert cells[:4] == ["rpi4 (cortex-a72)", "factorisation", "out of reach", "floor: cycles 0.574"]


@pytest.mark.slow
def test_a_factorisation_only_budget_below_its_floor_is_refused_with_the_floor(cifar_dir, tmp_path):
    # seednet on rpi4: conv2's factorisations cost more A72 cycles than the layer, so fc1 alone can be factored
    with pytest.raises(BudgetOutOfReach) as refused:
        deploy(target="rpi4", model="seednet", budget="macs:0.93", candidates=["svd", "tucker2"], data=str(cifar_dir),
               eval_samples=50, out=tmp_path / "b", progress=False)
    assert refused.value.floors["macs"] == pytest.approx(0.939, abs=0.001)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_three_families_at_one_budget_side_by_side(cifar_dir, tmp_path, capsys):
    out = tmp_path / "families"
    assert main(["families", "--models", SEEDNET[1], "--target", "rpi4", "--budget", "macs:0.95", "--data",
                 str(cifar_dir), "--eval-samples", "100", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["family"]: r for r in results["rows"]}
    assert list(rows) == ["factorisation", "pruning", "both"]
    for family, row in rows.items():
        assert row["macs_kept"] <= 0.95 and row["ram_bytes"] > 0 and row["cycles"] > 0, row
        report = json.loads((out / row["build"] / "report.json").read_text())
        layers = report["decomposition"]["layers"]
        cut = any(layer["channels"] != layer["channels_before"] for layer in layers)
        factored = any(layer["method"] not in (None, PRUNE) for layer in layers)
        assert (cut, factored) != (True, True) or family == "both", (family, layers)
        assert not cut or family != "factorisation"
        assert not factored or family != "pruning"
        assert row["top1"] == report["variants"]["factored_int8"]["top1"]
    assert "## seednet" in (out / "report.md").read_text() and "| pruning " in capsys.readouterr().out


def test_bad_settings_are_refused_before_any_build(tmp_path, capsys):
    for args, error in ((["--models", "resnet9"], "error: MODELS=resnet9: not zoo models; known: seednet"),
                        (["--eval-samples", "-1"], "error: EVAL_SAMPLES=-1; expected 0"),
                        (["--budget", "cycles:2"], "error: ")):
        assert main(["families", *args, "--target", "rpi4", "--out", str(tmp_path / "f")]) == 2
        assert capsys.readouterr().err.startswith(error)
        assert not (tmp_path / "f").exists()
