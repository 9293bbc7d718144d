"""The egress proxy of sandboxed dependency builds, against real loopback servers; and the sandboxed pip's
config, made from the node's: which hosts it lets through, what it binds, what it leaves out."""

import asyncio
import contextlib

import pytest

from nimbus.compiler.egress import EgressProxy, allowed_targets, split_target
from nimbus.compiler.sdists import parse_pip_config, sandbox_pip_config


class Upstream:
    """A TCP server on 127.0.0.1 recording what each connection sent first, and echoing it back."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "Upstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        data = await reader.read(4096)
        self.seen.append(data)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def proxy_for(tmp_path, allowed, **kwargs):
    async with EgressProxy(tmp_path / "egress.sock", allowed, **kwargs) as proxy:
        yield proxy


async def ask(proxy: EgressProxy, head: bytes, then: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(head + then)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_connect_to_an_allowed_target_is_a_tunnel(tmp_path):
    async with Upstream() as up, proxy_for(tmp_path, {("127.0.0.1", up.port)}) as proxy:
        reader, writer = await asyncio.open_unix_connection(str(proxy.path))
        writer.write(f"CONNECT 127.0.0.1:{up.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
        writer.write(b"tls bytes")
        assert await asyncio.wait_for(reader.read(), 10) == b"echo:tls bytes"
        writer.close()
        assert up.seen == [b"tls bytes"] and proxy.refused == [] and proxy.connections == 1


async def test_connect_anywhere_else_is_refused_recorded_and_never_made(tmp_path):
    async with Upstream() as allowed, Upstream() as other, proxy_for(tmp_path, {("127.0.0.1", allowed.port)}) as proxy:
        answer = await ask(proxy, f"CONNECT 127.0.0.1:{other.port} HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403 ") and f"127.0.0.1:{other.port} is not".encode() in answer
        answer = await ask(proxy, b"CONNECT Example.COM.:443 HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403 ")
        assert await ask(proxy, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n") != b""
        assert proxy.refused == [f"127.0.0.1:{other.port}", "example.com:443"]  # each once, as compared
        assert other.seen == [] and proxy.connections == 0


async def test_an_absolute_form_http_request_is_forwarded_in_origin_form_and_closed(tmp_path):
    async with Upstream() as up, proxy_for(tmp_path, {("127.0.0.1", up.port)}) as proxy:
        head = (f"GET http://127.0.0.1:{up.port}/simple/six/?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n"
                "Proxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive\r\n\r\n").encode()
        answer = await ask(proxy, head)
        [sent] = up.seen
        assert sent.startswith(b"GET /simple/six/?x=1 HTTP/1.1\r\n")
        assert b"Proxy-Authorization" not in sent and b"keep-alive" not in sent
        assert sent.endswith(b"Connection: close\r\n\r\n") and answer == b"echo:" + sent


async def test_an_absolute_form_request_elsewhere_is_refused(tmp_path):
    async with Upstream() as up, proxy_for(tmp_path, {("127.0.0.1", up.port)}) as proxy:
        answer = await ask(proxy, b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403 ") and proxy.refused == ["127.0.0.1:9"]
        answer = await ask(proxy, f"GET http://localhost:{up.port}/ HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403 ")  # by name: localhost is not 127.0.0.1
        assert up.seen == []


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    (b"GET https://127.0.0.1/ HTTP/1.1\r\n\r\n", b"405"),
    (b"\xff\xfe garbage\r\n\r\n", b"400"),
    (b"CONNECT 127.0.0.1:99999 HTTP/1.1\r\n\r\n", b"400"),
    (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", b"400"),
    (b"CONNECT x:1 HTTP/1.1\r\n" + b"X-Pad: " + b"a" * (20 << 10) + b"\r\n\r\n", b"431"),
])
async def test_what_is_not_a_proxy_request_is_answered_and_closed(tmp_path, head, status):
    async with proxy_for(tmp_path, {("127.0.0.1", 1)}) as proxy:
        answer = await ask(proxy, head)
        assert answer.split(b" ")[1] == status, answer
        assert proxy.refused == [] and proxy.connections == 0


async def test_connections_past_the_limit_get_503(tmp_path):
    async with Upstream() as up, proxy_for(tmp_path, {("127.0.0.1", up.port)}, max_connections=1) as proxy:
        reader, writer = await asyncio.open_unix_connection(str(proxy.path))
        writer.write(f"CONNECT 127.0.0.1:{up.port} HTTP/1.1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")  # one tunnel open
        try:  # answered at once, unread: the close may reset the connection before the answer is read
            answer = await ask(proxy, f"CONNECT 127.0.0.1:{up.port} HTTP/1.1\r\n\r\n".encode())
        except ConnectionResetError:
            answer = b"HTTP/1.1 503 (reset)"
        assert answer.startswith(b"HTTP/1.1 503 ")
        writer.close()
        assert len(up.seen) <= 1 and proxy.connections == 1


async def test_the_socket_is_gone_when_the_proxy_closes(tmp_path):
    async with proxy_for(tmp_path, set()) as proxy:
        assert proxy.path.is_socket() and proxy.path.stat().st_mode & 0o777 == 0o666
    assert not proxy.path.exists()


def test_allowed_targets_are_the_index_hosts_and_pypis_file_host():
    assert allowed_targets(["https://user:token@PyPI.org/simple", "http://10.0.0.5:3141/root/pypi/+simple/",
                            "file:///opt/pypi/simple", "https://mirror.example:8443/simple", "ftp://x/"]) == {
        ("pypi.org", 443), ("files.pythonhosted.org", 443), ("10.0.0.5", 3141), ("mirror.example", 8443)}


@pytest.mark.parametrize(("target", "pair"), [
    ("pypi.org:443", ("pypi.org", 443)), ("PyPI.org", ("pypi.org", 443)), ("[::1]:8080", ("::1", 8080)),
    ("[::1]", ("::1", 443)), ("::1", None), ("x:0", None), ("x:abc", None), (":443", None), ("[::1]x", None),
])
def test_split_target(target, pair):
    assert split_target(target, 443) == pair


def test_the_sandboxed_pip_gets_the_nodes_settings_without_credentials(tmp_path):
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2\n")
    listed = (f"global.index-url='https://bot:s3cret@pypi.internal:8443/simple'\n"
              f"global.extra-index-url='file://{index} file:///nonexistent/simple'\n"
              f"install.find_links='{wheels} /tmp/elsewhere'\n"
              f"global.constraint='{constraints}'\n"
              "global.trusted-host='pypi.internal other.example'\n"
              "global.proxy='http://corp-proxy:3128'\n"
              ":env:.find-links='/from/the/environment'\n"
              "global.default-timeout='60'\n"
              "not a setting\n")
    settings = parse_pip_config(listed)
    assert "proxy" not in settings and settings["find-links"] == f"{wheels} /tmp/elsewhere"
    conf, binds, allowed, notes = sandbox_pip_config(settings)
    assert "s3cret" not in conf and "bot" not in conf
    assert "index-url = https://pypi.internal:8443/simple\n" in conf
    assert "trusted-host = pypi.internal\n" in conf and "timeout = 60\n" in conf
    assert allowed == {("pypi.internal", 8443)}
    bound = dict(binds)  # host path: sandbox path, each read-only at a neutral path
    mirror, wheel_dir, constraint = bound[str(index.parent)], bound[str(wheels)], bound[str(constraints)]
    assert all(path.startswith("/opt/nimbus/pip/") for path in (mirror, wheel_dir, constraint))
    assert f"extra-index-url = file://{mirror}/simple\n" in conf  # a .../simple index with the files beside it
    assert f"find-links = {wheel_dir}\n" in conf and f"constraint = {constraint}\n" in conf
    assert "/tmp/elsewhere" not in conf and str(tmp_path) not in conf
    assert any("credentials" in note for note in notes)
    assert any("/nonexistent/simple" in note for note in notes) and any("/tmp/elsewhere" in note for note in notes)


def test_no_index_and_the_default_index():
    conf, _, allowed, _ = sandbox_pip_config({"no-index": "true"})
    assert "no-index = true" in conf and allowed == frozenset()
    conf, _, allowed, _ = sandbox_pip_config({})
    assert "index-url = https://pypi.org/simple" in conf
    assert allowed == {("pypi.org", 443), ("files.pythonhosted.org", 443)}
