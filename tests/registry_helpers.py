"""Real servers for the registry tests: Debian's docker-registry (plain, htpasswd, TLS, token auth),
a bearer token server, a fault-injecting proxy, a static file server, and random test images.

Every process is started and stopped by pid, every port is a free loopback port, every temporary
directory is removed.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import random
import re
import shutil
import socket
import socketserver
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard

from rootless.registry.api import Descriptor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen | None = None, logfile: str = "") -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            log = open(logfile).read() if logfile and os.path.exists(logfile) else ""
            raise RuntimeError(f"server on port {port} did not start: {log}")
        time.sleep(0.05)


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class CA:
    """A test CA and a server certificate for 127.0.0.1/localhost signed by it."""

    dir: str

    @property
    def ca_cert(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    @property
    def server_cert(self) -> str:
        return os.path.join(self.dir, "server.crt")

    @property
    def server_key(self) -> str:
        return os.path.join(self.dir, "server.key")


def make_ca(directory: str) -> CA:
    os.makedirs(directory, exist_ok=True)
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=rbuild test CA",
        cwd=directory,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=directory,
    )
    with open(os.path.join(directory, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        cwd=directory,
    )
    return CA(directory)


def bcrypt_htpasswd(users: dict[str, str]) -> str:
    """htpasswd lines with cheap bcrypt hashes (cost 4: the registry checks one per request)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return "".join(f"{u}:{crypt.crypt(p, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n" for u, p in users.items())


