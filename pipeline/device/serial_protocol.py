"""The host side of MLPerf Tiny's benchmark protocol (EEMBC's serial commands), over pyserial's `serial_for_url`:
a board's port (`/dev/ttyACM0`, `COM3`) or a TCP socket (`socket://127.0.0.1:PORT`, the emulated board's UART).

Each command is text ended by '%'; the firmware answers with lines and ends with `m-ready`. An input travels as
`db load N` then `db <hex>` commands of at most EE_CMD_SIZE (80) characters; `infer N W` runs W untimed and N timed
inferences and answers with the timestamps (`m-lap-us-...`) and the results (`m-results-[...]`). Our firmware adds
the raw int8 output (`m-results-int8-[...]`) and the DWT cycles of the timed inferences (`m-dwt-cycles-[...]`).
"""

import re
import time
from dataclasses import dataclass

import numpy as np

from pipeline.errors import DeviceError

HEX_BYTES = 32  # per `db` command: "db " + 64 hex digits stays under the firmware's 80-character command buffer
DEFAULT_TIMEOUT = 60.0  # seconds a reply may take: one inference on a slow board, or the emulated one on a busy host


@dataclass(frozen=True)
class Inference:
    scores: np.ndarray  # float32, the dequantized outputs the official runner reads
    int8: np.ndarray  # the raw int8 outputs
    microseconds: int | None  # the timed inferences' wall time by the board's clock; None where it has none
    cycles: int | None  # DWT cycles of the timed inferences; None where the board has no counter
    runs: int  # timed inferences


class BoardReset(DeviceError):
    """The board started again (m-init-done) in the middle of a command."""


class BenchmarkClient:
    """One open connection to a board running the benchmark firmware. `url` as `serial.serial_for_url` takes it."""

    def __init__(self, url: str, *, baud: int = 115200, timeout: float = DEFAULT_TIMEOUT, connect_within: float = 0.0,
                 port=None):
        self.url, self.timeout, self.last_line = url, timeout, ""
        self.port = port if port is not None else _open(url, baud=baud, within=connect_within)
        self._buffer = b""

    def close(self) -> None:
        self.port.close()

    def __enter__(self) -> "BenchmarkClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self, deadline: float, command: str) -> str:
        while b"\n" not in self._buffer:
            if time.monotonic() > deadline:
                raise DeviceError(f"No reply from {self.url} to '{command}' within {self.timeout:.0f} s; last line "
                                  f"received: {self.last_line or '(none)'}")
            try:
                chunk = self.port.read(max(1, getattr(self.port, "in_waiting", 0) or 1))
            except OSError as exc:
                raise DeviceError(f"{self.url} failed during '{command}': {exc}; last line received: "
                                  f"{self.last_line or '(none)'}") from exc
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        self.last_line = line.decode("ascii", "replace").strip()
        return self.last_line

    def wait_ready(self, *, what: str = "start-up") -> list[str]:
        """Lines up to the next m-ready (after a reset: the firmware's greeting)."""
        deadline, lines = time.monotonic() + self.timeout, []
        while (line := self._line(deadline, what)) != "m-ready":
            lines.append(line)
        return lines

    def sync(self) -> None:
        """Skip whatever replies are still on their way (a command sent while the board restarted may or may not
        have been answered): `name` is sent, and everything up to its own answer is dropped."""
        self.port.write(b"name%")
        self.port.flush()
        deadline = time.monotonic() + self.timeout
        while not self._line(deadline, "name").startswith("m-name-"):
            pass
        while self._line(deadline, "name") != "m-ready":
            pass

    def command(self, text: str) -> list[str]:
        """Send one command; its reply lines up to m-ready. An `e-[...]` line is an error naming the command."""
        self.port.write(text.encode("ascii") + b"%")
        self.port.flush()
        deadline, lines = time.monotonic() + self.timeout, []
        while (line := self._line(deadline, text)) != "m-ready":
            if line == "m-init-done":
                raise BoardReset(f"{self.url} reset during '{text[:40]}' (m-init-done again)")
            lines.append(line)
        errors = [line for line in lines if line.startswith("e-[")]
        if errors:
            raise DeviceError(f"{self.url} answered '{text[:40]}' with {errors[0]}")
        return lines

    def name(self) -> str:
        return _field(self.command("name"), r"m-name-(.*)")

    def profile(self) -> dict:
        """The firmware's version and model (our firmware names the model by its .tflite's SHA-256)."""
        lines = self.command("profile")
        return {"firmware": _field(lines, r"m-profile-\[(.*)\]"), "model": _field(lines, r"m-model-\[(.*)\]")}

    def load(self, data: bytes) -> None:
        """Put one input tensor's bytes in the firmware's buffer."""
        self.command(f"db load {len(data)}")
        for start in range(0, len(data), HEX_BYTES):
            self.command("db " + data[start:start + HEX_BYTES].hex())

    def infer(self, runs: int = 1, warmup: int = 0) -> Inference:
        lines = self.command(f"infer {runs} {warmup}")
        laps = [int(m[1]) for line in lines if (m := re.fullmatch(r"m-lap-us-(\d+)", line))]
        unavailable = any(line.startswith("m-timing-[unavailable") for line in lines)
        cycles = [int(m[1]) for line in lines if (m := re.fullmatch(r"m-dwt-cycles-\[(\d+)\]", line))]
        return Inference(
            scores=np.array([float(v) for v in _field(lines, r"m-results-\[(.*)\]").split(",")], np.float32),
            int8=np.array([int(v) for v in _field(lines, r"m-results-int8-\[(.*)\]").split(",")], np.int8),
            microseconds=None if unavailable or len(laps) < 2 else laps[-1] - laps[0],
            cycles=cycles[-1] if cycles and not unavailable else None, runs=runs)


