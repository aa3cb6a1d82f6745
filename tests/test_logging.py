"""The shared log formats (``caviar._logging``): JSON lines that always parse, one-line text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from caviar._logging import announce, configure_logging

NASTY = 'line one\nline two\r\x1b[31m"quoted" {braces} \x00 ünïcode'


@pytest.fixture
def root_state() -> Iterator[None]:
    """Restore the root logger's handlers and level after a test that configures logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _emit(log_format: str, **fields: object) -> list[str]:
    stream = io.StringIO()
    configure_logging(log_format, "debug", fields={"slot": 3, "device": "cpu"}, stream=stream)
    log = logging.getLogger("caviar.test")
    log.info("hello %s", NASTY, extra=fields)
    try:
        raise ValueError(NASTY)
    except ValueError:
        log.exception("it broke")
    log.debug("quiet")
    return stream.getvalue().splitlines()


@pytest.mark.usefixtures("root_state")
def test_json_lines_parse_and_carry_the_fields() -> None:
    lines = _emit("json", route="/api/v1/studies/{name}", status=200, level="not mine", odd=object())
    assert len(lines) == 3  # one object a line, the traceback included
    first, broken, quiet = (json.loads(line) for line in lines)
    assert first["message"] == f"hello {NASTY}"
    assert (first["level"], first["logger"], first["route"], first["status"]) == (  # level: not the extra
        "INFO",
        "caviar.test",
        "/api/v1/studies/{name}",
        200,
    )
    assert (first["slot"], first["device"]) == (3, "cpu")
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert isinstance(first["pid"], int) and first["odd"].startswith("<object")
    assert broken["level"] == "ERROR" and "ValueError" in broken["exception"]
    assert quiet["level"] == "DEBUG"


@pytest.mark.usefixtures("root_state")
def test_text_lines_stay_one_line_each() -> None:
    lines = _emit("text", route="/api/v1/studies/{name}", status=200, note="two words")
    assert lines[0].split(" ", 3)[1:3] == ["INFO", "caviar.test"]
    assert "\x1b" not in lines[0] and "\\n" in lines[0]  # the newline is escaped, not a new line
    assert lines[0].endswith('route=/api/v1/studies/{name} status=200 note="two words" slot=3 device=cpu')
    assert " ERROR caviar.test it broke" in lines[1]
    assert lines[2] == "Traceback (most recent call last):"  # a traceback follows its line


@pytest.mark.usefixtures("root_state")
def test_configuring_again_replaces_only_its_own_handler() -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("text", "info", stream=first)
    configure_logging("json", "warning", stream=second)
    logging.getLogger("caviar.test").info("dropped")
    logging.getLogger("caviar.test").warning("kept")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["kept"]
    assert other in logging.getLogger().handlers
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "loud")


def test_announce_prints_the_banner_as_is_or_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    announce("text", "caviar.server", "caviar serving on http://127.0.0.1:1 with 2 process(es)", processes=2)
    announce("json", "caviar.server", "caviar serving on http://127.0.0.1:1 with 2 process(es)", processes=2)
    text, as_json = capsys.readouterr().out.splitlines()
    assert text == "caviar serving on http://127.0.0.1:1 with 2 process(es)"
    entry = json.loads(as_json)
    assert entry["message"] == text and entry["processes"] == 2 and entry["level"] == "INFO"
