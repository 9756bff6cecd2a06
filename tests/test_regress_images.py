"""A board regression's host side without a board: which test images it streams (MLPerf Tiny's performance images
for a CIFAR-10 build, or the indices a user gives, checked), the serial devices it parses, and what the client does
when a board restarts."""

import numpy as np
import pytest

from pipeline.device.regress import PERF_IMAGES, _indices, perf_images
from pipeline.device.transports import parse_device
from pipeline.errors import InputError


def test_a_cifar10_build_streams_mlperfs_performance_images_where_the_file_is(tmp_path, monkeypatch):
    np.save(tmp_path / PERF_IMAGES, np.array([7657, 8959, 3596]))
    monkeypatch.setenv("MLPERF_TINY_DIR", str(tmp_path))
    assert perf_images("CIFAR-10", (3, 32, 32)) == tmp_path / PERF_IMAGES
    assert perf_images("CIFAR-10", (3, 64, 64)) is None and perf_images("image folder flowers", (3, 32, 32)) is None
    monkeypatch.setenv("MLPERF_TINY_DIR", str(tmp_path / "elsewhere"))
    assert perf_images("CIFAR-10", (3, 32, 32)) is None  # then a class-balanced subset, as on other devices
    assert list(_indices(tmp_path / PERF_IMAGES, 10_000)) == [7657, 8959, 3596]


@pytest.mark.parametrize("content,words", [(np.array([1.5, 2.0]), "float64 of shape"), (np.array([[1, 2]]), r"\(1, 2\)"),
                                           (np.array([3, 10_000]), "indices into the 10,000 test images")])
def test_bad_image_indices_are_refused_naming_what_was_found(tmp_path, content, words):
    np.save(tmp_path / "idx.npy", content)
    with pytest.raises(InputError, match=words):
        _indices(tmp_path / "idx.npy", 10_000)


def test_serial_devices_parse_to_their_port():
    board = parse_device("serial:///dev/ttyACM0")
    assert (board.kind, board.url, board.key) == ("serial", "/dev/ttyACM0", "serial-dev-ttyACM0")
    assert parse_device("socket://127.0.0.1:4444").url == "socket://127.0.0.1:4444"


class ScriptedBoard:
    """A local socket that answers the protocol as a board whose firmware restarts during chosen `infer`
    commands: what the client does on a real board that resets (the issue's "host client on a local socket")."""

    def __init__(self, model: str, resets: int):
        import socket
        import threading

        self.model, self.resets, self.server = model, resets, socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.url = f"socket://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        connection, _ = self.server.accept()
        pending = b""
        while True:
            data = connection.recv(4096)
            if not data:
                return
            pending += data
            while b"%" in pending:
                command, pending = pending.split(b"%", 1)
                connection.sendall(self._answer(command.decode()).encode())

    def _answer(self, command: str) -> str:
        if command == "profile":
            return f"m-profile-[x]\r\nm-model-[{self.model}]\r\nm-ready\r\n"
        if command.startswith("infer"):
            if self.resets:
                self.resets -= 1
                return "m-init-done\r\nm-ready\r\n"
            return "m-lap-us-0\r\nm-lap-us-0\r\nm-results-[0.5,0.25]\r\nm-results-int8-[3,-4]\r\nm-ready\r\n"
        return "m-ready\r\n"


def test_a_board_that_restarts_gets_the_image_again_once_then_a_clear_error():
    from pipeline.device.serial_protocol import run_benchmark
    from pipeline.errors import DeviceError

    x = np.zeros((2, 4, 4, 3), np.int8)
    run = run_benchmark(ScriptedBoard("a" * 64, resets=1).url, x, model_sha256="a" * 64)
    assert run.outputs.tolist() == [[3, -4], [3, -4]]
    with pytest.raises(DeviceError, match=r"reset twice on image 0: .*reset during 'infer 1 0'"):
        run_benchmark(ScriptedBoard("a" * 64, resets=2).url, x, model_sha256="a" * 64)
