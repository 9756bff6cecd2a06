"""Estimated cycles of ONNX Runtime models on an ARM Linux board (the Raspberry Pi 4's Cortex-A72).

The aarch64 ONNX Runtime runs in the emulated Pi under the dynamic `qemu-aarch64` with the block-profile plugin
(pipeline/cycles); the device runner marks each model's inferences with a syscall the plugin watches, after a
warm-up inference, so loading, weight packing and Python's start drop out. One guest process measures every
model given. The figures are cached by what determines them (the model's and input's bytes, the guest, the
plugin, the runner, LLVM), so a second deploy of the same files reads them back.
"""

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cycles import board_figures, core_named, estimate_segments, plugin_path, read_profile
from pipeline.cycles.mca import model_key
from pipeline.cycles.plugin import SOURCE, plugin_arg
from pipeline.cycles.tools import require
from pipeline.device import qemu
from pipeline.device.transports import RUNNER
from pipeline.errors import DeviceError
from pipeline.util import cache_dir, sha256_bytes, sha256_file, sha256_json, write_text

MAGIC = 0xC7C1E5  # the runner's mark: lseek(-1, MAGIC, SEEK_SET)
LSEEK = 62  # aarch64 Linux's lseek
RUNS = 2  # inferences counted per model: they cost the same, two show it


def _key(model: Path, sample: np.ndarray, core: str, runs: int) -> str:
    return sha256_json([sha256_file(model), sha256_bytes(np.ascontiguousarray(sample, np.float32).tobytes()), core,
                        runs, qemu.cache_root().name, sha256_bytes(SOURCE.read_bytes(), RUNNER.read_bytes()),
                        model_key(core_named(core))])[:24]


def onnx_cycles(models: list[Path], *, sample: np.ndarray, core: str, clock_mhz: float, runs: int = RUNS,
                log=print) -> list[dict]:
    """report.json's board figures of one inference of each model on `sample` (one preprocessed input, CHW)."""
    require("qemu-aarch64", "llvm-mc", "llvm-mca", "gcc")
    spec = core_named(core)
    keys = [_key(m, sample, core, runs) for m in models]
    paths = [cache_dir("cycles", "onnx", f"{k}.json") for k in keys]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        started = time.perf_counter()
        root = qemu.ensure(log=log)
        with tempfile.TemporaryDirectory(prefix="cnn-deploy-cycles-") as tmp:
            tmp = Path(tmp)  # the guest's working folder: it sees only relative paths, the same on every host
            np.save(tmp / "input.npy", np.ascontiguousarray(sample, np.float32))
            shutil.copyfile(RUNNER, tmp / RUNNER.name)
            names = [f"m{k}.onnx" for k in range(len(todo))]
            for name, i in zip(names, todo, strict=True):
                shutil.copyfile(models[i], tmp / name)
            plugin = plugin_arg(plugin_path(), tmp / "blocks.prof", syscall=LSEEK, magic=MAGIC)
            argv, env = qemu.profiled_command(root, tmp, RUNNER.name, "--marks", str(runs), hex(MAGIC), "input.npy",
                                              *names, plugin=plugin)
            done = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True, check=False)
            if done.returncode:
                raise DeviceError(f"The emulated Raspberry Pi failed to run the cycle count (exit {done.returncode}): "
                                  f"{done.stderr.strip()[-300:]}")
            profile = read_profile(tmp / "blocks.prof")
        if profile.marks != 2 * len(todo):
            raise DeviceError(f"The block profile has {profile.marks} marks; expected {2 * len(todo)} for "
                              f"{len(todo)} models: the runner and the plugin disagree")
        costs = estimate_segments(profile, spec, [[2 * k + 1] for k in range(len(todo))])
        seconds = round((time.perf_counter() - started) / len(todo), 1)
        for i, cost in zip(todo, costs, strict=True):
            figures = board_figures(cost.scaled(runs), core=spec, clock_mhz=0.0, runtime=done.stdout.strip(),
                                    seconds=seconds)
            write_text(paths[i], json.dumps(figures, indent=1) + "\n")
    results = []
    for i, path in enumerate(paths):  # the clock is the profile's: applied after the cache
        figures = json.loads(path.read_text())
        ms = figures["cycles"] / (clock_mhz * 1e3) if clock_mhz else None
        results.append({**figures, "clock_mhz": clock_mhz, "ms": round(ms, 4) if ms is not None else None,
                        "cached": i not in todo})
    return results
