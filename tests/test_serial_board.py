"""The benchmark firmware (MLPerf Tiny's serial protocol) and its host client: every command against the emulated
board, bit for bit with the host TFLM interpreter; the faults a user meets (no reply, another model, a board that
dies mid-run, a model too large for the board); the real boards' images."""

import re
import socket
import subprocess
import threading

import numpy as np
import pytest
from test_firmware import firmware_model, sources  # noqa: F401 (the fixture)

from pipeline.device.serial_protocol import BenchmarkClient, run_benchmark
from pipeline.errors import DeviceError
from pipeline.tflm import interpreter as tflm
from pipeline.tflm.boards import board_named, link_benchmark, model_sha256, vector_table
from pipeline.tflm.build import build_library
from pipeline.tflm.emulator import emulated_board, size

pytestmark = pytest.mark.firmware


@pytest.fixture(scope="module")
def benchmark(sources, tmp_path_factory):  # noqa: F811
    """A tiny model's benchmark firmware on the emulated M4, and what it computes on the host."""
    folder = tmp_path_factory.mktemp("benchmark")
    tflite, x = firmware_model("conv_same", folder)
    elf = link_benchmark(folder, folder / "firmware.elf", board=board_named("mps2"), cpu="cortex-m4", root=sources,
                         library=build_library("cortex-m4", sources, log=lambda *_: None))
    data = tflite.read_bytes()
    x_int8 = tflm.quantize_input(x[:3], tflm.io_quant(data))
    return {"folder": folder, "elf": elf, "tflite": tflite, "x": x_int8, "host": tflm.run_tflm(data, x_int8)}


def test_each_protocol_command_on_the_emulated_board(benchmark):
    with emulated_board(benchmark["elf"], cpu="cortex-m4") as emulated, \
            BenchmarkClient(emulated.url, connect_within=20) as board:
        greeting = board.wait_ready()
        assert "m-init-done" in greeting and "m-timestamp-mode-performance" in greeting
        assert board.name() == "dut-[unspecified]"  # MLPerf's harness names every board so
        assert board.profile() == {"firmware": "ULPMark for tinyML Firmware V0.0.1",
                                   "model": model_sha256(benchmark["folder"])}
        assert board.command(f"db load {benchmark['x'][0].size}") == [f"m-[Expecting {benchmark['x'][0].size} bytes]"]
        for i, x in enumerate(benchmark["x"]):
            board.load(x.tobytes())
            result = board.infer(runs=2, warmup=1)
            assert np.array_equal(result.int8, benchmark["host"][i].reshape(-1))
            q = tflm.io_quant(benchmark["tflite"].read_bytes())
            np.testing.assert_allclose(result.scores, q.output_scale * (result.int8.astype(np.float32)
                                                                        - q.output_zero_point), atol=1e-5)
            assert result.microseconds is None and result.cycles is None  # qemu has no DWT: timing unavailable
        assert any(line.startswith("m-results-int8-[") for line in board.command("results"))
        with pytest.raises(DeviceError, match=r"answered 'fly' with e-\[Unknown command: fly\]"):
            board.command("fly")
        with pytest.raises(DeviceError, match=r"e-\[Inference iterations must be >0\]"):
            board.command("infer 0")


def test_a_run_streams_every_image_and_refuses_another_models_firmware(benchmark):
    with emulated_board(benchmark["elf"], cpu="cortex-m4") as emulated:
        run = run_benchmark(emulated.url, benchmark["x"], model_sha256=model_sha256(benchmark["folder"]), fresh=True,
                            connect_within=20)
    assert np.array_equal(run.outputs, benchmark["host"].reshape(len(benchmark["x"]), -1))
    assert run.cycles is None and run.milliseconds is None
    with emulated_board(benchmark["elf"], cpu="cortex-m4") as emulated, \
            pytest.raises(DeviceError, match=r"runs another model: its firmware names [0-9a-f]{64}, this build's "
                                             r"model.tflite is 0{64}"):
        run_benchmark(emulated.url, benchmark["x"], model_sha256="0" * 64, fresh=True, connect_within=20)


def test_a_board_that_dies_mid_run_is_named_with_the_command_and_the_last_line(benchmark):
    with emulated_board(benchmark["elf"], cpu="cortex-m4") as emulated, \
            BenchmarkClient(emulated.url, connect_within=20, timeout=10) as board:
        board.wait_ready()
        board.command("name")
        emulated.process.kill()
        emulated.process.wait()
        with pytest.raises(DeviceError, match=r"(failed during|No reply from) .*'db load 192'.*last line received: "
                                              r"m-ready"):
            board.load(bytes(192))


def test_a_silent_port_is_an_error_naming_it_the_command_and_the_last_line():
    """A local socket that accepts and then says one line and nothing more: a board running something else."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def board():
        connection, _ = server.accept()
        connection.recv(64)
        connection.sendall(b"hello from another program\r\n")
        threading.Event().wait(3)
        connection.close()

    threading.Thread(target=board, daemon=True).start()
    with BenchmarkClient(f"socket://127.0.0.1:{port}", timeout=1.5) as client, \
            pytest.raises(DeviceError, match=rf"No reply from socket://127.0.0.1:{port} to 'profile' within 2 s; last "
                                             r"line received: hello from another program"):
        client.profile()
    server.close()
    with pytest.raises(DeviceError, match=rf"Cannot open socket://127.0.0.1:{port}"):
        BenchmarkClient(f"socket://127.0.0.1:{port}")


def test_the_real_boards_link_with_their_vector_table_at_the_start_of_flash_and_overflow_is_named(benchmark, sources):  # noqa: F811
    for name, cpu in (("nucleo-l4r5zi", "cortex-m4"), ("nucleo-h743zi", "cortex-m7")):
        board = board_named(name)
        elf = link_benchmark(benchmark["folder"], benchmark["folder"] / f"{name}.elf", board=board, cpu=cpu,
                             root=sources, library=build_library(cpu, sources, log=lambda *_: None))
        assert vector_table(elf) == board.flash[0] == 0x08000000
        # the .bin is flash as written: from its start to the end of the last loaded bytes (.data's initial values),
        # the sections' sizes plus the gaps their alignment leaves (.text starts on 32 bytes)
        headers = subprocess.run(["arm-none-eabi-readelf", "-lW", str(elf)], capture_output=True, text=True, check=True)
        loads = [(int(m[1], 16), int(m[2], 16)) for m in
                 re.finditer(r"^\s*LOAD\s+\S+\s+\S+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", headers.stdout, re.M)]
        end = max(address + length for address, length in loads if length)
        assert elf.with_suffix(".bin").stat().st_size == end - board.flash[0]
        assert 0 <= end - board.flash[0] - size(elf)["flash_bytes"] < 64
        assert elf.with_suffix(".hex").read_text().startswith(":02000004080")  # Intel HEX's upper address: 0x0800
    with pytest.raises(DeviceError, match=r"does not fit NUCLEO-L4R5ZI .*region `RAM' overflowed by \d+ bytes"):
        link_benchmark(benchmark["folder"], benchmark["folder"] / "small.elf", board=board_named("nucleo-l4r5zi"),
                       cpu="cortex-m4", root=sources, ram_bytes=16 * 1024,
                       library=build_library("cortex-m4", sources, log=lambda *_: None))
