"""The emit stage for ONNX Runtime boards: the int8 model, its ORT-format twin and the reduced-build config."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import StageError
from pipeline.util import cache_dir, cache_lock, sha256_file

ORT_CONFIG = "required_operators_and_types.config"


def emit_onnxruntime(out_dir: str | os.PathLike, *, int8_onnx: Path, fp32_onnx: Path) -> dict[str, Path]:
    """Write `model.int8.onnx`, `model.int8.ort`, the operator config a reduced ORT build needs, and
    `model.fp32.onnx` into `out_dir` (a staging folder the orchestration swaps in when complete)."""
    out_dir = Path(out_dir)
    files = {"int8_onnx": out_dir / "model.int8.onnx", "fp32_onnx": out_dir / "model.fp32.onnx",
             "int8_ort": out_dir / "model.int8.ort", "ort_config": out_dir / ORT_CONFIG}
    shutil.copyfile(int8_onnx, files["int8_onnx"])
    shutil.copyfile(fp32_onnx, files["fp32_onnx"])
    # The converter's output bytes (not their meaning) depend on its process: it orders some tables by Python
    # set iteration and ORT by memory address, and both shift with every string the process holds, the paths
    # it works in included. A fixed hash seed, no address randomisation (setarch -R, where the kernel allows
    # it), a fixed environment and a work folder named by the model's content make the file reproducible.
    work = Path(tempfile.gettempdir()) / f"cnn-deploy-ort-{sha256_file(int8_onnx)[:16]}"
    # one conversion at a time in that folder (two deploys of one model may run at once); the lock file lives in
    # the cache, so nothing is left beside the work folder
    with cache_lock(cache_dir("locks", work.name)):
        shutil.rmtree(work, ignore_errors=True)
        (work / "in").mkdir(parents=True)
        try:
            shutil.copyfile(int8_onnx, work / "in" / "model.int8.onnx")
            # the converter's own CLI: its Python entry point is internal and changes between releases
            argv = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", "in", "--output_dir", "out",
                    "--optimization_style", "Fixed", "--enable_type_reduction"]
            if shutil.which("setarch") and subprocess.run(["setarch", "-R", "true"], capture_output=True).returncode == 0:
                argv = ["setarch", "-R", *argv]
            done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=work,
                                  env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"})
            converted = work / "out"
            ort_files = list(converted.glob("*.ort"))
            if done.returncode or not ort_files or not (converted / ORT_CONFIG).is_file():
                raise StageError(f"ORT-format conversion failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
            shutil.copyfile(ort_files[0], files["int8_ort"])
            # the converter names the folder it read from: name the emitted file instead
            config = (converted / ORT_CONFIG).read_text().replace(str(ort_files[0]), files["int8_ort"].name)
            files["ort_config"].write_text(config)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return files
