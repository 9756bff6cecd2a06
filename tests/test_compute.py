"""Where torch work runs: auto picks the CPU on a machine without CUDA, cuda asked for there is one clear error,
the report names the device, and a Ray job asks for a GPU when the profile's torch work runs on CUDA."""

import dataclasses
import shutil
import threading

import pytest
import torch
from test_finetune import colour_data, trained
from torch import nn

from pipeline.bench.run import Cell, grid_job
from pipeline.cli import main
from pipeline.cluster.jobs import Ray
from pipeline.compress.stage import compress
from pipeline.compute import CPU, TorchDevice, gpus_asked, prefetch, torch_device
from pipeline.errors import ConfigError
from pipeline.report.deploy_report import _compression_lines
from pipeline.zoo import ModelSpec
from targets import TARGETS_DIR, Decomposition, Finetune, load_target

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


@no_cuda
def test_auto_is_the_cpu_here_and_cuda_is_a_clear_error():
    assert torch_device("auto") is CPU and torch_device("cpu") is CPU
    assert CPU.about() == {"torch_device": "cpu", "mixed_precision": False, "deterministic": True}
    with pytest.raises(ConfigError, match=r"TORCH_DEVICE=cuda, but no CUDA device is available: this torch "
                                          r"\(2\.13\.0\+cpu\) is a CPU build; expected auto or cpu here"):
        torch_device("cuda")
    with pytest.raises(ConfigError, match="TORCH_DEVICE=cuda:1"):
        torch_device("cuda:1")


def test_a_device_name_is_checked_when_the_profile_is_read():
    for bad in ("gpu", "cuda:x", "cpu:0", "mps"):
        with pytest.raises(ConfigError, match=f"Torch device '{bad}'; expected auto, cpu, cuda or cuda:N"):
            Finetune(device=bad)
    assert Finetune(device="cuda:3").device == "cuda:3"  # resolved (and refused if absent) only when used
    assert load_target("rpi4").finetune.device == "auto"


@no_cuda
def test_a_deploy_asking_for_cuda_here_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "build"
    assert main(["deploy", "--model", "seednet", "--torch-device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "TORCH_DEVICE=cuda, but no CUDA device is available" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_record_and_the_report_name_the_device():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    train = colour_data(600, 4)
    spec = ModelSpec("colours", trained(net, train, steps=30, lr=0.02), (3, 8, 8), (0.5,) * 3, (1.0,) * 3)
    result = compress(spec, train, settings=Decomposition(budget="0.6", keep_first_and_last=False), progress=False,
                      use_cache=False, tuning=Finetune(epochs=1, lr=1e-2, batch_size=32, device="auto"),
                      log=lambda _: None)
    record = result.record()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert record["torch"]["torch_device"].startswith(expected)
    assert result.finetune["torch_device"].startswith(expected) and result.finetune["deterministic"] in (True, False)
    text = "\n".join(_compression_lines(record))
    assert f"ran on {record['torch']['torch_device']}" in text and f"this host's {expected}" in text
    assert next(result.model.parameters()).device.type == "cpu"  # whatever ran where, the model comes back here


def test_a_ray_bench_job_asks_for_a_gpu_when_the_profile_says_cuda(tmp_path):
    """Checked on the task's options: no GPU or Ray head is needed to see what would be asked."""
    profile = tmp_path / "pi-on-gpu.toml"
    shutil.copy(TARGETS_DIR / "rpi4.toml", profile)
    text = profile.read_text().replace('name = "rpi4"', 'name = "pi-on-gpu"')
    profile.write_text(text + '\n[finetune]\n# fine-tuning on the cluster\'s GPU nodes\ndevice = "cuda"\n')
    jobs = {target: grid_job(Cell("resnet20", str(target), 10, None, None, None), 0.35, spec=None, train=None,
                             shipped={}, threads=4) for target in (profile, TARGETS_DIR / "rpi4.toml")}
    gpu, cpu = (Ray.task_options(jobs[t]) for t in jobs)
    assert gpu["num_gpus"] == 1 and gpu["num_cpus"] == 4
    assert cpu["num_gpus"] == 0  # "auto" asks for none: a node without a GPU may take it
    assert [gpus_asked(d) for d in ("cuda", "cuda:1", "auto", "cpu")] == [1, 1, 0, 0]


def test_prefetch_keeps_the_order_and_raises_the_workers_error():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(prefetch(failing()))
    before = threading.active_count()
    for item in prefetch(iter(range(1000)), depth=2):  # the consumer stops early: the worker ends too
        if item == 3:
            break
    assert threading.active_count() == before


def test_training_says_where_it_ran_and_returns_the_model_on_the_cpu(tmp_path):
    from pipeline.zoo.train import train

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    spec = ModelSpec("colours", net, (3, 8, 8), (0.5,) * 3, (1.0,) * 3)
    result = train(spec, colour_data(256, 1), test_set=colour_data(64, 2), epochs=1, batch_size=32, lr=0.05,
                   device="cpu", out=tmp_path / "w.pt")
    assert result["torch_device"] == "cpu" and result["deterministic"] and 0 <= result["top1"] <= 1
    assert next(spec.module.parameters()).device.type == "cpu" and (tmp_path / "w.pt").is_file()


ACCELERATOR_PATH = TorchDevice(torch.device("cpu"), "cpu (accelerator path)", mixed_precision=False, deterministic=True,
                               accelerated=True)


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_the_accelerator_path_does_the_cpu_paths_arithmetic(monkeypatch, mixed_precision):
    """The CUDA branch (copies to the device, prefetched batches, the sweep in this process, the fit's forward
    passes on the device), run on the CPU: in fp32 it must give the CPU path's model bit for bit; with bf16 a
    model that still learns. What it cannot show without a GPU: that no tensor is left on the wrong device."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    train = colour_data(600, 4)
    spec = ModelSpec("colours", trained(net, train, steps=30, lr=0.02), (3, 8, 8), (0.5,) * 3, (1.0,) * 3)

    def run():
        return compress(spec, train, settings=Decomposition(budget="0.6", keep_first_and_last=False), progress=False,
                        use_cache=False, tuning=Finetune(epochs=2, lr=1e-2, batch_size=32, mixup=0.2),
                        log=lambda _: None)

    plain = run()
    device = dataclasses.replace(ACCELERATOR_PATH, mixed_precision=mixed_precision)
    for module in ("pipeline.compress.stage", "pipeline.compress.finetune"):
        monkeypatch.setattr(f"{module}.torch_device", lambda *_a, **_k: device)
    accelerated = run()
    assert accelerated.record()["torch"]["torch_device"] == "cpu (accelerator path)"
    assert next(accelerated.model.parameters()).device.type == "cpu"
    assert [(p.name, p.method, p.ranks) for p in accelerated.plan.layers] == \
        [(p.name, p.method, p.ranks) for p in plain.plan.layers]
    if mixed_precision:
        losses = [e["loss"] for e in accelerated.finetune["epochs"]]
        assert losses[1] < losses[0] and accelerated.finetune["best_heldout_top1"] >= 0.9
        assert accelerated.record()["torch"]["mixed_precision"] is True
    else:
        assert all(torch.equal(a, b) for a, b in zip(accelerated.model.state_dict().values(),
                                                     plain.model.state_dict().values(), strict=True))
        assert accelerated.finetune["epochs"] == [{**e, "seconds": a["seconds"]} for e, a in
                                                  zip(plain.finetune["epochs"], accelerated.finetune["epochs"],
                                                      strict=True)]
