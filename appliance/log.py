"""Structured (JSON lines) logging. Callers pass fields, never request or response content."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import orjson

logger = logging.getLogger("appliance")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception's type and where it happened; its message may carry request content.
            exc_type, _, tb = record.exc_info
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            entry["error"] = exc_type.__name__
            if tb is not None:
                entry["where"] = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        return orjson.dumps(entry, default=str).decode()


_access_stream: TextIO | None = None


def setup_logging(level: str) -> None:
    global _access_stream
    _access_stream = sys.stderr if logging.getLevelName(level.upper()) <= logging.INFO else None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would duplicate ours and lacks the fields; its error log stays.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


def access(fields: dict[str, Any]) -> None:
    """The one line per request, in the same shape as `event`, written without the logging
    machinery's per-record cost: it is on the hot path."""
    if _access_stream is not None:
        entry = {"ts": round(time.time(), 3), "level": "info", "event": "request", **fields}
        _access_stream.write(orjson.dumps(entry).decode() + "\n")


def elapsed_ms(start: float) -> float:
    """Milliseconds since a `time.perf_counter()` reading, rounded for logs."""
    return round((time.perf_counter() - start) * 1000, 2)
