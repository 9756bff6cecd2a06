"""BUDGET= and FINETUNE_EPOCHS= through the whole deploy, and `make bench` on a small net."""

import json

import pytest
from helpers import SEEDNET

from pipeline.bench.run import bench
from pipeline.cli import main
from pipeline.compress.methods import METHODS
from pipeline.zoo import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, cifar_dir):
    root = tmp_path_factory.mktemp("budget")
    code = main(["deploy", *SEEDNET, "--data", str(cifar_dir), "--eval-samples", "200", "--budget", "0.95",
                 "--finetune-epochs", "1", "--out", str(root / "b"), "--quiet"])
    return json.loads((root / "b" / "report.json").read_text()), code


def test_the_budget_is_met_and_every_choice_explained(budgeted):
    report, code = budgeted
    assert code == (0 if report["passed"] else 1)
    variants, plan = report["variants"], report["decomposition"]
    # seednet on rpi4: every factorisation of conv2 costs more A72 cycles than the layer, so only fc1 is an option
    # (0.939 of the MACs at best)
    assert variants["factored_int8"]["macs"] <= 0.95 * variants["dense_fp32"]["macs"]
    assert plan["requested_method"] == "budget" and plan["allocation"]["budget"] == "macs:0.95"
    layers = {layer["name"]: layer for layer in plan["layers"]}
    assert layers["conv1"]["note"] == "the model's first compute layer (its stem): kept dense"
    chosen = [layer for layer in plan["layers"] if layer["method"] or layer["channels"] != layer["channels_before"]]
    assert chosen, "a budget of 0.95 must factor or cut something"
    for layer in plan["layers"]:
        if layer["name"] not in ("conv1", "fc3") or layer["channels"] != layer["channels_before"]:
            # a factored or kept layer says why; a cut one names its group and why that was cut
            assert layer["note"].startswith(("budget macs:0.95: ", "group ")) and "budget macs:0.95: " in layer["note"], layer
    net = load_model("seednet").module
    for layer in (layer for layer in chosen if layer["method"]):
        assert layer["output_error"] is not None  # fitted to data, not weights
        caps = METHODS[layer["method"]].max_ranks(net.get_submodule(layer["name"]))
        assert all(r % 8 == 0 or r == cap for r, cap in zip(layer["ranks"], caps, strict=True)), layer


def test_finetuning_is_recorded_with_its_cost(budgeted):
    report, _ = budgeted
    tuned = report["decomposition"]["finetune"]
    assert len(tuned["epochs"]) == 1 and tuned["seconds_per_epoch"] > 0 and tuned["bn"] == "reestimate"  # the default since it measured best
    assert tuned["best_heldout_top1"] >= tuned["start_heldout_top1"]
    assert report["decomposition"]["steps_seconds"]["finetune"] > 0


def test_a_second_budget_reuses_the_sensitivities(budgeted, tmp_path, cifar_dir, capsys):
    assert main(["deploy", *SEEDNET, "--data", str(cifar_dir), "--eval-samples", "100", "--budget", "0.97",
                 "--out", str(tmp_path / "c")]) in (0, 1)
    assert "(from the cache)" in capsys.readouterr().out
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["decomposition"]["allocation"]["sensitivity"]["cached"] is True
    assert report["variants"]["factored_int8"]["macs"] <= 0.97 * report["variants"]["dense_fp32"]["macs"]


def test_gradual_compression_through_the_deploy_is_recorded_and_reported(tmp_path, cifar_small):
    profile = tmp_path / "steps.toml"
    profile.write_text('name = "steps"\ndescription = "seednet by steps"\nruntime = "onnxruntime"\n'
                       "[decomposition]\ngradual = [0.9]\n[finetune]\nstep_epochs = 1\nema_decay = 0.99\n")
    assert main(["deploy", *SEEDNET, "--target", str(profile), "--data", str(cifar_small), "--eval-samples", "100", "--budget", "0.8",
                 "--finetune-epochs", "2", "--out", str(tmp_path / "d"), "--quiet"]) in (0, 1)
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    tuned, seconds = report["decomposition"]["finetune"], report["decomposition"]["steps_seconds"]
    assert [s["budget"] for s in tuned["steps"]] == ["macs:0.9"] and len(seconds["steps"]) == 2
    assert [e["budget"] for e in tuned["epochs"]] == ["macs:0.9", "macs:0.8"]
    assert report["variants"]["factored_int8"]["macs"] <= 0.8 * report["variants"]["dense_fp32"]["macs"]
    text = (tmp_path / "d" / "report.md").read_text()
    # seednet's two convs have no BatchNorm: each trains with one, folded into it after
    assert ("BatchNorm reestimate, adamw, weights averaged with decay 0.99, a BatchNorm for each of 2 convs without one, "
            "folded in after) by steps: macs:0.9 for 1 epochs") in text


