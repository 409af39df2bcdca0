"""Pull unpacks each layer while its blob downloads (issue 15), and still keeps nothing it has not verified:
a layer unpacked from a blob that fails its digest, or whose download breaks off, is thrown away.

The registry is Debian's docker-registry on loopback; between it and rbuild sits, where a test needs one,
a small reverse proxy in its own process (a real server that can pause in the middle of a blob, or die
there)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner
from registry_helpers import RegistryServer, SampleImage, docker_registry, isolate

from rootless.blob.growing import Cancelled, Growing, Restarted
from rootless.errors import RbuildError
from rootless.oci.image import OCI_CONFIG, OCI_MANIFEST
from rootless.oci.reference import parse_reference
from rootless.registry.api import Descriptor, Registry, RegistryOptions

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

PROXY = r"""
import http.client, http.server, os, re, signal, socketserver, sys, time

upstream, pattern, mode, flag, portfile = sys.argv[1:6]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn = http.client.HTTPConnection(upstream, timeout=60)
        conn.request(self.command, self.path, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if re.search(pattern, self.path) and resp.status == 200 and not os.path.exists(flag + ".done"):
            cut = len(data) * 3 // 4
            self.wfile.write(data[:cut])
            self.wfile.flush()
            if mode == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            open(flag + ".paused", "w").close()
            while not os.path.exists(flag):
                time.sleep(0.02)
            open(flag + ".done", "w").close()
            self.wfile.write(data[cut:])
            return
        self.wfile.write(data)

    do_HEAD = do_GET


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


server = Server(("127.0.0.1", 0), Handler)
with open(portfile + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(portfile + ".tmp", portfile)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def server() -> Iterator[RegistryServer]:
    with docker_registry() as srv:
        yield srv


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    return isolate(monkeypatch, str(tmp_path))


def many_files_layer(count: int, size: int, seed: int) -> bytes:
    """A layer tar of `count` files of `size` random bytes (so the first are unpacked long before the last)."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"data/f{i:03}")
            info.size, info.mode, info.mtime = size, 0o644, 1700000000
            tf.addfile(info, io.BytesIO(rng.randbytes(size)))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image(host: str, name: str, seed: int) -> tuple[str, SampleImage, Descriptor]:
    """An image of a big layer of many files (4 MB) and a small one, pushed (as root: set-up, not what is
    tested); returns its reference, the image and the big layer's descriptor."""
    tars = [many_files_layer(40, 100_000, seed), many_files_layer(1, 1_000, seed + 1)]
    blobs = [gzip.compress(t, compresslevel=1, mtime=0) for t in tars]
    layers = [Descriptor(GZIP_LAYER, sha256(b), len(b)) for b in blobs]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in tars]},
        "config": {"Cmd": ["sh"]},
        "created": "2024-01-01T00:00:00Z",
    }
    config_bytes = json.dumps(config).encode()
    config_desc = Descriptor(OCI_CONFIG, sha256(config_bytes), len(config_bytes))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_json()}
    manifest["layers"] = [d.to_json() for d in layers]
    all_blobs = {d.digest: b for d, b in zip(layers, blobs, strict=True)} | {config_desc.digest: config_bytes}
    img = SampleImage(json.dumps(manifest).encode(), OCI_MANIFEST, config_desc, config_bytes, layers, all_blobs)
    ref = f"{host}/{name}"
    Registry(RegistryOptions()).push(
        parse_reference(ref), img.manifest, img.media_type, img.config, img.config_bytes, img.openers()
    )
    return ref, img, layers[0]


@contextlib.contextmanager
def blob_proxy(
    server: RegistryServer, digest: str, mode: str, tmp_path: Path
) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """The proxy process in front of the registry: three quarters into blob `digest` it pauses until the flag
    file exists ("pause"), or kills itself ("die"); yields (its host, the flag file, the process)."""
    flag = tmp_path / "flag"
    portfile = tmp_path / "port"
    argv = [sys.executable, "-c", PROXY, server.host, f"/blobs/{digest}$", mode, str(flag), str(portfile)]
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 20
        while not portfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.02)
        yield f"127.0.0.1:{portfile.read_text()}", flag, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def leftovers(root: str, keep: dict[str, bytes]) -> list[str]:
    """What a failed pull left in the store: any layer, image, temporary or partial file, and any blob
    that is not one of `keep` (verified blobs of the image's other layers, digest -> bytes) byte for byte."""
    found = []
    for sub in ("chains", "tmp"):
        found += [f"{sub}/{n}" for n in os.listdir(os.path.join(root, sub))]
    for dirpath, _, files in os.walk(os.path.join(root, "blobs")):
        for name in files:
            path = os.path.join(dirpath, name)
            digest = "sha256:" + name
            with open(path, "rb") as f:
                if not (dirpath.endswith("sha256") and keep.get(digest) == f.read()):
                    found.append(os.path.relpath(path, root))
    if os.path.exists(os.path.join(root, "images.json")):
        found.append("images.json")
    return found


def error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr and "Exception" not in stderr
    return lines[0]


def unpacking(root: str) -> list[str]:
    """Files in the store's unpack staging directories now (a layer being unpacked)."""
    out = []
    tmp = os.path.join(root, "tmp")
    for d in os.listdir(tmp):
        for dirpath, _, files in os.walk(os.path.join(tmp, d)):
            out += [os.path.join(dirpath, f) for f in files if f != ".lock"]
    return out