@dataclass
class RegistryServer:
    host: str  # 127.0.0.1:PORT
    dir: str
    proc: subprocess.Popen

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    def log(self) -> str:
        with open(os.path.join(self.dir, "log"), errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def docker_registry(
    *,
    htpasswd: dict[str, str] | None = None,
    tls: CA | None = None,
    token: TokenServer | None = None,
    url_allow: str | None = None,
) -> Iterator[RegistryServer]:
    """Debian's docker-registry on a free loopback port, configured as asked; stopped by pid."""
    exe = shutil.which("docker-registry")
    assert exe, "docker-registry is not installed"
    d = tempfile.mkdtemp(prefix="rbtest-registry-")
    port = free_port()
    cfg = [
        f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {d}/data\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n"
    ]
    if tls:
        cfg.append(f"  tls:\n    certificate: {tls.server_cert}\n    key: {tls.server_key}\n")
    if htpasswd:
        with open(os.path.join(d, "htpasswd"), "w") as f:
            f.write(bcrypt_htpasswd(htpasswd))
        cfg.append(f"auth:\n  htpasswd:\n    realm: test\n    path: {d}/htpasswd\n")
    if token:
        cfg.append(
            f"auth:\n  token:\n    realm: {token.url}/token\n    service: {token.service}\n"
            f"    issuer: {token.issuer}\n    rootcertbundle: {token.cert}\n"
        )
    if url_allow:
        cfg.append(f"validation:\n  manifests:\n    urls:\n      allow:\n        - '{url_allow}'\n")
    with open(os.path.join(d, "config.yml"), "w") as f:
        f.write("".join(cfg))
    logpath = os.path.join(d, "log")
    with open(logpath, "wb") as log:
        proc = subprocess.Popen([exe, "serve", os.path.join(d, "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, logpath)
        yield RegistryServer(f"127.0.0.1:{port}", d, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


# -- threaded HTTP servers ------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The docker token flow: GET /token?service=&scope=... with optional basic auth returns a JWT
    (RS256, x5c header) granting what `acl` allows; the registry verifies it with `cert`.

    acl(user or None, repository) -> allowed actions. Records every token request it answers.
    """

    service = "rbuild-test-registry"
    issuer = "rbuild-test-issuer"

    def __init__(self, directory: str, users: dict[str, str], acl: Callable[[str | None, str], set[str]]) -> None:
        self.dir = directory
        self.users = users
        self.acl = acl
        self.requests: list[dict[str, Any]] = []
        self.cert = os.path.join(directory, "token.crt")
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "token.key",
            "-out",
            "token.crt",
            "-days",
            "2",
            "-subj",
            "/CN=rbuild token issuer",
            cwd=directory,
        )
        text = subprocess.run(
            ["openssl", "rsa", "-in", "token.key", "-noout", "-text"],
            cwd=directory,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        self._n = self._field(text, "modulus")
        self._d = self._field(text, "privateExponent")
        der = subprocess.run(
            ["openssl", "x509", "-in", "token.crt", "-outform", "DER"], cwd=directory, check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self.url = ""

    @staticmethod
    def _field(text: str, name: str) -> int:
        m = re.search(rf"^{name}:\s*\n((?:\s+[0-9a-f:]+\n)+)", text, re.M)
        assert m, name
        return int(re.sub(r"[\s:]", "", m.group(1)), 16)

    def _sign(self, data: bytes) -> bytes:
        # RSASSA-PKCS1-v1_5 with SHA-256, by hand: the tests need no crypto library.
        k = (self._n.bit_length() + 7) // 8
        digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(data).digest()
        em = b"\x00\x01" + b"\xff" * (k - len(digest_info) - 3) + b"\x00" + digest_info
        return pow(int.from_bytes(em, "big"), self._d, self._n).to_bytes(k, "big")

    def token(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository":
                continue
            granted = sorted(set(actions.split(",")) & self.acl(user, name))
            access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        return f"{signing_input}.{_b64url(self._sign(signing_input.encode()))}"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if outer.users.get(name) != password:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        outer.requests.append({"user": name, "scopes": query.get("scope", []), "status": 401})
                        return
                    user = name
                scopes = query.get("scope", [])
                outer.requests.append({"user": user, "scopes": scopes, "status": 200})
                body = json.dumps({"token": outer.token(user, scopes), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@contextlib.contextmanager
def token_server(
    directory: str, users: dict[str, str], acl: Callable[[str | None, str], set[str]]
) -> Iterator[TokenServer]:
    ts = TokenServer(directory, users, acl)
    with serve(ts.handler()) as server:
        ts.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield ts


# -- fault-injecting proxy ------------------------------------------------------------------


@dataclass
class Fault:
    """Misbehave on requests matching `method` and `path` (regex), `times` times (None: always).

    kind: "drop" (close after half the body), "status" (answer `status`, e.g. 500 or 429 with
    Retry-After), "truncate" (a shorter body with a matching Content-Length), "flip" (one byte
    of the body changed), "ignore-range" (answer 200 with the whole body to a Range request),
    "reset" (forward the request, then close the connection without answering).
    """

    kind: str
    path: str
    method: str = "GET"
    times: int | None = 1
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0


class FaultProxy:
    """A reverse proxy in front of a registry that injects `faults` and logs every request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status sent)
        self.lock = threading.Lock()
        self.host = ""

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if (
                    fault.method == method
                    and re.search(fault.path, path)
                    and (fault.times is None or fault.hits < fault.times)
                ):
                    fault.hits += 1
                    return fault
        return None

    def requests(self, method: str | None = None, pattern: str = "") -> list[tuple[str, str, int]]:
        with self.lock:
            return [r for r in self.log if (method is None or r[0] == method) and re.search(pattern, r[1])]

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _record(self, status: int) -> None:
                with outer.lock:
                    outer.log.append((self.command, self.path, status))

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = outer._fault_for(self.command, self.path)
                if fault is not None and fault.kind == "status":
                    self._record(fault.status)
                    self.send_response(fault.status)
                    for k, v in fault.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "range")}
                if self.headers.get("Range") and not (fault is not None and fault.kind == "ignore-range"):
                    headers["Range"] = self.headers["Range"]
                conn = http.client.HTTPConnection(outer.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                    out_headers = [
                        (k, v)
                        for k, v in resp.getheaders()
                        if k.lower() not in ("content-length", "connection", "transfer-encoding")
                    ]
                finally:
                    conn.close()
                self._record(status)
                if fault is not None and fault.kind == "reset":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault is not None and data:
                    if fault.kind == "truncate":
                        data = data[: len(data) // 2]
                    elif fault.kind == "flip":
                        i = len(data) // 2
                        data = data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :]
                self.send_response(status)
                for k, v in out_headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault is not None and fault.kind == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

        return Handler


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    with serve(proxy.handler()) as server:
        proxy.host = f"127.0.0.1:{server.server_address[1]}"
        yield proxy


@contextlib.contextmanager
def file_server(files: dict[str, bytes]) -> Iterator[str]:
    """A static HTTP server for `files` (path -> bytes); yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

    with serve(Handler) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


# -- test images ----------------------------------------------------------------------------


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(raw: bytes, kind: str) -> tuple[bytes, str]:
    base = "application/vnd.oci.image.layer.v1.tar"
    if kind == "gzip":
        return gzip.compress(raw, compresslevel=1, mtime=0), base + "+gzip"
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(raw), base + "+zstd"
    return raw, base


@dataclass
class SampleImage:
    """An image held in memory: blobs by digest, its manifest, config and layer descriptors."""

    manifest: bytes
    media_type: str
    config: Descriptor
    config_bytes: bytes
    layers: list[Descriptor]
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def openers(self) -> list[tuple[Descriptor, Callable[[], BinaryIO]]]:
        return [(d, lambda d=d: io.BytesIO(self.blobs[d.digest])) for d in self.layers]  # type: ignore[misc]

    def write_layout(self, path: str, tag: str = "latest") -> None:
        """As an OCI image layout (for skopeo)."""
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        for digest, data in {**self.blobs, self.digest: self.manifest}.items():
            with open(os.path.join(path, "blobs", "sha256", digest.split(":")[1]), "wb") as f:
                f.write(data)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": self.media_type,
                    "digest": self.digest,
                    "size": len(self.manifest),
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }
            ],
        }
        with open(os.path.join(path, "index.json"), "w") as f:
            json.dump(index, f)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')


def make_image(
    layer_sizes: list[int],
    *,
    kinds: list[str] | None = None,
    arch: str = "amd64",
    variant: str = "",
    fmt: str = "oci",
    seed: int | None = None,
) -> SampleImage:
    """A random image: one layer per size (random, incompressible bytes), compressed as `kinds`."""
    rng = random.Random(seed)
    kinds = kinds or ["gzip"] * len(layer_sizes)
    blobs: dict[str, bytes] = {}
    layers, diff_ids = [], []
    for i, (size, kind) in enumerate(zip(layer_sizes, kinds, strict=True)):
        raw = layer_tar({f"file{i}": rng.randbytes(size)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        blob, media_type = compress(raw, kind)
        if fmt == "docker":
            media_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        blobs[digest] = blob
        layers.append(Descriptor(media_type, digest, len(blob)))
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Cmd": ["sh"]},
        "created": "2024-01-01T00:00:00Z",
    }
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config).encode()
    config_type = (
        "application/vnd.docker.container.image.v1+json"
        if fmt == "docker"
        else "application/vnd.oci.image.config.v1+json"
    )
    config_desc = Descriptor(config_type, "sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes))
    blobs[config_desc.digest] = config_bytes
    media_type = (
        "application/vnd.docker.distribution.manifest.v2+json"
        if fmt == "docker"
        else "application/vnd.oci.image.manifest.v1+json"
    )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config_desc.to_json(),
            "layers": [d.to_json() for d in layers],
        }
    ).encode()
    return SampleImage(manifest, media_type, config_desc, config_bytes, layers, blobs)


def blob_files(dest: str) -> dict[str, bytes]:
    """Every file under `dest` (relative path -> bytes): what a fetch left behind."""
    out = {}
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, dest)] = f.read()
    return out


def isolate(monkeypatch: Any, base: str) -> str:
    """Point every configuration lookup (HOME, XDG dirs, auth, registries.conf, certs.d, blob cache)
    into `base`, so a test sees only what it writes there; returns the fake HOME."""
    from rootless.registry import conf as regconf

    home = os.path.join(base, "home")
    os.makedirs(home, exist_ok=True)
    monkeypatch.setenv("HOME", home)
    monkeypatch.setenv("XDG_CACHE_HOME", os.path.join(base, "cache"))
    for var in (
        "XDG_CONFIG_HOME",
        "XDG_RUNTIME_DIR",
        "REGISTRY_AUTH_FILE",
        "DOCKER_CONFIG",
        "CONTAINERS_REGISTRIES_CONF",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(regconf, "SYSTEM_CONF", os.path.join(base, "etc", "registries.conf"))
    monkeypatch.setattr(regconf, "SYSTEM_CONF_DIR", os.path.join(base, "etc", "registries.conf.d"))
    monkeypatch.setattr(regconf, "SYSTEM_CERT_DIRS", (os.path.join(base, "etc", "certs.d"),))
    return home


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def credential_helper(directory: str) -> str:
    """Write `docker-credential-rbtest` (keeping its secrets in a JSON file beside it) into
    `directory`/bin; returns that bin directory, for PATH."""
    bindir = os.path.join(directory, "bin")
    store = os.path.join(directory, "helper-store.json")
    script = f"""#!/usr/bin/python3
import json, sys
path = {store!r}
try:
    data = json.load(open(path))
except FileNotFoundError:
    data = {{}}
action = sys.argv[1]
if action == "get":
    host = sys.stdin.read().strip()
    if host not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    print(json.dumps({{"ServerURL": host, "Username": data[host][0], "Secret": data[host][1]}}))
elif action == "store":
    req = json.load(sys.stdin)
    data[req["ServerURL"]] = [req["Username"], req["Secret"]]
    json.dump(data, open(path, "w"))
elif action == "erase":
    host = sys.stdin.read().strip()
    if host not in data:
        print("credentials not found in native keychain"); sys.exit(1)
    del data[host]
    json.dump(data, open(path, "w"))
"""
    path = write(os.path.join(bindir, "docker-credential-rbtest"), script)
    os.chmod(path, 0o755)
    return bindir
