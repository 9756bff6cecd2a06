"""Ray: a real local head on 127.0.0.1 (2 CPUs, fake boards), jobs retried once, boards asked for by name, and
the sensitivity sweep, a bench grid and a device regression giving exactly the local run's results."""

import builtins
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="needs the [cluster] extra: make setup-cluster")
from helpers import NO_BUDGET, SEEDNET  # noqa: E402
from ray import cloudpickle  # noqa: E402

from calib import load_dataset, preprocess  # noqa: E402
from pipeline.bench.run import bench  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.cluster import Job, board_resource, connect  # noqa: E402
from pipeline.compress.budget.sensitivity import sensitivities  # noqa: E402
from pipeline.device.regress import regress_all  # noqa: E402
from pipeline.errors import ClusterError, ConfigError  # noqa: E402
from pipeline.zoo import load_model  # noqa: E402
from targets import load_target  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BOARDS = {"board:rpi4-qemu": 1, "board:cortex-m4-qemu": 1}
# the jobs below are defined here, not in an installed package: workers get them by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with its own temp dir (short: Ray's socket paths must stay under 107 characters) and
    ports, stopped by its pid."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = _free_port()
    log = temp / "head.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={port}", "--num-cpus=2", f"--resources={json.dumps(BOARDS)}", f"--temp-dir={temp}",
               "--include-dashboard=false", "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}"]
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"the Ray head did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def on_ray(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    return ray_head


def _dies_once(marker: str) -> str:
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)  # what a killed worker or a lost node looks like to Ray
    return "second try"


def _always_dies():
    os._exit(1)


def _refuses():
    raise ConfigError("Unknown method 'svd9'; known: cp, svd")


def _threads_and_square(x: int) -> tuple[int, int]:
    return torch.get_num_threads(), x * x


def test_ray_address_without_a_head_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    assert not ray.is_initialized(), "this test runs before any other connects"
    with pytest.raises(ClusterError, match=r"^RAY_ADDRESS=127\.0\.0\.1:\d+: no Ray cluster answered"):
        connect()


