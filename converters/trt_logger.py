"""The one TensorRT logger of this process, forwarding to Python logging.

TensorRT keeps the first ILogger it is given for the whole process (a second one is ignored with a
warning), so every builder, parser and runtime in dfq-deploy shares one per module.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

log = logging.getLogger(__name__)


class _Logger:
    """Forwards TensorRT's messages to Python logging; :meth:`capture` collects warnings and errors."""

    def __init__(self, trt: ModuleType):
        severity = trt.ILogger.Severity
        self._ranks = {
            severity.INTERNAL_ERROR: 0,
            severity.ERROR: 1,
            severity.WARNING: 2,
            severity.INFO: 3,
            severity.VERBOSE: 4,
        }
        self._module = trt.__name__
        self._captures: list[list[str]] = []
        self.recent: collections.deque[str] = collections.deque(maxlen=50)  # warnings and errors

    def log(self, severity, msg: str) -> None:
        rank = self._ranks.get(severity, 4)
        if rank <= 2:
            self.recent.append(msg)
            for messages in self._captures:
                messages.append(msg)
        log.log(
            {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING}.get(rank, logging.DEBUG),
            "[%s] %s",
            self._module,
            msg,
        )

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect the warnings and errors logged inside the block (a build's own messages)."""
        messages: list[str] = []
        self._captures.append(messages)
        try:
            yield messages
        finally:
            self._captures.remove(messages)


@functools.cache
def process_logger(module_name: str):
    """The one ILogger of this process for ``module_name``: TensorRT keeps the first logger it is given
    for the whole process, so every builder and runtime here shares it."""
    trt = importlib.import_module(module_name)

    class ProcessLogger(_Logger, trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            _Logger.__init__(self, trt)

    return ProcessLogger()
