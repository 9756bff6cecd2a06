"""`manifest.json`: what was built from what, so a deployed file can be traced and checked."""

import json
import subprocess
from importlib import metadata
from pathlib import Path

from pipeline.util import sha256_file, write_text

PACKAGES = ("torch", "tensorly", "onnx", "onnxscript", "onnxruntime", "onnxsim", "ai-edge-litert", "tflite-micro",
            "numpy", "cnn-deploy")


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    if done.returncode:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def write_manifest(out_dir: Path, *, artefacts: list[Path], reports: list[Path], checkpoint: str | None, checkpoint_sha256: str | None,
                   profile: dict, settings: dict, passed: bool) -> Path:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def listing(paths: list[Path]) -> dict:
        return {str(p.relative_to(out_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(paths)}

    manifest = {
        "status": "passed" if passed else "failed",
        # byte-identical across runs with the same inputs on the same machine
        "artefacts": listing(artefacts),
        # measurements: they hold timings, so they differ from run to run
        "reports": listing(reports),
        "checkpoint": {"path": checkpoint, "sha256": checkpoint_sha256},
        "settings": settings,
        "target_profile": profile,
        "packages": {name: version(name) for name in PACKAGES},
        "git_commit": git_commit(),
    }
    return write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