def test_without_ray_address_jobs_run_here_with_their_thread_count(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = connect()
    assert cluster.name == "local"
    before = torch.get_num_threads()
    assert cluster.run([Job(f"square {i}", _threads_and_square, (i,), threads=1) for i in range(3)], desc="t",
                       progress=False) == [(1, 0), (1, 1), (1, 4)]
    assert torch.get_num_threads() == before


def test_jobs_run_as_tasks_in_order_and_name_their_nodes(on_ray):
    said = []
    cluster = connect()
    assert cluster.name == "ray"
    assert cluster.run([Job(f"square {i}", _threads_and_square, (cluster.put(i),)) for i in range(5)], desc="squares",
                       progress=False, log=said.append) == [(1, i * i) for i in range(5)]
    assert said and said[0].startswith(f"squares: 5 tasks on Ray ({on_ray}): ") and "ran 5" in said[0]


def test_worker_lines_that_differ_only_in_numbers_all_reach_the_console(on_ray, tmp_path):
    # in a fresh driver: Ray reads its log settings when first imported, and this test process imported it above
    script = tmp_path / "driver.py"
    script.write_text(
        "import time\n"
        "from pipeline.cluster import Job, connect\n"
        "def epoch(top1):\n"
        "    print(f'fine-tune epoch 1/10: held-out top-1 {top1:.2f}%', flush=True)\n"
        "connect().run([Job(f'point {i}', epoch, (90 + i / 10,)) for i in range(2)], desc='grid', progress=False)\n"
        "time.sleep(5)  # the log monitor forwards worker lines a moment later\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "RAY_ADDRESS": on_ray, "PYTHONPATH": str(Path.cwd())})
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert "held-out top-1 90.00%" in said and "held-out top-1 90.10%" in said, said[-2000:]


def test_a_lost_worker_is_retried_once_and_a_second_loss_names_the_task(on_ray, tmp_path):
    cluster = connect()
    assert cluster.run([Job("dies once", _dies_once, (str(tmp_path / "died"),))], desc="retry",
                       progress=False, log=lambda _: None) == ["second try"]
    with pytest.raises(ClusterError, match=r"^always dies: its worker was lost twice \(retried once\)"):
        cluster.run([Job("always dies", _always_dies)], desc="lost", progress=False)


def test_an_error_in_a_task_keeps_its_kind_and_names_task_and_node(on_ray):
    with pytest.raises(ConfigError, match=r"^refuses \(on \S+ \(\d+\.\d+\.\d+\.\d+\)\): Unknown method 'svd9'; known: cp, svd$"):
        connect().run([Job("refuses", _refuses)], desc="error", progress=False)


def test_a_board_no_node_declares_is_refused_naming_the_declared_ones(on_ray):
    assert board_resource("rpi4", "ssh") == "board:rpi4" and board_resource("cortex-m4", "qemu") == "board:cortex-m4-qemu"
    with pytest.raises(ClusterError, match=r"needs \{'CPU': 1, 'board:rpi4': 1\} and no node .* boards declared: "
                                           r"board:cortex-m4-qemu, board:rpi4-qemu"):
        connect().run([Job("check on the Pi", _threads_and_square, (2,), resources={"board:rpi4": 1})], desc="b",
                      progress=False)


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory, cifar_dir) -> Path:
    """A folder with train.npz / test.npz: 1,500 training and 300 test images of CIFAR-10."""
    folder = tmp_path_factory.mktemp("small-cifar")
    train, test = load_dataset("train", str(cifar_dir)), load_dataset("test", str(cifar_dir))
    np.savez(folder / "train.npz", x=train.x[:1500], y=train.y[:1500])
    np.savez(folder / "test.npz", x=test.x[:300], y=test.y[:300])
    return folder


def test_the_sensitivity_sweep_is_the_same_on_ray(small_cifar, ray_head, monkeypatch):
    spec = load_model("seednet")
    train = load_dataset("train", str(small_cifar))
    x = preprocess(train.x[:400], mean=spec.mean, std=spec.std)
    settings = load_target("rpi4").override(decomposition={"budget": "0.5"}).decomposition

    def sweep():
        return sensitivities(spec.module, input_shape=spec.input_shape, fit_x=x[:256], heldout_x=x[256:],
                             settings=settings, use_cache=False, progress=False)[0]

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = sweep()
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    remote = sweep()
    assert len(local) > 10 and any(c.method for c in local)
    assert remote == local  # every KL and agreement bit for bit


def test_a_bench_grid_is_the_same_on_ray(small_cifar, ray_head, monkeypatch, tmp_path):
    # a board without a core and without host-latency weighing: each run has its own cache, where the board's
    # cycles would need an emulated Pi of its own, and a host-timed allocation would differ by timing noise
    profile = Path(__file__).parents[1] / "targets" / "rpi4.toml"
    board = tmp_path / "quiet-pi.toml"
    board.write_text(profile.read_text().replace('name = "rpi4"', 'name = "quiet-pi"')
                     .replace("latency_weight = 0.25", "latency_weight = 0.0").replace('core = "cortex-a72"', 'core = ""'))

    def grid(out: Path) -> dict:
        monkeypatch.setenv("CNN_DEPLOY_CACHE", str(out / "cache"))  # each run measures its own sensitivity table
        path = bench(models=("seednet",), budgets=(0.9, 0.75), epochs=1, targets=(str(board),), data=str(small_cifar),
                     out=str(out), latency_rounds=1, threads=1, log=lambda *_: None)
        return json.loads(path.read_text())

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = grid(tmp_path / "local")
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    remote = grid(tmp_path / "ray")
    same = ("variant", "macs", "params", "bytes", "macs_kept", "top1", "mac_reduction")
    rows = [[{k: r[k] for k in same} for r in results["models"][0]["rows"]] for results in (local, remote)]
    assert len(rows[0]) == 10 and rows[1] == rows[0]
    assert print is builtins.print and builtins.print.__module__ == "builtins"  # Ray left this process's print alone
    for stage in ("oneshot", "finetuned"):
        made = [torch.load(next((tmp_path / run / "work").glob(f"*b0.75*.{stage}.pt")), weights_only=True)["state_dict"]
                for run in ("local", "ray")]
        assert made[0].keys() == made[1].keys() and all(torch.equal(made[0][k], made[1][k]) for k in made[0])


def test_a_device_regression_runs_on_the_node_with_the_board(small_cifar, ray_head, monkeypatch, tmp_path):
    if shutil.which("qemu-aarch64-static") is None or shutil.which("mmdebstrap") is None:
        pytest.skip("needs apt packages qemu-user-static and mmdebstrap (.ci/run installs them)")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    build = tmp_path / "rpi4"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", "rpi4", "--data", str(small_cifar), "--eval-samples", "60", "--out", str(build),
                 "--quiet"]) in (0, 1)
    local = regress_all([build], device="qemu", eval_samples=60)[0]
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    said = []
    remote = regress_all([build], device="qemu", eval_samples=60, log=said.append)[0]
    assert remote.baseline["status"] == "matched exactly (60 outputs)", remote.baseline
    assert local.baseline["status"] == "recorded (first run on this device)"
    keep = {k: v for k, v in local.to_dict().items() if k not in ("device_seconds", "baseline")}
    assert {k: v for k, v in remote.to_dict().items() if k not in ("device_seconds", "baseline")} == keep
    assert said and "1 tasks on Ray" in said[0]
