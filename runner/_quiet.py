"""Keep the engine libraries' own output (vLLM's INFO and WARNING lines, Triton and LD_PRELOAD
notes, deprecation warnings, C++ warnings, its processes' output) out of the terminal.

It goes to a log file instead, so a failure can still be read in full. cm-run's own messages,
progress and summary keep the terminal. ``--verbose`` skips all this.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

OURS = ("runner", "root")
ENGINE_LOG_ENV = "CM_ENGINE_LOG"


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS


class _Theirs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] not in OURS


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None  # replaced by a capture (pytest's capsys): nothing at the fd level to move


@contextlib.contextmanager
def engine_output_to(log_path: Path) -> Iterator[None]:
    """Within the block, file descriptor 2 (inherited by every process vLLM and Ray start) and every
    logger but cm-run's write to ``log_path``; ``sys.stderr`` still reaches the terminal."""
    # vLLM then leaves its loggers to ours (set before vLLM is imported; its processes inherit it)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    root = logging.getLogger()
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_path, encoding="utf-8")
    except OSError:  # an output dir that cannot be written: the job itself will say so
        yield
        return
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    to_file.addFilter(_Theirs())
    ours = _Ours()
    terminal_handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
    fd = _stderr_fd()
    saved_fd = saved_stderr = None
    if fd == 2:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        saved_stderr = sys.stderr
        sys.stderr = os.fdopen(saved_fd, "w", buffering=1, encoding=saved_stderr.encoding, errors="backslashreplace")
        with log_path.open("ab") as log:
            os.dup2(log.fileno(), 2)
    for handler in terminal_handlers:
        handler.addFilter(ours)
        if saved_stderr is not None and getattr(handler, "stream", None) is saved_stderr:
            handler.setStream(sys.stderr)
    root.addHandler(to_file)
    logging.captureWarnings(True)
    os.environ[ENGINE_LOG_ENV] = str(log_path)  # a local Ray then keeps its workers' output in its own logs
    try:
        yield
    finally:
        logging.captureWarnings(False)
        os.environ.pop(ENGINE_LOG_ENV, None)
        root.removeHandler(to_file)
        to_file.close()
        for handler in terminal_handlers:
            handler.removeFilter(ours)
        if saved_stderr is not None:
            sys.stderr.flush()
            os.dup2(sys.stderr.fileno(), 2)
            for handler in terminal_handlers:
                if getattr(handler, "stream", None) is sys.stderr:
                    handler.setStream(saved_stderr)
            sys.stderr.close()
            sys.stderr = saved_stderr
