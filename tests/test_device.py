"""On-device regression: the emulated Cortex-A72, a board over SSH (an sshd on 127.0.0.1), a broken artefact."""

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import NO_BUDGET, SEEDNET
from onnx import numpy_helper

from pipeline.cli import main
from pipeline.device.transports import parse_device
from pipeline.errors import PipelineError

pytestmark = [pytest.mark.slow, pytest.mark.device]


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """rpi4 with 7-bit weights: the SSH 'board' of these tests is this x86 host, whose fused int8 kernels saturate
    full-range weights without VNNI (FINDINGS); 7-bit weights compute the same there, on ARM and unfused."""
    path = tmp_path_factory.mktemp("profile") / "rpi4-x86.toml"
    path.write_text((ROOT / "targets/rpi4.toml").read_text() + "\n[quantization]\nreduce_range = true\n")
    return str(path)


@pytest.fixture(scope="module")
def build(tmp_path_factory, cifar_dir, profile):
    out = tmp_path_factory.mktemp("device") / "rpi4"
    assert main(["deploy", *SEEDNET, *NO_BUDGET, "--target", profile, "--data", str(cifar_dir), "--eval-samples", "200",
                 "--out", str(out), "--quiet"]) in (0, 1)
    return out


@pytest.fixture(scope="module")
def regress(profile):
    return lambda build, *extra: main(["regress", "--target", profile, "--out", str(build), "--eval-samples", "120", *extra])


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(PipelineError, match=r"Unknown device 'board'; known: qemu, ssh://user@host\[:port\], tflm"):
        parse_device("board")


def test_emulated_pi_runs_the_artefact_and_repeats_bit_for_bit(build, capsys, regress):
    if shutil.which("qemu-aarch64-static") is None or shutil.which("mmdebstrap") is None:
        pytest.skip("needs apt packages qemu-user-static and mmdebstrap (.ci/run installs them)")
    assert regress(build, "--device", "qemu") == 0
    first = json.loads((build / "regress.json").read_text())
    assert first["device_about"].startswith("onnxruntime") and "aarch64" in first["device_about"]
    assert first["baseline"]["status"].startswith("recorded") and first["eval_samples"] == 120
    assert first["host_agreement"] >= 0.95
    assert regress(build, "--device", "qemu") == 0
    assert json.loads((build / "regress.json").read_text())["baseline"]["status"] == "matched exactly (120 outputs)"
    assert "PASSED" in capsys.readouterr().out


