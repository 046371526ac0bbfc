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
import re
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


# A line naming an exception and its message, as tracebacks end; vLLM's generic wrappers say nothing.
_CAUSE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Timeout)): (.+)$")
_GENERIC = ("EngineDeadError", "EngineGenerateError", "Engine core initialization failed", "See root cause above")


class EngineLog:
    """The log file of one run, read from where this run started writing."""

    def __init__(self, path: Path):
        self.path = path
        self.start = path.stat().st_size if path.is_file() else 0

    def cause(self) -> str | None:
        """The last exception line the engine libraries wrote in this run (its root cause), if any."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.start)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return None
        for line in reversed(text.splitlines()):
            line = line.strip()
            match = _CAUSE.match(line.split("] ", 1)[-1] if line.startswith("(") else line)
            if match and not any(generic in line for generic in _GENERIC):
                return f"{match[1]}: {match[2]}"
        return None


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None  # replaced by a capture (pytest's capsys): nothing at the fd level to move


@contextlib.contextmanager
def engine_output_to(log_path: Path) -> Iterator[EngineLog | None]:
    """Within the block, file descriptor 2 (inherited by every process vLLM and Ray start) and every
    logger but cm-run's write to ``log_path``; ``sys.stderr`` still reaches the terminal."""
    # vLLM then leaves its loggers to ours (set before vLLM is imported; its processes inherit it)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    root = logging.getLogger()
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_path, encoding="utf-8")
    except OSError:  # an output dir that cannot be written: the job itself will say so
        yield None
        return
    log = EngineLog(log_path)
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
        with log_path.open("ab") as handle:
            os.dup2(handle.fileno(), 2)
    for handler in terminal_handlers:
        handler.addFilter(ours)
        if saved_stderr is not None and getattr(handler, "stream", None) is saved_stderr:
            handler.setStream(sys.stderr)
    root.addHandler(to_file)
    logging.captureWarnings(True)
    os.environ[ENGINE_LOG_ENV] = str(log_path)  # a local Ray then keeps its workers' output in its own logs
    try:
        yield log
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
