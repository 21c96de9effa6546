"""SIGINT and SIGTERM as an exception that unwinds the pipeline and says which stage it stopped.

Raising (instead of dying) lets every ``finally`` run: atomic writes remove their temp files, locks
are released, and finished cache entries stay, so a rerun continues from them.

:func:`stage` is where every stage of a build starts (the manifest's ``timed`` and the sub-stages
``reconstruct``, ``fidelity``, ``profile`` call it), so it is also where faults are injected:
``DFQ_DEPLOY_FAULT_STAGE=<stage>`` makes the process SIGKILL itself on entering that stage, as a
power loss or the OOM killer would, for tests that check what a killed build leaves on disk
(:func:`fault_point`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from dfq_deploy.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
FAULT_STAGE_ENV = "DFQ_DEPLOY_FAULT_STAGE"


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
    """Name the stage an :class:`Interrupted` raised inside the block stopped (innermost wins).

    Entering it is where :data:`FAULT_STAGE_ENV` kills the process (:func:`fault_point`).
    """
    fault_point(name)
    try:
        yield
    except Interrupted as exc:
        if exc.stage is None:
            exc.stage = name
        raise


def fault_point(name: str) -> None:
    """The test-only fault of ``$DFQ_DEPLOY_FAULT_STAGE``: ``<name>`` SIGKILLs this process on
    reaching point ``name`` (a stage's start; ``cache_entry``: a cache entry about to be made, its
    lock held; ``write FILE``: an atomic write of FILE done but not yet renamed into place);
    ``<name>:stop`` SIGSTOPs it there instead, until a SIGCONT.

    SIGKILL, not an exception: no ``finally`` runs and the lock files stay, which is exactly what a
    killed build leaves and what the next build must recover from.
    """
    wanted = os.environ.get(FAULT_STAGE_ENV)
    if not wanted:
        return
    point, _, action = wanted.partition(":")
    if point == name:
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
