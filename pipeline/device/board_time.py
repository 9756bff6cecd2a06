"""A real board's own time per inference, written where the build's figures are read.

A microcontroller run over the serial protocol on a real board (`DEVICE=serial://...` or `socket://...`) measures
each inference with the board's DWT cycle counter; the emulated board has none (QEMU reads it as 0) and keeps the
cycle engine's estimate. Whether it came from `make deploy DEVICE=...` or a later `make regress DEVICE=...`, the
deployed variant's latency in `report.json` becomes the board's (`latency_source` "measured"), the estimate and
their ratio beside it: how far the cycle engine is from this board (flash wait states, caches, bus contention).
"""

import dataclasses
import json
from pathlib import Path

from pipeline.metrics import VariantReport
from pipeline.util import sha256_file, write_text

DEPLOYED = ("factored_int8", "given_int8")  # what model.tflite holds: the compressed model, or a given int8 file
SECTION = "## Measured on the board"


def measured_on_board(board: dict | None, *, device: str, samples: int) -> dict | None:
    """The board's own figures from a device check's `board` record, or None where no board counted cycles."""
    if not board or board.get("source") != "measured" or board.get("ms") is None:
        return None
    return {"device": device, "samples": samples, "cycles": board["cycles"], "ms": board["ms"],
            "estimated_cycles": board.get("estimated_cycles"), "estimated_ms": board.get("estimated_ms"),
            "estimate_ratio": board.get("estimate_ratio")}


def latency_words(measured: dict) -> str:
    """What the latency is, for the report: the board and how, with the estimate beside it."""
    beside = (f"; the cycle engine estimated {measured['estimated_cycles']:,} cycles, {measured['estimate_ratio']:.3f} of "
              "the board's" if measured.get("estimated_cycles") else "; no estimate to compare")
    return (f"measured on {measured['device']}: {measured['cycles']:,} DWT cycles per inference, the median of "
            f"{measured['samples']} images{beside}")


def with_board_time(variant: VariantReport, measured: dict | None) -> VariantReport:
    """The deployed variant with the board's time as its latency (a board's timing outranks any estimate) and its
    figures under `details.measured_on_board`; the variant as it was where no board counted cycles."""
    if measured is None:
        return variant
    return dataclasses.replace(variant, details={**variant.details, "measured_on_board": measured}).with_latency(
        "measured", round(measured["ms"], 4), latency_words(measured))


def _markdown(name: str, measured: dict) -> str:
    return (f"{SECTION}\n\n{name} on {measured['device']} (`make regress`): **{measured['ms']:.3f} ms** per inference, "
            f"{latency_words(measured).partition(': ')[2]}. `report.json`'s `latency_ms` for {name} is now the board's "
            "(`latency_source` \"measured\").\n")


def record_board_time(build_dir: Path, measured: dict | None) -> str | None:
    """Write a board's measured time into the build's `report.json` (the deployed variant's latency, its figures
    under `details.measured_on_board`), a section of `report.md`, and their hashes in `manifest.json`. Returns the
    variant's name, or None (nothing written) where the run measured no time."""
    if measured is None:
        return None
    path = build_dir / "report.json"
    report = json.loads(path.read_text())
    name = next((n for n in DEPLOYED if n in report["variants"]), None)
    if name is None:
        return None
    variant = report["variants"][name]
    variant.update(latency_ms=round(measured["ms"], 4), latency_source="measured", latency_on=latency_words(measured))
    variant.setdefault("details", {})["measured_on_board"] = measured
    write_text(path, json.dumps(report, indent=2) + "\n")
    markdown = build_dir / "report.md"
    if markdown.is_file():
        text = markdown.read_text()
        before, found, after = text.partition(f"\n{SECTION}\n")
        rest = after[after.find("\n## "):] if found and "\n## " in after else ""  # a section written earlier goes
        write_text(markdown, before.rstrip("\n") + "\n\n" + _markdown(name, measured) + rest)
    manifest_path = build_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        for written in (path, markdown):
            if written.name in manifest.get("reports", {}):
                manifest["reports"][written.name] = {"sha256": sha256_file(written), "bytes": written.stat().st_size}
        write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return name