def test_a_gradual_bench_point_is_kept_and_read_back_with_each_models_own_chains(tmp_path, cifar_small):
    profile = tmp_path / "steps.toml"
    profile.write_text('name = "steps"\ndescription = "seednet by steps"\nruntime = "onnxruntime"\n'
                       "[decomposition]\ngradual = [0.9]\n[finetune]\nstep_epochs = 1\n")
    run = dict(models=("seednet",), budgets=(0.8,), epochs=2, targets=(str(profile),), data=str(cifar_small),
               eval_samples=200, out=str(tmp_path / "bench"), latency_rounds=1, log=lambda *_: None)
    first = json.loads(bench(**run).read_text())
    again = json.loads(bench(**run).read_text())  # from bench/work: the one-shot and tuned models differ in shape
    assert again["compress_seconds"] < first["compress_seconds"] / 3  # read back, not compressed again
    top1 = lambda results: {r["variant"]: r["top1"] for r in results["models"][0]["rows"]}  # noqa: E731
    assert top1(again) == top1(first) and set(top1(first)) >= {"b0.8_oneshot_int8", "b0.8_finetuned_int8"}


def test_bench_writes_results_report_and_plot(tmp_path, cifar_small):
    path = bench(models=("seednet",), budgets=(0.95,), epochs=1, data=str(cifar_small), eval_samples=300,
                 out=str(tmp_path / "bench"), latency_rounds=2, log=lambda *_: None)
    results = json.loads(path.read_text())
    rows = {r["variant"]: r for r in results["models"][0]["rows"]}
    assert set(rows) == {"dense_fp32", "dense_int8", "b0.95_oneshot_fp32", "b0.95_oneshot_int8",
                         "b0.95_finetuned_fp32", "b0.95_finetuned_int8"}
    assert rows["dense_int8"]["speedup"] == 1.0 and rows["dense_fp32"]["macs_kept"] == 1.0
    assert rows["b0.95_oneshot_int8"]["macs_kept"] <= 0.95
    assert rows["b0.95_finetuned_int8"]["finetune_s"] > 0 and rows["b0.95_oneshot_int8"]["finetune_s"] is None
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "| b0.95_finetuned_int8 |" in report and "speedup / MAC red." in report
    assert "Fine-tuned 1 epochs by distillation" in report
    assert (tmp_path / "bench" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,words", [(["--budgets", "0.5", "1.5"], "Budget '1.5'; expected the fraction"),
                                        (["--epochs", "3", "1", "1"], "--epochs got 3 counts for 2 models"),
                                        (["--epochs", "-1"], "FINETUNE_EPOCHS=-1; expected 0 or positive counts"),
                                        (["--threads", "-1"], "TASK_THREADS=-1; expected a positive thread count"),
                                        (["--target", "rpi4", "rpi9"], "Unknown target 'rpi9'; known:"),
                                        (["--target", "rpi4", "rpi4"], "names profiles rpi4, rpi4; expected each")])
def test_bench_refuses_bad_settings_before_any_work(argv, words, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_published_results_are_set_beside_our_best_int8_model_removing_as_many_macs():
    from pipeline.bench.report import _anchors

    def row(variant, kept, top1, tuned=True, precision="int8"):
        return {"variant": variant, "budget": 0.5, "macs_kept": kept, "top1": top1, "finetuned": tuned,
                "precision": precision}

    entry = {"finetune_epochs": 10, "published": [{"method": "TRP", "macs_removed": 0.65, "top1": 0.9062},
                                                  {"method": "far", "macs_removed": 0.9, "top1": 0.5}],
             "rows": [row("dense_int8", 1.0, 0.917), row("b0.35_finetuned_int8", 0.349, 0.905),
                      row("b0.3_oneshot_int8", 0.30, 0.80, tuned=False), row("b0.35_finetuned_fp32", 0.349, 0.95, precision="fp32"),
                      row("b0.5_finetuned_int8", 0.5, 0.91)]}
    entry["rows"][0]["budget"] = None
    table = _anchors(entry)
    assert "| TRP       | 65%          | 90.62% | b0.35_finetuned_int8: 65.1% fewer, 90.50% (-0.12 pt), 10 epochs |" in table
    assert "| far       | 90%          | 50.00% | -" in table
