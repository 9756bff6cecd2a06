"""Device runners: send preprocessed inputs to a device in batches, bring its outputs back as arrays.

Three kinds: `qemu` (an emulated Cortex-A72 with the aarch64 ONNX Runtime), `ssh://user@host[:port]`
(a real board; `?python=/path` picks its interpreter) and `tflm` (TensorFlow Lite Micro's interpreter).
"""

import concurrent.futures
import contextlib
import os
import re
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from pipeline.cycles.tools import missing as missing_tools
from pipeline.device import qemu
from pipeline.errors import DeviceError
from pipeline.tflm import interpreter as tflm
from pipeline.tflm.board_cycles import CYCLE_TOOLS, firmware_cycles
from pipeline.tflm.emulator import run_firmware

RUNNER = Path(__file__).with_name("runner.py")  # copied to the device and run there
KNOWN = ("qemu", "ssh://user@host[:port]", "tflm", "serial:///dev/ttyACM0 (a board running the benchmark firmware)",
         "socket://host:port (the same over TCP)")


@dataclass(frozen=True)
class Device:
    kind: str  # qemu, ssh, tflm, serial
    spec: str
    user: str = ""
    host: str = ""
    port: int = 22
    python: str = "python3"
    url: str = ""  # serial: the port as pyserial's serial_for_url takes it (/dev/ttyACM0, socket://host:port)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def key(self) -> str:
        """Names the device's baseline file: outputs are compared only with the same device's."""
        if self.kind == "serial":
            return "serial-" + re.sub(r"[^A-Za-z0-9]+", "-", self.url).strip("-")
        return {"qemu": "qemu-cortex-a72", "tflm": "tflm"}.get(self.kind) or f"ssh-{self.user}@{self.host}-{self.port}"


def parse_device(text: str) -> Device:
    if text in ("qemu", "tflm"):
        return Device(text, text)
    if text.startswith("serial://") and len(text) > len("serial://"):
        return Device("serial", text, url=text[len("serial://"):])
    if text.startswith("socket://") and len(text) > len("socket://"):
        return Device("serial", text, url=text)
    if text.startswith("ssh://"):
        url = urlparse(text)
        if not url.hostname or not url.username:
            raise DeviceError(f"Device {text!r} lacks a user or host; expected ssh://user@host[:port]")
        python = parse_qs(url.query).get("python", ["python3"])[0]
        return Device("ssh", text, url.username, url.hostname, url.port or 22, python)
    raise DeviceError(f"Unknown device {text!r}; known: {', '.join(KNOWN)}")


def run_on_device(device: Device, model: Path, x: np.ndarray, *, log=print) -> tuple[np.ndarray, float, str]:
    """(outputs, seconds the device run took, what the device reported about itself)."""
    started = time.perf_counter()
    if device.kind == "tflm":
        model_bytes = model.read_bytes()
        io = tflm.io_quant(model_bytes)
        out = tflm.dequantize_output(tflm.run_tflm(model_bytes, tflm.quantize_input(x, io)), io)
        return out, time.perf_counter() - started, "tflite-micro reference kernels (host)"
    with tempfile.TemporaryDirectory(prefix="cnn-deploy-device-") as tmp:
        if device.kind == "qemu":
            out, about = _run_qemu(model, x, Path(tmp), log=log)
        else:
            out, about = _run_ssh(device, model, x, Path(tmp))
    return out, time.perf_counter() - started, about


def run_firmware_on_device(elf: Path, tflite: Path, x: np.ndarray, *, cpu: str,
                           clock_mhz: float = 0.0) -> tuple[np.ndarray, float, str, int, dict]:
    """A microcontroller build on its emulated board: (dequantized outputs, seconds, what ran, median
    instructions per inference, estimated board figures or {"missing": why})."""
    started = time.perf_counter()
    model_bytes = tflite.read_bytes()
    io = tflm.io_quant(model_bytes)
    missing = missing_tools(*CYCLE_TOOLS)
    run = run_firmware(elf, tflm.quantize_input(x, io), cpu=cpu, profile_blocks=missing is None)
    out = tflm.dequantize_output(run.outputs, io)
    instructions = int(np.median(run.instructions[1:] or run.instructions))
    board = {"missing": missing} if missing else firmware_cycles(run, cpu=cpu, clock_mhz=clock_mhz)
    return out, time.perf_counter() - started, f"firmware on qemu-system-arm {cpu} (TFLM + CMSIS-NN)", instructions, board


