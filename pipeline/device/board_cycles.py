"""Estimated cycles of ONNX Runtime models on an ARM Linux board (the Raspberry Pi 4's Cortex-A72).

The aarch64 ONNX Runtime runs in the emulated Pi under the dynamic `qemu-aarch64` with the block-profile plugin
(pipeline/cycles); the device runner marks each model's inferences with a syscall the plugin watches, after a
warm-up inference, so loading, weight packing and Python's start drop out. A whole model runs alone in its own guest
process (several at once), so its figure does not depend on what else was measured with it; the allocation's small
one-layer models run `BATCH` to a process, in batches fixed by their list. The figures are cached by what
determines them (the models' and inputs' bytes, the guest and how it is run, the plugin, the runner, LLVM), so a
second deploy of the same files reads them back.
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

from pipeline.cluster import Job, connect
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
TOOLS = ("qemu-aarch64", "llvm-mc", "llvm-mca", "gcc", "setarch")  # what an estimate runs with
BATCH = 16  # small models per guest process: a guest's start (python, ONNX Runtime) costs more than a layer


def _key(models: list[Path], samples: list[np.ndarray], core: str, runs: int) -> str:
    return sha256_json([[sha256_file(m) for m in models],
                        [sha256_bytes(np.ascontiguousarray(x, np.float32).tobytes()) for x in samples], core, runs,
                        qemu.cache_root().name,
                        sha256_bytes(*(f.read_bytes() for f in (SOURCE, RUNNER, Path(qemu.__file__), Path(__file__)))),
                        model_key(core_named(core))])[:24]


def _guest_run(root: Path, models: list[Path], samples: list[np.ndarray], runs: int) -> tuple[Profile, str]:
    """`models` in one guest process, in order, each on its own input; segment 2k + 1 of the profile holds model
    k's inferences. What ran before a model in the same process (another model's tensors) moves where its own
    land, and with that its count by a little: a whole model runs alone, and a batch is always the same batch."""
    with tempfile.TemporaryDirectory(prefix="cnn-deploy-cycles-") as tmp:
        tmp = Path(tmp)  # the guest's working folder: it sees only relative paths, the same on every host
        shutil.copyfile(RUNNER, tmp / RUNNER.name)
        names = []
        for k, (model, sample) in enumerate(zip(models, samples, strict=True)):
            shutil.copyfile(model, tmp / f"m{k}.onnx")
            np.save(tmp / f"m{k}.npy", np.ascontiguousarray(sample, np.float32))
            names.append(f"m{k}.onnx")
        # only the runner's own thread counts: a runtime's helper thread runs on the host's schedule
        plugin = plugin_arg(plugin_path(), tmp / "blocks.prof", syscall=LSEEK, magic=MAGIC, vcpu=0)
        argv, env = qemu.profiled_command(root, tmp, RUNNER.name, "--marks", str(runs), hex(MAGIC), *names,
                                          plugin=plugin)
        done = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True, check=False)
        what = models[0].name if len(models) == 1 else f"{len(models)} models"
        if done.returncode:
            raise DeviceError(f"The emulated Raspberry Pi failed to run the cycle count of {what} "
                              f"(exit {done.returncode}): {done.stderr.strip()[-300:]}")
        profile = read_profile(tmp / "blocks.prof")
    if profile.marks != 2 * len(models):
        raise DeviceError(f"The block profile of {what} has {profile.marks} marks; expected {2 * len(models)}: the "
                          "runner and the plugin disagree")
    return profile, done.stdout.strip()


def _measure(batch: tuple[list[Path], list[np.ndarray]], path: Path, *, core: str, runs: int, log) -> list[dict]:
    """One batch in one guest process, its figures written to `path` (the cache) and returned."""
    started = time.perf_counter()
    models, samples = batch
    profile, runtime = _guest_run(qemu.ensure(log=log), models, samples, runs)
    spec = core_named(core)
    costs = estimate_segments(profile, spec, [[2 * k + 1] for k in range(len(models))])
    seconds = round(time.perf_counter() - started, 1)
    figures = [board_figures(c.scaled(runs), core=spec, clock_mhz=0.0, runtime=runtime, seconds=seconds) for c in costs]
    write_text(path, json.dumps(figures, indent=1) + "\n")
    return figures


def _measured(batches: list[tuple[list[Path], list[np.ndarray]]], *, core: str, runs: int, log) -> list[list[dict]]:
    """Each batch in one guest process, as many at once as this machine has cores, or as Ray tasks where
    `RAY_ADDRESS` is set; cached by what determines the figures. Returns each batch's figures per model (clock
    not applied)."""
    require(*TOOLS)
    paths = [cache_dir("cycles", "onnx", f"{_key(models, samples, core, runs)}.json") for models, samples in batches]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    found = {i: json.loads(paths[i].read_text()) for i in range(len(batches)) if i not in todo}
    if todo:
        qemu.ensure(log=log)  # built once, here, before the runs start
        cluster = connect()
        if cluster.name == "ray":  # each batch a task: the node builds its own emulated board and caches there
            jobs = [Job(f"cycles batch {i}", _measure, (batches[i], paths[i]), {"core": core, "runs": runs, "log": print})
                    for i in todo]
            found |= dict(zip(todo, cluster.run(jobs, desc="board cycles", progress=False, log=log), strict=True))
        else:
            with concurrent.futures.ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
                found |= dict(zip(todo, pool.map(lambda i: _measure(batches[i], paths[i], core=core, runs=runs, log=log),
                                                 todo), strict=True))
    return [[{**f, "cached": i not in todo} for f in found[i]] for i in range(len(batches))]


def layer_cycles(models: list[Path], *, samples: list[np.ndarray], core: str, runs: int = RUNS, log=print) -> list[int]:
    """Estimated cycles of one inference of each small model (one layer or chain), `BATCH` models to a guest
    process: the batches are fixed by the list alone, so every host gets the same figures."""
    batches = [(models[i:i + BATCH], samples[i:i + BATCH]) for i in range(0, len(models), BATCH)]
    return [f["cycles"] for batch in _measured(batches, core=core, runs=runs, log=log) for f in batch]


def onnx_cycles(models: list[Path], *, sample: np.ndarray, core: str, clock_mhz: float, runs: int = RUNS,
                log=print) -> list[dict]:
    """report.json's board figures of one inference of each model on `sample` (one preprocessed input, CHW):
    one guest process per model, as many at once as this machine has cores."""
    results = []
    for (figures,) in _measured([([m], [sample]) for m in models], core=core, runs=runs, log=log):
        ms = figures["cycles"] / (clock_mhz * 1e3) if clock_mhz else None  # the profile's clock, applied after the cache
        results.append({**figures, "clock_mhz": clock_mhz, "ms": round(ms, 4) if ms is not None else None})
    return results
