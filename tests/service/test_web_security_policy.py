"""The plain policy functions behind the web security middleware, and the CSV cell escaping."""

from __future__ import annotations

import csv
import io

import pytest
from starlette.datastructures import Headers

from caviar.service.config import Settings
from caviar.service.trials.export import csv_safe, escape_csv, trials_csv
from caviar.service.web_security import (
    API_CSP,
    DOCS_CSP,
    FILE_CSP,
    browser_credentials,
    content_security_policy,
    file_headers,
    origin_of,
    security_headers,
    write_refusal,
)

SELF = "http://127.0.0.1:8000"


def refusal(method: str = "POST", **headers: str | None) -> tuple[int, str] | None:
    found = write_refusal(
        method,
        content_type=headers.get("content_type"),
        origin=headers.get("origin"),
        referer=headers.get("referer"),
        own_origin=SELF,
        trusted_origins=["https://ui.example"],
        browser_credentials=headers.get("credentials") == "browser",
    )
    return (found.status, found.code) if found is not None else None


FORBIDDEN = (403, "cross_site_request")
UNSUPPORTED = (415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        # safe methods are never checked
        ("GET", {"origin": "http://evil.example", "credentials": "browser"}, None),
        ("HEAD", {"content_type": "text/plain"}, None),
        ("OPTIONS", {"origin": "http://evil.example"}, None),
        # bodies a page on any site may send without asking (no CORS preflight)
        ("POST", {"content_type": "application/x-www-form-urlencoded"}, UNSUPPORTED),
        ("PUT", {"content_type": "multipart/form-data; boundary=x"}, UNSUPPORTED),
        ("PATCH", {"content_type": "text/plain;charset=UTF-8"}, UNSUPPORTED),
        ("DELETE", {"content_type": "text/html"}, UNSUPPORTED),
        ("POST", {"content_type": "application/x-www-form-urlencoded", "origin": SELF}, UNSUPPORTED),
        # JSON and bytes are fine; so is no body type at all (an empty POST)
        ("POST", {"content_type": "application/json"}, None),
        ("POST", {"content_type": "Application/JSON; charset=utf-8"}, None),
        ("PATCH", {"content_type": "application/merge-patch+json"}, None),
        ("POST", {"content_type": "application/octet-stream"}, None),
        ("POST", {}, None),
        # an Origin must be the service's own or a trusted one, whoever sends it
        ("POST", {"origin": "http://evil.example"}, FORBIDDEN),
        ("POST", {"origin": "http://evil.example", "credentials": "browser"}, FORBIDDEN),
        ("DELETE", {"origin": "null", "credentials": "browser"}, FORBIDDEN),
        ("POST", {"origin": "http://127.0.0.1:8001", "credentials": "browser"}, FORBIDDEN),
        ("POST", {"origin": "https://127.0.0.1:8000", "credentials": "browser"}, FORBIDDEN),
        ("POST", {"origin": "http://127.0.0.1.evil.example:8000"}, FORBIDDEN),
        ("POST", {"origin": SELF, "credentials": "browser"}, None),
        ("POST", {"origin": "HTTP://127.0.0.1:8000", "credentials": "browser"}, None),
        ("POST", {"origin": "https://ui.example", "credentials": "browser"}, None),
        ("POST", {"origin": "https://ui.example:443"}, None),
        # browser credentials without an Origin: the Referer must vouch for the page
        ("POST", {"credentials": "browser"}, FORBIDDEN),
        ("POST", {"credentials": "browser", "referer": "http://evil.example/page"}, FORBIDDEN),
        ("POST", {"credentials": "browser", "referer": "not a url"}, FORBIDDEN),
        ("POST", {"credentials": "browser", "referer": f"{SELF}/dashboard/studies/1"}, None),
        # a non-browser client (Bearer, or no token at all) without Origin: unaffected
        ("POST", {"referer": "http://evil.example/page"}, None),
        ("DELETE", {"content_type": "application/json"}, None),
    ],
)
def test_write_refusal(method: str, headers: dict[str, str], expected: tuple[int, str] | None) -> None:
    assert refusal(method, **headers) == expected


