"""Credentials go only to the registry itself: not to an upload Location on another host, not to a token
realm that a redirected-to host names (found in review; each was reproduced before the fix)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from rootless.errors import RbuildError
from rootless.registry import auth
from rootless.registry.conf import RegistriesConf
from rootless.registry.http import RegistryHTTP


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str | None]] = []
    reply: dict[str, tuple[int, dict[str, str]]] = {}

    def _any(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        code, headers = self.reply.get(self.path.split("?")[0], (200, {}))
        if self.path == "/v2/" and not self.headers.get("Authorization"):
            code, headers = 401, {"WWW-Authenticate": 'Basic realm="registry"'}  # the registry wants Basic
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_POST = do_HEAD = _any

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, type[_Recorder], type[_Recorder]]]:
    servers = []
    handlers = []
    for addr in ("127.0.0.1", "127.0.0.2"):
        handler = type(f"H{addr}", (_Recorder,), {"seen": [], "reply": {}})
        server = http.server.ThreadingHTTPServer((addr, 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        handlers.append(handler)
    registry = f"127.0.0.1:{servers[0].server_address[1]}"
    other = f"127.0.0.2:{servers[1].server_address[1]}"
    handlers[0].reply["/other"] = (307, {"Location": f"http://{other}/blob"})
    handlers[1].reply["/blob"] = (401, {"WWW-Authenticate": f'Bearer realm="http://{other}/token",service="x"'})
    handlers[0].other = other  # type: ignore[attr-defined]
    try:
        yield registry, handlers[0], handlers[1]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def _client() -> RegistryHTTP:
    return RegistryHTTP(
        RegistriesConf(), tls_verify=False, cert_dir=None, authfile=None, creds=auth.Credentials("alice", "s3cret")
    )


def test_upload_location_on_another_host_gets_no_credentials(two_hosts: tuple) -> None:
    registry, own, other = two_hosts
    http_ = _client()
    http_.request("GET", registry, "/v2/", what="probe")
    assert own.seen[-1][2] == auth.Credentials("alice", "s3cret").basic()  # Basic is in use for the registry
    http_.request("PUT", registry, f"http://{own.other}/upload/xyz", what="upload")
    assert [h for h in other.seen if h[2] is not None] == []
    assert other.seen and other.seen[0][:2] == ("PUT", "/upload/xyz")


def test_token_realm_named_by_a_redirect_target_gets_nothing(two_hosts: tuple) -> None:
    registry, own, other = two_hosts
    http_ = _client()
    with pytest.raises(RbuildError):
        resp = http_.request("GET", registry, "/other", what="blob", scopes=["repository:x/y:pull"], repository="x/y")
        if resp.status_code == 401:
            raise RbuildError("refused")
    assert all(path.split("?")[0] != "/token" for _, path, _ in other.seen)
    assert [h for h in other.seen if h[2] is not None] == []
