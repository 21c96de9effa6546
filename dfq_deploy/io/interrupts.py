"""SIGINT and SIGTERM as an exception that unwinds the pipeline and says which stage it stopped.

Raising (instead of dying) lets every ``finally`` run: atomic writes remove their temp files, locks
are released, and finished cache entries stay, so a rerun continues from them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from dfq_deploy.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (once; a second signal gets
    the handler that was there before, so a stuck cleanup can still be stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def handler(signum, frame):
        for s, old in previous.items():
            signal.signal(s, old)
        raise Interrupted(signum)

    for signum in SIGNALS:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage an :class:`Interrupted` raised inside the block stopped (innermost wins)."""
    try:
        yield
    except Interrupted as exc:
        if exc.stage is None:
            exc.stage = name
        raise
