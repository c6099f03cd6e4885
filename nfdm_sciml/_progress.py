"""Progress reporting for long runs: an explicit object the caller passes in.

The library prints nothing by itself; a trainer reports to the progress object it was
given. `TextProgress` writes plain lines (logs, CI, files); `BarProgress` redraws one
line on a terminal; `default_progress` picks between them.
"""

import abc
import sys
import time
from typing import Any


class AbstractProgress(abc.ABC):
    """Receives `start(total)`, then `update(step, metrics)` after each chunk of steps,
    then `close()`."""

    @abc.abstractmethod
    def start(self, total: int, initial: int = 0) -> None: ...

    @abc.abstractmethod
    def update(self, step: int, metrics: dict[str, float]) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class NoProgress(AbstractProgress):
    """Reports nothing."""

    def start(self, total: int, initial: int = 0) -> None:
        del total, initial

    def update(self, step: int, metrics: dict[str, float]) -> None:
        del step, metrics

    def close(self) -> None:
        pass


def _rate(start_time: float, start_step: int, step: int) -> float:
    elapsed = time.perf_counter() - start_time
    return (step - start_step) / elapsed if elapsed > 0 else float("nan")


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class TextProgress(AbstractProgress):
    """One plain line per update: step, metrics and steps per second."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.total, self.t0, self.s0 = 0, 0.0, 0

    def start(self, total: int, initial: int = 0) -> None:
        self.total, self.t0, self.s0 = total, time.perf_counter(), initial

    def update(self, step: int, metrics: dict[str, float]) -> None:
        rate = _rate(self.t0, self.s0, step)
        width = len(str(self.total))
        self.stream.write(
            f"step {step:{width}d}/{self.total}  {_format(metrics)}  {rate:.1f} it/s\n"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class BarProgress(AbstractProgress):
    """A progress bar redrawn in place on a terminal, with metrics and rate."""

    def __init__(self, stream: Any = None, width: int = 24):
        self.stream, self.width = stream or sys.stderr, width
        self.total, self.t0, self.s0 = 0, 0.0, 0

    def start(self, total: int, initial: int = 0) -> None:
        self.total, self.t0, self.s0 = total, time.perf_counter(), initial

    def update(self, step: int, metrics: dict[str, float]) -> None:
        rate = _rate(self.t0, self.s0, step)
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        self.stream.write(
            f"\r[{bar}] {step}/{self.total}  {_format(metrics)}  {rate:.1f} it/s  "
            f"eta {eta:.0f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def default_progress(stream: Any = None) -> AbstractProgress:
    """A `BarProgress` if `stream` (default stderr) is a terminal, else plain lines."""
    stream = stream if stream is not None else sys.stderr
    return BarProgress(stream) if stream.isatty() else TextProgress(stream)