def _field(lines: list[str], pattern: str) -> str:
    for line in lines:
        found = re.fullmatch(pattern, line)
        if found:
            return found[1]
    raise DeviceError(f"Expected a line matching {pattern!r} in the reply; got: {' | '.join(lines)[-300:]}")


def _open(url: str, *, baud: int, within: float):
    """The port `url` names, retried for `within` seconds (an emulated board's socket opens once qemu is up)."""
    import serial

    deadline = time.monotonic() + within
    while True:
        try:
            return serial.serial_for_url(url, baudrate=baud, timeout=0.5)
        except (serial.SerialException, ValueError, OSError) as exc:
            if time.monotonic() >= deadline:
                busy = " (busy: another program holds it)" if "busy" in str(exc).lower() else ""
                raise DeviceError(f"Cannot open {url}{busy}: {exc}") from exc
            time.sleep(0.1)


@dataclass(frozen=True)
class BoardRun:
    outputs: np.ndarray  # int8, one row per input
    seconds: float  # wall time through the serial path
    milliseconds: float | None  # per inference by the board's DWT clock; None where the board has none
    cycles: int | None  # DWT cycles per inference (median); None where the board has none
    model_sha256: str  # what the firmware's `profile` reply names


def run_benchmark(url: str, x_int8: np.ndarray, *, model_sha256: str, baud: int = 115200, fresh: bool = False,
                  connect_within: float = 0.0, timeout: float = DEFAULT_TIMEOUT) -> BoardRun:
    """Every input (int8, one per row, as the model's input tensor takes it) through the board's firmware: loaded,
    inferred once, its int8 output read back. A board running another model (the `profile` reply names its .tflite's
    SHA-256) is refused, naming both; a board that resets mid-image gets that image once more, then an error.
    `fresh`: the board starts as the connection opens (the emulated one), so its start-up lines come first."""
    started = time.perf_counter()
    with BenchmarkClient(url, baud=baud, timeout=timeout, connect_within=connect_within) as client:
        if fresh:
            client.wait_ready(what="start-up")
        try:
            running = client.profile()["model"]
        except BoardReset:  # it was starting as we connected (an emulated board waits for its first connection)
            client.sync()
            running = client.profile()["model"]
        if running != model_sha256:
            raise DeviceError(f"{url} runs another model: its firmware names {running}, this build's model.tflite is "
                              f"{model_sha256}; flash this build's firmware (`make flash`) first")
        outputs, cycles, microseconds = [], [], []
        for i, x in enumerate(np.ascontiguousarray(x_int8, dtype=np.int8)):
            for attempt in (1, 2):
                try:
                    client.load(x.tobytes())
                    result = client.infer(1, 0)
                    break
                except BoardReset as exc:
                    if attempt == 2:
                        raise DeviceError(f"{url} reset twice on image {i}: {exc}") from exc
                    client.wait_ready(what="the board's restart")
            outputs.append(result.int8)
            if result.cycles is not None:
                cycles.append(result.cycles)
            if result.microseconds is not None:
                microseconds.append(result.microseconds)
    return BoardRun(np.stack(outputs), time.perf_counter() - started,
                    float(np.median(microseconds)) / 1000 if microseconds else None,
                    int(np.median(cycles)) if cycles else None, running)
