"""The console's session cookie: Secure exactly when the console is reached over TLS."""

from starlette.requests import Request
from starlette.responses import Response

from nimbus.console import web


def _request(scheme: str) -> Request:
    return Request({"type": "http", "method": "GET", "scheme": scheme, "path": "/console/", "query_string": b"",
                    "headers": [(b"host", b"nimbus.example")], "server": ("nimbus.example", 443)})


def _cookie(scheme: str, max_age: float | None) -> str:
    response = Response()
    web.set_cookie(_request(scheme), response, "t" * 43, max_age=max_age)
    (header,) = response.headers.getlist("set-cookie")
    return header


def test_over_tls_the_cookie_is_secure_httponly_strict_and_scoped():
    header = _cookie("https", 3600)
    parts = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"secure", "httponly", "samesite", "path", "max-age"} <= parts
    assert "SameSite=strict" in header and "Path=/console" in header and "Max-Age=3600" in header


def test_over_plain_http_the_cookie_is_not_marked_secure_and_an_anonymous_one_has_no_max_age():
    header = _cookie("http", None)
    assert "secure" not in header.lower() and "max-age" not in header.lower()
    assert "HttpOnly" in header and "SameSite=strict" in header


def test_the_csrf_token_is_bound_to_the_cookie_token():
    one, two = "a" * 43, "b" * 43
    assert web.csrf_for(one) == web.csrf_for(one) != web.csrf_for(two)
    assert one not in web.csrf_for(one) and len(web.csrf_for(one)) == 64
