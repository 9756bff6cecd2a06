"""Estimated cycles of ONNX Runtime models on an ARM Linux board (the Raspberry Pi 4's Cortex-A72).

The aarch64 ONNX Runtime runs in the emulated Pi under the dynamic `qemu-aarch64` with the block-profile plugin
(pipeline/cycles); the device runner marks each model's inferences with a syscall the plugin watches, after a
warm-up inference, so loading, weight packing and Python's start drop out. Each model runs alone in its own guest
process (several at once), so its figure does not depend on what else was measured with it. The figures are cached
by what determines them (the model's and input's bytes, the guest and how it is run, the plugin, the runner, LLVM),
so a second deploy of the same files reads them back.
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cycles import Profile, board_figures, core_named, estimate_segments, plugin_path, read_profile
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
                        runs, qemu.cache_root().name,
                        sha256_bytes(*(f.read_bytes() for f in (SOURCE, RUNNER, Path(qemu.__file__), Path(__file__)))),
                        model_key(core_named(core))])[:24]


def _guest_run(root: Path, model: Path, sample: np.ndarray, runs: int) -> tuple[Profile, str]:
    """One model alone in a guest process: what ran before it in the same process (another model's tensors)
    would move where this one's land, and with that its count."""
    with tempfile.TemporaryDirectory(prefix="cnn-deploy-cycles-") as tmp:
        tmp = Path(tmp)  # the guest's working folder: it sees only relative paths, the same on every host
        np.save(tmp / "input.npy", np.ascontiguousarray(sample, np.float32))
        shutil.copyfile(RUNNER, tmp / RUNNER.name)
        shutil.copyfile(model, tmp / "model.onnx")
        # only the runner's own thread counts: a runtime's helper thread runs on the host's schedule
        plugin = plugin_arg(plugin_path(), tmp / "blocks.prof", syscall=LSEEK, magic=MAGIC, vcpu=0)
        argv, env = qemu.profiled_command(root, tmp, RUNNER.name, "--marks", str(runs), hex(MAGIC), "input.npy",
                                          "model.onnx", plugin=plugin)
        done = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True, check=False)
        if done.returncode:
            raise DeviceError(f"The emulated Raspberry Pi failed to run the cycle count of {model.name} "
                              f"(exit {done.returncode}): {done.stderr.strip()[-300:]}")
        profile = read_profile(tmp / "blocks.prof")
    if profile.marks != 2:
        raise DeviceError(f"The block profile of {model.name} has {profile.marks} marks; expected 2: the runner and "
                          "the plugin disagree")
    return profile, done.stdout.strip()


def onnx_cycles(models: list[Path], *, sample: np.ndarray, core: str, clock_mhz: float, runs: int = RUNS,
                log=print) -> list[dict]:
    """report.json's board figures of one inference of each model on `sample` (one preprocessed input, CHW):
    one guest process per model, as many at once as this machine has cores."""
    require("qemu-aarch64", "llvm-mc", "llvm-mca", "gcc", "setarch")
    spec = core_named(core)
    paths = [cache_dir("cycles", "onnx", f"{_key(m, sample, core, runs)}.json") for m in models]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo:
        root = qemu.ensure(log=log)

        def measure(i: int) -> None:
            started = time.perf_counter()
            profile, runtime = _guest_run(root, models[i], sample, runs)
            (cost,) = estimate_segments(profile, spec, [[1]])
            figures = board_figures(cost.scaled(runs), core=spec, clock_mhz=0.0, runtime=runtime,
                                    seconds=round(time.perf_counter() - started, 1))
            write_text(paths[i], json.dumps(figures, indent=1) + "\n")

        with concurrent.futures.ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
            list(pool.map(measure, todo))
    results = []
    for i, path in enumerate(paths):  # the clock is the profile's: applied after the cache
        figures = json.loads(path.read_text())
        ms = figures["cycles"] / (clock_mhz * 1e3) if clock_mhz else None
        results.append({**figures, "clock_mhz": clock_mhz, "ms": round(ms, 4) if ms is not None else None,
                        "cached": i not in todo})
    return results
