"""How the CLI prints: JSON, aligned tables, local times, and a progress spinner on stderr.

Results go to stdout and notes to stderr, so ``nimbus ... --json | jq`` sees only the result.
"""

import json
import sys
import threading
import time
from datetime import datetime
from typing import Any

import typer


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def note(message: str) -> None:
    typer.echo(message, err=True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
             for row in [headers, *rows])
    return "\n".join(lines)


def when(value: str | None) -> str:
    """An API timestamp as local time to the second; as given when it does not parse."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def number(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.1f}" if not value.is_integer() else f"{value:.0f}"
    else:
        text = str(value)
    return text + unit


def duration(ms: float | None) -> str:
    # Warm calls take well under a millisecond: keep two decimals so they do not all read 0.0.
    return "-" if ms is None else f"{ms:.2f}"


def mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


class Progress:
    """A spinner with the elapsed time on a terminal's stderr; one plain line when stderr is not a terminal."""

    INTERVAL_S = 0.1

    def __init__(self, message: str) -> None:
        self.message = message
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._began = 0.0
        encoding = (getattr(sys.stderr, "encoding", "") or "").lower()
        self._frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if "utf" in encoding else "-\\|/"

    def __enter__(self) -> "Progress":
        self._began = time.monotonic()
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._spin, name="nimbus-progress", daemon=True)
            self._thread.start()
        else:
            note(f"{self.message}...")
        return self

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(self.INTERVAL_S):
            elapsed = time.monotonic() - self._began
            sys.stderr.write(f"\r{self._frames[frame % len(self._frames)]} {self.message} {elapsed:.0f}s")
            sys.stderr.flush()
            frame += 1

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\033[K")  # clear the spinner's line
            sys.stderr.flush()


class Steps:
    """Progress for a multi-step job: one spinner per step, each replacing the one before."""

    def __init__(self) -> None:
        self._current: Progress | None = None

    def __call__(self, message: str) -> None:
        self.close()
        self._current = Progress(message)
        self._current.__enter__()

    def close(self) -> None:
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self._current = None