def test_a_broken_artefact_fails_the_regression(build, tmp_path, capsys, regress):
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("needs qemu-user-static")
    broken = tmp_path / "rpi4"
    shutil.copytree(build, broken)
    model = onnx.load(str(broken / "model.int8.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2:  # conv and linear weights
            values = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(rng.permutation(values.ravel()).reshape(values.shape), init.name))
    onnx.save(model, str(broken / "model.int8.onnx"))
    assert regress(broken, "--device", "qemu", "--accept") == 1
    report = json.loads((broken / "regress.json").read_text())
    assert not report["passed"] and any("top-1 drop" in f for f in report["failures"])
    assert "FAILED" in capsys.readouterr().out


def test_estimated_cycles_gate_the_regression_on_the_emulated_pi(build, tmp_path, capsys, regress):
    from pipeline.cycles.tools import missing

    if shutil.which("qemu-aarch64-static") is None or missing("qemu-aarch64", "llvm-mca", "gcc"):
        pytest.skip("needs apt packages qemu-user-static, qemu-user and llvm (.ci/run installs them)")
    board = tmp_path / "rpi4"
    shutil.copytree(build, board)
    factored = (board / "model.int8.onnx").read_bytes()
    report = json.loads((board / "report.json").read_text())["variants"]
    assert report["factored_int8"]["board"]["cycles"] > report["dense_int8"]["board"]["cycles"] * 1.005
    (board / "model.int8.onnx").write_bytes((board / "baseline" / "dense.int8.onnx").read_bytes())  # the lighter one
    assert regress(board, "--device", "qemu", "--accept") == 0
    accepted = json.loads((board / "regress.json").read_text())
    deployed = report["dense_int8"]["board"]["cycles"]  # the deploy's figure, again (to a few parts in a million)
    assert abs(accepted["board"]["cycles"] - deployed) <= 1e-5 * deployed
    assert regress(board, "--device", "qemu") == 0  # the baseline passes
    (board / "model.int8.onnx").write_bytes(factored)  # heavier by more than the profile's 0.5%
    capsys.readouterr()
    assert regress(board, "--device", "qemu") == 1
    failed = json.loads((board / "regress.json").read_text())
    assert failed["baseline"]["status"].startswith(f"SLOWER: {failed['board']['cycles']:,} estimated cycles per inference")
    assert abs(failed["board"]["cycles"] - report["factored_int8"]["board"]["cycles"]) <= 1e-5 * failed["board"]["cycles"]
    assert "estimated cycles per inference on the cortex-a72" in capsys.readouterr().out


@pytest.fixture()
def sshd(tmp_path):
    """An sshd of the test's own on 127.0.0.1: own config, host key and client key; stopped by its pid."""
    if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("needs apt package openssh-server (.ci/run installs it)")
    if os.geteuid() != 0:
        pytest.skip("sshd with its own config needs root here")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "client_key")], check=True)
    shutil.copy(tmp_path / "client_key.pub", tmp_path / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host_key'}\nPidFile {tmp_path / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n")  # scp speaks SFTP since OpenSSH 9
    os.makedirs("/run/sshd", exist_ok=True)
    subprocess.run(["/usr/sbin/sshd", "-f", str(tmp_path / "sshd_config"), "-E", str(tmp_path / "sshd.log")], check=True)
    for _ in range(50):
        if (tmp_path / "sshd.pid").exists():
            break
        time.sleep(0.1)
    os.environ["CNN_DEPLOY_SSH_OPTS"] = (f"-i {tmp_path / 'client_key'} -o UserKnownHostsFile=/dev/null "
                                        "-o StrictHostKeyChecking=no -o LogLevel=ERROR")
    try:
        yield f"ssh://{getpass.getuser()}@127.0.0.1:{port}"
    finally:
        os.environ.pop("CNN_DEPLOY_SSH_OPTS", None)
        pid = int((tmp_path / "sshd.pid").read_text())
        os.kill(pid, 15)


def test_board_over_ssh_runs_the_artefact_and_cleans_up(build, sshd, capsys, regress):
    before = {p for p in os.listdir("/tmp") if p.startswith("cnn-deploy.")}
    assert regress(build, "--device", f"{sshd}?python={sys.executable}") == 0
    report = json.loads((build / "regress.json").read_text())
    # the 'board' is this host: ORT's fused int8 kernels against the file's own arithmetic, unfused
    assert report["device"].startswith("ssh://") and report["host_agreement"] >= 0.99 and report["host_max_diff_steps"] <= 1
    assert report["baseline"]["status"].startswith("recorded")
    assert {p for p in os.listdir("/tmp") if p.startswith("cnn-deploy.")} == before


def test_board_without_onnxruntime_is_said_in_a_sentence(build, sshd, tmp_path, capsys, regress):
    bare = tmp_path / "bare-python"
    bare.write_text("#!/bin/sh\nexec /usr/bin/env -i /usr/bin/python3 -S \"$@\"\n")
    bare.chmod(0o755)
    assert regress(build, "--device", f"{sshd}?python={bare}") == 2
    err = capsys.readouterr().err
    assert "lacks a package the runner needs (MISSING numpy)" in err and "Traceback" not in err


def test_unreachable_board_is_said_in_a_sentence(build, capsys, regress):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    assert regress(build, "--device", f"ssh://nobody@127.0.0.1:{port}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Could not connect to nobody@127.0.0.1:{port}:") and "Traceback" not in err


def test_a_deploy_with_a_board_times_the_variants_on_it_and_plans_by_the_estimate(sshd, tmp_path, cifar_dir, monkeypatch):
    from pipeline.device import qemu

    pi = qemu.cache_root()
    monkeypatch.setenv("CNN_DEPLOY_CACHE", str(tmp_path / "cache"))  # the layer table is estimated afresh, not read
    if pi.is_dir():  # the emulated Pi the cycle estimate runs in is kept: building it again takes a download
        qemu.cache_root().parent.mkdir(parents=True)
        qemu.cache_root().symlink_to(pi)
    board = f"{sshd}?python={sys.executable}"
    out = tmp_path / "rpi4"
    assert main(["deploy", *SEEDNET, "--target", "rpi4", "--data", str(cifar_dir), "--eval-samples", "100", "--budget", "0.95",
                 "--device", board, "--out", str(out), "--quiet"]) in (0, 1)
    report = json.loads((out / "report.json").read_text())
    for variant in report["variants"].values():  # the board's own time, the estimate beside it
        assert variant["latency_source"] == "measured" and variant["latency_on"].startswith(f"measured on {board}")
        assert variant["latency_ms"] > 0
        assert variant["board"] is None or variant["board"]["ms"] > 0
    allocation = report["decomposition"]["allocation"]
    # the plan is the board's estimate, the same on any host, not the board's timing of the moment
    assert allocation["latency_unit"] == "estimated cortex-a72 cycles"
    timed = [layer for layer in report["decomposition"]["layers"] if layer["dense_latency"] is not None]
    assert timed and all(layer["dense_latency"] > 0 for layer in timed)
    text = (out / "report.md").read_text()
    assert f"measured on {board}" in text and ("| measured ms |" in text or report["variants"]["dense_int8"]["board"] is None)


def test_one_build_folder_for_several_targets_is_refused(tmp_path, capsys):
    assert main(["regress", "--target", "rpi4", "cortex-m4", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--out names one build folder and --target names 2 targets" in err and len(err.strip().splitlines()) == 1