def test_layer_is_unpacked_while_its_blob_downloads(rb: Runner, server: RegistryServer, tmp_path: Path) -> None:
    ref, img, big = push_image(server.host, "pull/paused:1", seed=1)
    root = rb.fresh_root()
    with blob_proxy(server, big.digest, "pause", tmp_path) as (host, flag, _):
        pull = subprocess.Popen(
            rb._prefix() + [rb.bin, "pull", f"{host}/pull/paused:1"],
            env={**rb._env(None), "RBUILD_ROOT": root},
            cwd=rb.base,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # the proxy holds back the blob's last quarter: the files before it are unpacked meanwhile
            deadline = time.monotonic() + 60
            seen: list[str] = []
            while time.monotonic() < deadline and pull.poll() is None:
                if Path(f"{flag}.paused").exists() and (seen := unpacking(root)):
                    break
                time.sleep(0.05)
            assert seen, "nothing was unpacked while the blob was still downloading"
            assert not os.listdir(os.path.join(root, "chains"))  # a layer only once all of it is there and verified
        finally:
            flag.touch()
            out, err = pull.communicate(timeout=120)
    assert pull.returncode == 0, err
    assert out.strip() == img.config.digest
    assert len([d for d in Path(root, "chains").iterdir() if d.is_dir()]) == 2 and unpacking(root) == []
    files = sorted(p.name for p in Path(root, "chains").glob("*/data/f*"))
    assert files == sorted([f"f{i:03}" for i in range(40)] + ["f000"])


def test_corrupt_blob_in_registry_storage_fails_and_leaves_nothing(rb: Runner, server: RegistryServer) -> None:
    ref, img, big = push_image(server.host, "pull/corrupt:1", seed=2)
    data = Path(server.dir, "data/docker/registry/v2/blobs/sha256", big.digest[7:9], big.digest[7:], "data")
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x55  # in the middle: the start of the layer unpacks before the end arrives
    data.write_bytes(bytes(blob))
    root = rb.fresh_root()
    res = rb.run("pull", ref, root=root, check=False)
    assert res.returncode == 125
    line = error_line(res.stderr)
    assert f"blob {big.digest} failed verification" in line and "digest mismatch" in line, line
    assert leftovers(root, {d: b for d, b in img.blobs.items() if d != big.digest}) == []


def test_pull_whose_server_dies_mid_blob_leaves_nothing(rb: Runner, server: RegistryServer, tmp_path: Path) -> None:
    ref, img, big = push_image(server.host, "pull/killed:1", seed=3)
    root = rb.fresh_root()
    with blob_proxy(server, big.digest, "die", tmp_path) as (host, _, proc):
        res = rb.run("pull", f"{host}/pull/killed:1", root=root, check=False)
        assert proc.wait(10) == -signal.SIGKILL  # the server did die in the middle of the blob
    assert res.returncode == 125
    line = error_line(res.stderr)
    assert line == f"Error: pulling {host}/pull/killed:1: connection refused"
    assert leftovers(root, {d: b for d, b in img.blobs.items() if d != big.digest}) == []


# -- the growing file itself (no registry)


def test_growing_reader_waits_for_bytes_and_ends_only_when_finished(tmp_path: Path) -> None:
    g = Growing("blob")
    with open(tmp_path / "blob", "w+b") as f:
        g.attach(f.fileno())
        reader = g.reader()
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: got.append(reader.read(-1)))
        thread.start()
        for i in range(5):
            f.write(bytes([i]) * 1000)
            f.flush()
            g.grew(f.tell())
            time.sleep(0.02)
        assert thread.is_alive()  # everything written so far is read, but the end has not come
        os.rename(tmp_path / "blob", tmp_path / "final")  # readers keep their descriptor
        g.finish("sha256:" + "0" * 64, 5000)
        thread.join(5)
    assert got == [b"".join(bytes([i]) * 1000 for i in range(5))]
    reader.seek(1000)
    assert reader.read(3) == b"\x01\x01\x01"
    g.close()


def test_growing_restart_and_failure_reach_the_reader(tmp_path: Path) -> None:
    g = Growing("blob")
    with open(tmp_path / "blob", "w+b") as f:
        g.attach(f.fileno())
        f.write(b"first copy")
        f.flush()
        g.grew(10)
        reader = g.reader()
        assert reader.read(5) == b"first"
        f.seek(0)
        f.truncate()
        g.restart()  # a download starting over: bytes already read may not be the blob
        with pytest.raises(Restarted):
            reader.read(5)
        fresh = g.reader()
        f.write(b"again")
        f.flush()
        g.grew(5)
        assert fresh.read(5) == b"again"
        g.fail(RbuildError("pulling x: blob y failed verification: digest mismatch"))
        with pytest.raises(RbuildError, match="digest mismatch"):
            fresh.read(5)
        with pytest.raises(RbuildError, match="digest mismatch"):
            g.result()
    g.close()


def test_cancelled_growing_stops_its_writer(tmp_path: Path) -> None:
    g = Growing("compressing layer")
    with open(tmp_path / "blob", "w+b") as f:
        g.attach(f.fileno())
        g.grew(1)
        stop = threading.Event()
        stop.set()
        with pytest.raises(Cancelled):
            g.wait(100, stop)  # a reader that gives up
        g.cancel()
        with pytest.raises(Cancelled):
            g.grew(2)
    g.close()
