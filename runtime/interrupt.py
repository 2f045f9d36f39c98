"""SIGINT / SIGTERM during training: finish the step, save, stop; a second signal abandons the step at once.

A signal never interrupts a step half-way: the first one is only recorded, and the loop stops after the step in
flight, saving a checkpoint whose data position is the one its weights saw. A second signal exits immediately
(os._exit) without saving; that is safe because the run directory is only changed by atomic renames, so it resumes
from the last checkpoint. Handlers are installed only in the main thread (Python's rule) and restored afterwards, so
an app that embeds `train` keeps its own.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class StopOnSignal:
    """Context manager; `requested` is the name of the first signal received (or None)."""

    def __init__(self, enabled: bool = True, abandon_message: str = "") -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None
        self.abandon_message = abandon_message
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"\n{name}: stopping after this step and saving a checkpoint (send it again to stop at once)",
                  file=sys.stderr, flush=True)
            return
        print(f"\n{name} again: stopping now without saving; {self.abandon_message}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by the signal: 128 + its number."""
        return 128 + int(getattr(signal, self.requested)) if self.requested else 0
