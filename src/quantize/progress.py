"""A progress bar on stderr for long commands, with no dependency.

It appears only on a terminal and only once a job has run for `delay` seconds (so quick jobs
and pipes/log files stay clean), redraws at most every `interval` seconds, and erases itself
when the job ends. The I/O adapters take a plain callback, `step(label)`, called once per
tensor; this module turns that into a bar. QUANTIZE_PROGRESS=0 turns it off, =1 forces it on
(even when stderr is not a terminal).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

ENV_SWITCH = "QUANTIZE_PROGRESS"


class ProgressBar:
    """`total` steps; call it with a label after each one. Draws `[####----] 3/8 label 1.2s`."""

    def __init__(
        self,
        total: int,
        what: str = "tensors",
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        delay: float = 1.0,
        interval: float = 0.1,
        width: int = 28,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.what = max(int(total), 0), what
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _wanted(self.stream) if enabled is None else enabled
        self.delay, self.interval, self.width, self.clock = delay, interval, width, clock
        self.done = 0
        self.start = clock()
        self._last_draw: float | None = None
        self._drawn = 0  # characters on the line now, to erase them

    def __call__(self, label: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        now = self.clock()
        if now - self.start < self.delay:
            return
        recent = self._last_draw is not None and now - self._last_draw < self.interval
        if recent and self.done < self.total:  # the last step is always drawn
            return
        self._last_draw = now
        self._draw(label, now - self.start)

    def _draw(self, label: str, elapsed: float) -> None:
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        full = round(frac * self.width)
        bar = "#" * full + "-" * (self.width - full)
        text = f"[{bar}] {self.done}/{self.total} {self.what} {elapsed:.1f}s"
        if label:
            text += f"  {label if len(label) <= 40 else '...' + label[-37:]}"
        pad = max(self._drawn - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._drawn = len(text)

    def close(self) -> None:
        """Erase the bar (the command's own output follows on a clean line)."""
        if self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0


def _wanted(stream: TextIO) -> bool:
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if switch in ("0", "1"):
        return switch == "1"
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress_bar(total: int, what: str = "tensors", **kwargs) -> Iterator[ProgressBar]:
    """A `ProgressBar` that is erased when the block ends, however it ends."""
    bar = ProgressBar(total, what, **kwargs)
    try:
        yield bar
    finally:
        bar.close()