def _run_qemu(model: Path, x: np.ndarray, tmp: Path, *, log) -> tuple[np.ndarray, str]:
    root = qemu.ensure(log=log)
    # one qemu process per core: threads inside one emulated process do not speed it up
    parts = np.array_split(np.arange(len(x)), max(1, min(os.cpu_count() or 1, len(x))))

    def one(i: int, idx: np.ndarray):
        np.save(tmp / f"in{i}.npy", x[idx])
        argv, env = qemu.command(root, str(RUNNER), str(model.resolve()), str(tmp / f"in{i}.npy"), str(tmp / f"out{i}.npy"))
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise DeviceError(f"The emulated Raspberry Pi failed to run {model.name} (exit {done.returncode}): "
                              f"{done.stderr.strip()[-300:]}")
        return np.load(tmp / f"out{i}.npy"), done.stdout.strip()

    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
        results = list(pool.map(lambda item: one(*item), enumerate(parts)))
    return np.concatenate([r[0] for r in results]), results[0][1] + " (qemu-user, Cortex-A72)"


def _ssh_options() -> list[str]:
    # BatchMode: never wait for a password prompt; extra options (identity, known hosts) from the environment
    return ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *shlex.split(os.environ.get("CNN_DEPLOY_SSH_OPTS", ""))]


def _ssh(device: Device, remote: str) -> subprocess.CompletedProcess:
    argv = ["ssh", "-p", str(device.port), *_ssh_options(), f"{device.user}@{device.host}", remote]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)


def _scp(device: Device, sources: list[str], target: str) -> None:
    done = subprocess.run(["scp", "-q", "-P", str(device.port), *_ssh_options(), *sources, target],
                          capture_output=True, text=True, check=False, timeout=3600)
    if done.returncode:
        raise DeviceError(f"Copying to or from {device.user}@{device.host}:{device.port} failed: "
                          f"{_last_line(done.stderr)}")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


@contextlib.contextmanager
def _board_folder(device: Device):
    """A fresh folder on the board, removed afterwards whatever happens."""
    made = _ssh(device, "mktemp -d /tmp/cnn-deploy.XXXXXX")
    if made.returncode:
        raise DeviceError(f"Could not connect to {device.where}: {_last_line(made.stderr)}")
    workdir = made.stdout.strip()
    try:
        yield workdir
    finally:
        _ssh(device, f"rm -rf {shlex.quote(workdir)}")


def _runner(device: Device, workdir: str, what: str, *args: str) -> str:
    """Run the runner in `workdir` on the board; its stdout, or an error naming what to do."""
    done = _ssh(device, f"cd {shlex.quote(workdir)} && {shlex.quote(device.python)} {RUNNER.name} "
                        + " ".join(shlex.quote(a) for a in args))
    if done.returncode == 3:
        raise DeviceError(f"{device.where} lacks a package the runner needs ({_last_line(done.stderr)}); install "
                          f"numpy and onnxruntime there for {device.python}")
    if done.returncode:
        raise DeviceError(f"Running {what} on {device.where} failed (exit {done.returncode}): "
                          f"{_last_line(done.stderr)}")
    return done.stdout


def _run_ssh(device: Device, model: Path, x: np.ndarray, tmp: Path) -> tuple[np.ndarray, str]:
    with _board_folder(device) as workdir:
        np.save(tmp / "inputs.npy", x)
        _scp(device, [str(RUNNER), str(model), str(tmp / "inputs.npy")], f"{device.user}@{device.host}:{workdir}/")
        about = _runner(device, workdir, model.name, model.name, "inputs.npy", "outputs.npy").strip()
        _scp(device, [f"{device.user}@{device.host}:{workdir}/outputs.npy"], str(tmp / "outputs.npy"))
        return np.load(tmp / "outputs.npy"), about


def time_on_device(device: Device, models: list[Path], *, runs: int, warmup: int) -> tuple[list[float], str]:
    """Each model's median batch-1, one-thread latency in ms, timed on the board itself, and what it ran on.
    Only a real board keeps time: an emulator's figures would be the host's."""
    if device.kind != "ssh":
        raise DeviceError(f"Device {device.spec!r} keeps no time of its own; latency on the board needs "
                          "DEVICE=ssh://user@host")
    if len({m.name for m in models}) != len(models):
        raise ValueError("models to time on the board need distinct file names")
    with _board_folder(device) as workdir:
        _scp(device, [str(RUNNER), *map(str, models)], f"{device.user}@{device.host}:{workdir}/")
        out = _runner(device, workdir, "the latency runs", "--latency", str(runs), str(warmup), *(m.name for m in models))
    times = {name: float(value) for name, value in re.findall(r"^latency_ms (\S+) ([0-9.]+)$", out, re.M)}
    return [times[m.name] for m in models], out.strip().splitlines()[-1]
