"""Log output shared by ``caviar serve`` and ``caviar worker``: text lines or JSON lines.

Both formats carry the same things: a UTC timestamp, the level, the logger's name, the message
and the record's structured fields (the ``extra={...}`` of a logging call, plus the fields a
process adds to every record, such as a worker slot's ``slot`` and ``device``).

- ``json``: one JSON object per line, ``{"timestamp": "2026-05-01T12:00:00.123Z", "level":
  "INFO", "logger": "caviar.access", "message": "request", "pid": 4242, "method": "GET", ...}``;
  a traceback goes into ``exception``. Every line is valid JSON whatever the message holds.
- ``text``: ``2026-05-01T12:00:00.123Z INFO caviar.access request method=GET status=200 ...``;
  field values with spaces, quotes or control characters are quoted (JSON string syntax), so a
  value can never start a line of its own.

Standard library only: the worker package and the service both use it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_LEVELS: tuple[LogLevel, ...] = ("critical", "error", "warning", "info", "debug")

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
_MARK = "_caviar_handler"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: what ``extra=`` and the process's filter added."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return (
        datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, then the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


def _text_value(value: Any) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    """``<timestamp> <LEVEL> <logger> <message> key=value ...`` (one line; a traceback follows it)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():
            message = json.dumps(message)[1:-1]  # a newline or escape sequence stays on this line
        line = f"{_timestamp(record)} {record.levelname} {record.name} {message}"
        fields = " ".join(f"{key}={_text_value(value)}" for key, value in record_fields(record).items())
        if fields:
            line = f"{line} {fields}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class _StaticFields(logging.Filter):
    """Adds the same fields to every record (a worker slot's ``slot`` and ``device``)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``).

    Raises:
        ValueError: another format.
    """
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)} (got {log_format!r})")


def configure_logging(
    log_format: str = "text",
    level: str = "info",
    *,
    fields: dict[str, Any] | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send this process's log records to ``stream`` (stderr) in ``log_format`` at ``level``.

    Replaces the handler an earlier call installed (and only that one); routes Python warnings
    into logging, so nothing else writes unformatted lines.

    Args:
        log_format: ``text`` or ``json``.
        level: ``critical``, ``error``, ``warning``, ``info`` or ``debug``.
        fields: structured fields added to every record of this process.
        stream: where the lines go (default: ``sys.stderr``).

    Returns:
        The installed handler.

    Raises:
        ValueError: an unknown format or level.
    """
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)} (got {level!r})")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    if fields:
        handler.addFilter(_StaticFields(fields))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    return handler


def announce(log_format: str, logger: str, message: str, **fields: Any) -> None:
    """Print a start-up banner to stdout whatever the log level: ``message`` as it is, or a JSON line."""
    if log_format != "json":
        print(message, flush=True)
        return
    record = logging.LogRecord(logger, logging.INFO, __file__, 0, message, (), None)
    record.__dict__.update(fields)
    print(JsonFormatter().format(record), flush=True)
