"""How portvlm talks to the person waiting: progress on long work, Ctrl-C, closed pipes, wrapped text.

Progress says what runs now, how many of how many, and the elapsed time: a live rich line on a terminal, one
plain line per event elsewhere (CI logs stay readable and greppable). A child process (a cell's suites, a
benchmark's stage) reports with :func:`child_progress`; the parent that reads its output passes those lines on
(:func:`progress_text`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import TextIO

# A line a child prints to say where it is; the runner reads the child's log for these. Plain ASCII, unlikely
# to start any other line.
# A minor line (one check of a suite) shows on a terminal's live line only, never as a line of a CI log.
PROGRESS_PREFIX = "@@portvlm-progress "
MINOR_PREFIX = "@@portvlm-progress~ "
# Set by the parent that reads the lines (the runner for a cell's child); anyone else's stdout stays clean.
PROGRESS_ENV = "PORTVLM_PROGRESS"


def child_progress(text: str, *, minor: bool = False, stream: TextIO | None = None) -> None:
    """Report ``text`` (``"parity 1/3"``) to the parent that runs this process (when it set ``PORTVLM_PROGRESS``)."""
    if stream is None and not os.environ.get(PROGRESS_ENV):
        return
    stream = stream or sys.stdout
    with contextlib.suppress(OSError, ValueError):  # a closed stdout never fails the work it reports on
        stream.write(f"{MINOR_PREFIX if minor else PROGRESS_PREFIX}{' '.join(str(text).split())}\n")
        stream.flush()


def progress_text(line: str) -> tuple[str, bool] | None:
    """``(text, minor)`` of a :func:`child_progress` line, or None for any other line."""
    line = line.rstrip("\n")
    for prefix, minor in ((PROGRESS_PREFIX, False), (MINOR_PREFIX, True)):
        if line.startswith(prefix):
            return line[len(prefix):], minor
    return None


def format_elapsed(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def is_terminal(stream: TextIO) -> bool:
    """A person is watching ``stream`` (a tty, colour not refused by NO_COLOR / TERM=dumb)."""
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of ``total`` steps titled ``title``: ``start(name)`` per step, ``note(text)`` within it.

    On a terminal a rich live line shows ``title  i/n  name · note  elapsed``; elsewhere each ``start`` and
    ``note`` prints one line ``[i/n 3m05s] name · note``. ``say`` prints a permanent line either way.
    """

    def __init__(self, title: str, total: int | None = None, *, stream: TextIO | None = None,
                 live: bool | None = None, min_note_interval: float = 0.0, heartbeat: float = 30.0):
        self.title, self.total = title, total
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.index, self.current, self.detail = 0, "", ""
        self.t0 = time.monotonic()
        self.min_note_interval = min_note_interval
        self.heartbeat = heartbeat  # plain mode: a minor note prints when nothing was printed for this long
        self._last_note = 0.0
        self._last_line = time.monotonic()
        self._rich = None
        self._task = None

    # -- context ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self.live:
            try:
                from rich.console import Console
                from rich.progress import MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress

                console = Console(file=self.stream, highlight=False)
                self._rich = RichProgress(SpinnerColumn(), TextColumn("[bold]{task.fields[title]}"),
                                          MofNCompleteColumn(), TextColumn("{task.description}"),
                                          TimeElapsedColumn(), console=console, transient=True)
                self._rich.start()
                self._task = self._rich.add_task("", total=self.total, title=self.title)
            except Exception:  # noqa: BLE001 - no rich, odd terminal: plain lines still say everything
                self._rich, self.live = None, False
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # -- events ----------------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _counter(self) -> str:
        return f"{self.index}/{self.total}" if self.total else f"{self.index}"

    def start(self, name: str) -> None:
        """Step ``index + 1`` begins: ``name`` is what runs now."""
        if self._rich is not None and self.index:
            self._rich.advance(self._task)
        self.index += 1
        self.current, self.detail = name, ""
        if self._rich is not None:
            self._rich.update(self._task, description=name)
        else:
            self._line(f"[{self._counter()} {format_elapsed(self.elapsed)}] {self.title}: {name}")

    def note(self, text: str, minor: bool = False) -> None:
        """Where the current step is (``parity 1/3``). Plain lines are rate-limited by ``min_note_interval``;
        a ``minor`` note (one check) shows on the live line, and in plain mode only after ``heartbeat`` s of quiet."""
        self.detail = text
        if self._rich is not None:
            self._rich.update(self._task, description=f"{self.current} · {text}" if self.current else text)
            return
        now = time.monotonic()
        if minor and now - self._last_line < self.heartbeat:
            return  # a CI log gets at most one such line per heartbeat: it shows the run is alive, and where
        if now - self._last_note < self.min_note_interval:
            return
        self._last_note = now
        where = f"{self.current} · " if self.current else ""
        self._line(f"  [{self._counter()} {format_elapsed(self.elapsed)}] {where}{text}")

    def say(self, text: str = "") -> None:
        """A permanent line (a result, a warning), above the live line on a terminal."""
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self._line(text)

    def _line(self, text: str) -> None:
        self._last_line = time.monotonic()
        self.stream.write(text + "\n")
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C stops the work however the process was launched.

    A process started with SIGINT ignored (a background job of a non-interactive shell, some CI runners) never
    gets Python's KeyboardInterrupt, and what it starts inherits the ignore. For the duration, SIGINT raises
    KeyboardInterrupt here, and children (whose handlers reset at exec) start with the default action.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    replace = previous in (signal.SIG_IGN, signal.SIG_DFL, None)
    if replace:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if replace:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def wrap(text: str, width: int | None = None, indent: str | None = None) -> list[str]:
    """``text`` wrapped at word boundaries to ``width`` (the terminal's, else 100); continuation lines keep the
    first line's indentation plus ``indent`` (default: four spaces). A word longer than the width is left whole."""
    width = width or terminal_width()
    lead = text[: len(text) - len(text.lstrip(" "))]
    if len(text) <= width:
        return [text]
    return textwrap.wrap(text, width=width, initial_indent="", subsequent_indent=lead + ("    " if indent is None else indent),
                         break_long_words=False, break_on_hyphens=False, drop_whitespace=True) or [text]


def terminal_width(default: int = 100) -> int:
    """The terminal's width (``COLUMNS`` first), or ``default`` when there is none."""
    with contextlib.suppress(ValueError):
        if os.environ.get("COLUMNS"):
            return max(40, int(os.environ["COLUMNS"]))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if sys.stdout.isatty():
            return max(40, os.get_terminal_size(sys.stdout.fileno()).columns)
    return default


def closed_pipe_exit() -> int:
    """The reader of stdout went away (``portvlm matrix | head``): stop quietly with 141 (128 + SIGPIPE).

    Python would print a second BrokenPipeError while flushing stdout at exit; point stdout at /dev/null first.
    https://docs.python.org/3/library/signal.html#note-on-sigpipe
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file descriptor (a test's StringIO)
        pass
    finally:
        os.close(devnull)
    return 141