def test_only_basic_and_cookies_are_browser_credentials() -> None:
    assert browser_credentials("Basic bWU6dG9rZW4=", None)
    assert browser_credentials("  basic bWU6dG9rZW4=", None)
    assert browser_credentials(None, "session=1")
    assert browser_credentials("Bearer x", "other-app=1")  # a cookie rides along: treated as a browser
    assert not browser_credentials("Bearer cvr_x", None)
    assert not browser_credentials(None, None)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://Host.example", ("http", "host.example", 80)),
        ("https://host.example/path?q", ("https", "host.example", 443)),
        ("http://[::1]:8000", ("http", "::1", 8000)),
        ("null", None),
        ("ftp://host.example", None),
        ("http://host.example:99999", None),
        ("", None),
    ],
)
def test_origin_of(url: str, origin: tuple[str, str, int] | None) -> None:
    assert origin_of(url) == origin


def test_content_security_policies() -> None:
    assert content_security_policy("/api/v1/studies", None) == API_CSP
    assert content_security_policy("/docs", None) == DOCS_CSP
    dashboard = "default-src 'self';script-src 'self' 'unsafe-eval'"
    kept = content_security_policy("/dashboard", dashboard)
    assert kept.startswith(dashboard) and "frame-ancestors 'none'" in kept
    assert content_security_policy("/x", FILE_CSP) == FILE_CSP
    headers = security_headers("/api/v1/studies", Headers({}))
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"  # "no-referrer" would make a browser send Origin: null


def test_file_headers_make_a_download_with_a_safe_name() -> None:
    headers = file_headers('a"b\r\nc.html')
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Disposition"] == 'attachment; filename="a_b__c.html"'
    assert "sandbox" in headers["Content-Security-Policy"]
    assert file_headers()["Content-Disposition"] == "attachment"


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=x", "'\t=x"),
        ("\r=x", "'\r=x"),
        ("-0.5", "-0.5"),
        ("+1e3", "+1e3"),
        ("adam", "adam"),
        ("", ""),
        (-0.5, -0.5),
        (3, 3),
        (None, None),
    ],
)
def test_csv_safe(value: object, escaped: object) -> None:
    assert csv_safe(value) == escaped


def test_escape_csv_and_trials_csv() -> None:
    text = 'Number,Param x\r\n0,"=HYPERLINK(""http://e"")"\r\n1,-1.5\r\n'
    rows = list(csv.reader(io.StringIO(escape_csv(text), newline="")))
    assert rows == [["Number", "Param x"], ["0", '\'=HYPERLINK("http://e")'], ["1", "-1.5"]]
    trial = {
        "number": 0,
        "state": "complete",
        "value": -1.0,
        "values": [-1.0],
        "params": {"opt": "=cmd", "lr": -0.5, "obj": {"a": 1}},
        "worker_id": "@w",
        "started_at": None,
        "finished_at": None,
        "retry_of": None,
    }
    (row,) = csv.DictReader(io.StringIO(trials_csv([trial]), newline=""))
    assert row["params.opt"] == "'=cmd" and row["params.lr"] == "-0.5" and row["worker_id"] == "'@w"
    assert row["value"] == "-1.0"


def test_cors_origins_are_exact_origins() -> None:
    assert Settings(cors_origins="https://a.example, http://b:8080/").cors_origins == [  # type: ignore[arg-type]
        "https://a.example",
        "http://b:8080",
    ]
    assert Settings(cors_origins='["https://a.example"]').cors_origins == ["https://a.example"]  # type: ignore[arg-type]
    assert Settings().cors_origins == []
    for bad in ("*", "https://a.example/path", "a.example"):
        with pytest.raises(ValueError, match="CAVIAR_CORS_ORIGINS"):
            Settings(cors_origins=[bad])
