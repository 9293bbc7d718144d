"""The one place the CLI talks HTTP: a client of a node's REST API that turns every failure into a ``CliError``.

httpx is imported when a client is made, not with this module, so ``nimbus --help`` stays fast.
"""

import json
import os
from typing import Annotated, Any, NoReturn

import typer

from nimbus import __version__

DEFAULT_URL = "http://127.0.0.1:8080"
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="NIMBUS_URL", help="The node's base URL.", show_envvar=True),
]


class CliError(Exception):
    """A failure to report as one ``error: ...`` line; ``main`` turns it into the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise CliError(message, code)


class Api:
    """A thin client of one node's REST API that turns every failure into a ``CliError``."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        import httpx

        self.url = (url or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            fail(f"the node URL must start with http:// or https:// (got {self.url!r} from --url or NIMBUS_URL)", 2)
        self.timeout = timeout
        self.api_key = os.environ.get("NIMBUS_API_KEY") or None
        headers = {"User-Agent": f"nimbus-cli/{__version__}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)
        )

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs):
        """Send one request; a response of any status comes back, transport failures become ``CliError``."""
        import httpx

        try:
            return self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            fail(f"no Nimbus node at {self.url} (start one with 'make run' or 'nimbus up')")
        except httpx.TimeoutException:
            fail(f"the node at {self.url} did not answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            fail(f"request to {self.url} failed: {exc}")

    def call(self, method: str, path: str, **kwargs) -> Any:
        """Send one request and return its JSON body, or fail with the node's problem report."""
        response = self.request(method, path, **kwargs)
        if response.is_error:
            self.raise_problem(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            fail(f"the node at {self.url} answered {method} {path} with a body that is not JSON")

    def raise_problem(self, response) -> NoReturn:
        """Fail with ``<title>: <detail>`` from an ``application/problem+json`` body (or what there is)."""
        title, detail = None, None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            title = body.get("title")
            detail = body.get("detail")
            if not isinstance(detail, str) and detail is not None:
                detail = json.dumps(detail, ensure_ascii=False)
        title = title or f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        if detail is None and body is None:
            detail = response.text.strip()[:200] or None
        message = f"{title}: {detail}" if detail else title
        if response.status_code == 401 and not self.api_key:
            message += " (the node has auth on: set NIMBUS_API_KEY)"
        elif response.status_code == 429 and response.headers.get("Retry-After"):
            message += f" (retry after {response.headers['Retry-After']} s)"
        fail(message)
