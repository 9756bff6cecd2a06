"""A real board's DWT time becomes the build's latency: in report.json, report.md and the manifest's hashes, from
`make regress` and from a deploy with a board. The emulated board counts no cycles and changes nothing. (No board
is attached here: the records are the ones `regress._on_microcontroller` makes from a board's `m-dwt-cycles` line.)"""

import json

from pipeline.device.board_time import SECTION, measured_on_board, record_board_time, with_board_time
from pipeline.metrics import VariantReport
from pipeline.util import sha256_file

# what regress records from a board that counted cycles, and from the emulated board (the cycle engine's estimate)
BOARD = {"source": "measured", "latency_source": "measured", "cycles": 20_000_000, "ms": 166.667,
         "estimated_cycles": 19_750_000, "estimated_ms": 164.583, "estimate_missing": None, "estimate_ratio": 0.9875,
         "host_tflm_outputs_differing": 0}
EMULATED = {"core": "cortex-m4", "cycles": 19_750_000, "ms": 164.583, "clock_mhz": 120.0, "host_tflm_outputs_differing": 0}


def _build(tmp_path):
    variant = {"latency_ms": 164.583, "latency_source": "estimated", "latency_on": "estimated for the cortex-m4",
               "details": {"arena_bytes": 35588}}
    (tmp_path / "report.json").write_text(json.dumps({"variants": {"dense_int8": dict(variant),
                                                                   "factored_int8": dict(variant)}}))
    (tmp_path / "report.md").write_text("# resnet8 on nucleo-l4r5zi\n\n| table |\n\n## Warnings\n\n- none\n")
    listing = {n: {"sha256": sha256_file(tmp_path / n), "bytes": 1} for n in ("report.json", "report.md")}
    (tmp_path / "manifest.json").write_text(json.dumps({"reports": listing}))
    return tmp_path


def test_only_a_board_that_counted_cycles_has_a_time():
    assert measured_on_board(EMULATED, device="qemu", samples=200) is None
    assert measured_on_board({"missing": "no tools"}, device="qemu", samples=200) is None
    assert measured_on_board(None, device="qemu", samples=200) is None
    measured = measured_on_board(BOARD, device="serial:///dev/ttyACM0", samples=200)
    assert measured == {"device": "serial:///dev/ttyACM0", "samples": 200, "cycles": 20_000_000, "ms": 166.667,
                        "estimated_cycles": 19_750_000, "estimated_ms": 164.583, "estimate_ratio": 0.9875}


def test_regress_on_a_board_writes_its_time_into_the_build_and_a_second_run_replaces_it(tmp_path):
    build = _build(tmp_path)
    assert record_board_time(build, None) is None  # the emulated board: nothing written
    assert json.loads((build / "report.json").read_text())["variants"]["factored_int8"]["latency_source"] == "estimated"

    measured = measured_on_board(BOARD, device="serial:///dev/ttyACM0", samples=200)
    assert record_board_time(build, measured) == "factored_int8"
    variants = json.loads((build / "report.json").read_text())["variants"]
    deployed = variants["factored_int8"]
    assert deployed["latency_ms"] == 166.667 and deployed["latency_source"] == "measured"
    assert deployed["latency_on"] == ("measured on serial:///dev/ttyACM0: 20,000,000 DWT cycles per inference, the "
                                      "median of 200 images; the cycle engine estimated 19,750,000 cycles, 0.988 of "
                                      "the board's")
    assert deployed["details"] == {"arena_bytes": 35588, "measured_on_board": measured}
    assert variants["dense_int8"]["latency_source"] == "estimated"  # the board ran the deployed model only

    record_board_time(build, {**measured, "ms": 170.0, "cycles": 20_400_000})
    text = (build / "report.md").read_text()
    assert text.count(SECTION) == 1 and "**170.000 ms**" in text and "166.667" not in text
    assert text.index("## Warnings") < text.index(SECTION)  # the sections after it are kept
    manifest = json.loads((build / "manifest.json").read_text())
    for name in ("report.json", "report.md"):
        assert manifest["reports"][name]["sha256"] == sha256_file(build / name)


def test_a_deploy_with_a_board_takes_its_time_for_the_deployed_variant():
    variant = VariantReport(macs=1, params=1, bytes=1, peak_activation_bytes=1, top1=0.85, agreement=0.9,
                            latency_ms=164.583, runtime="tflite-micro", machine="x86", latency_source="estimated")
    assert with_board_time(variant, None) is variant
    timed = with_board_time(variant, measured_on_board(BOARD, device="socket://10.0.0.7:4000", samples=50))
    assert (timed.latency_ms, timed.latency_source) == (166.667, "measured")
    assert timed.latency_on.startswith("measured on socket://10.0.0.7:4000: 20,000,000 DWT cycles")
    assert timed.details["measured_on_board"]["estimate_ratio"] == 0.9875
