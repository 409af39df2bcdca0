"""The distribution protocol against Debian's docker-registry on loopback (plain http, anonymous):
resolve, verified parallel fetch, platforms, push with HEAD skip, mount and chunks, mirrors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import (
    FaultProxy,
    RegistryServer,
    SampleImage,
    blob_files,
    docker_registry,
    fault_proxy,
    file_server,
    isolate,
    make_image,
    write,
)

from rootless.errors import RbuildError
from rootless.oci.image import DOCKER_LIST, OCI_INDEX
from rootless.oci.reference import Reference, parse_reference
from rootless.registry import client as reg_mod
from rootless.registry.api import Descriptor, Registry, RegistryOptions, resolve_names


@pytest.fixture(scope="module")
def server() -> Iterator[RegistryServer]:
    with docker_registry(url_allow=r"^http://127\.0\.0\.1") as srv:
        yield srv


@pytest.fixture
def proxy(server: RegistryServer) -> Iterator[FaultProxy]:
    with fault_proxy(server.host) as p:
        yield p


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    return isolate(monkeypatch, str(tmp_path))


def push(host: str, name: str, img: SampleImage, **options: object) -> Reference:
    ref = parse_reference(f"{host}/{name}")
    assert (
        Registry(RegistryOptions(**options)).push(  # type: ignore[arg-type]
            ref, img.manifest, img.media_type, img.config, img.config_bytes, img.openers()
        )
        == img.digest
    )
    return ref


def assert_fetched(dest: str, img: SampleImage, only: list[Descriptor] | None = None) -> None:
    """`dest` holds exactly the wanted blobs, byte for byte, and nothing else (no temp or lock files)."""
    want = {d.digest.replace(":", "/"): img.blobs[d.digest] for d in (only or img.layers)}
    assert blob_files(dest) == want


def test_pull_verified_layers_of_every_compression(server: RegistryServer, tmp_path: Path) -> None:
    img = make_image([50_000, 300_000, 2_000], kinds=["gzip", "zstd", "none"])
    ref = push(server.host, "pull/kinds:v1", img)
    r = Registry(RegistryOptions())
    remote = r.resolve(ref)
    assert (remote.manifest_digest, remote.manifest, remote.config) == (img.digest, img.manifest, img.config_bytes)
    assert remote.layers == img.layers and remote.index_digest is None
    assert r.remote_digest(ref) == img.digest
    dest = str(tmp_path / "blobs")
    r.fetch_blobs(ref, remote.layers, dest)
    assert_fetched(dest, img)
    by_digest = r.resolve(ref.with_digest(img.digest))
    assert by_digest.manifest_digest == img.digest


def test_docker_v2s2_manifest(server: RegistryServer) -> None:
    img = make_image([10_000], fmt="docker")
    ref = push(server.host, "pull/docker:v1", img)
    remote = Registry(RegistryOptions()).resolve(ref)
    assert remote.manifest_media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert remote.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"


@pytest.mark.parametrize("index_type", [OCI_INDEX, DOCKER_LIST])
def test_index_platform_selection(server: RegistryServer, index_type: str) -> None:
    images = {
        "amd64": make_image([1000], arch="amd64"),
        "arm64": make_image([1000], arch="arm64", variant="v8"),
        "arm": make_image([1000], arch="arm", variant="v7"),
    }
    r = Registry(RegistryOptions())
    entries = []
    for arch, img in images.items():
        r.push(
            parse_reference(f"{server.host}/multi/app@{img.digest}"),
            img.manifest,
            img.media_type,
            img.config,
            img.config_bytes,
            img.openers(),
        )
        plat = {
            "os": "linux",
            "architecture": arch,
            **({"variant": "v8" if arch == "arm64" else "v7"} if arch != "amd64" else {}),
        }
        entries.append({"mediaType": img.media_type, "digest": img.digest, "size": len(img.manifest), "platform": plat})
    index = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries}).encode()
    ref = parse_reference(f"{server.host}/multi/app:{'oci' if index_type == OCI_INDEX else 'docker'}")
    r.push(ref, index, index_type, images["amd64"].config, images["amd64"].config_bytes, [])
    index_digest = "sha256:" + hashlib.sha256(index).hexdigest()
    for platform, arch in (("linux/arm64", "arm64"), ("linux/arm/v7", "arm"), ("linux/amd64", "amd64")):
        remote = Registry(RegistryOptions(platform=platform)).resolve(ref)
        assert remote.manifest_digest == images[arch].digest
        assert remote.index_digest == index_digest
        assert json.loads(remote.config)["architecture"] == arch
    with pytest.raises(RbuildError, match=r"no image for platform linux/ppc64le.*linux/arm64"):
        Registry(RegistryOptions(platform="linux/ppc64le")).resolve(ref)
    assert Registry(RegistryOptions()).remote_digest(ref) == index_digest


def test_explicit_platform_must_match_single_image(server: RegistryServer) -> None:
    ref = push(server.host, "pull/single:v1", make_image([100], arch="amd64"))
    with pytest.raises(RbuildError, match="image is for linux/amd64, not the requested linux/arm64"):
        Registry(RegistryOptions(platform="linux/arm64")).resolve(ref)


def test_present_blobs_are_not_downloaded_again(proxy: FaultProxy, tmp_path: Path) -> None:
    img = make_image([20_000, 20_000, 20_000])
    ref = push(proxy.host, "pull/again:v1", img)
    dest = str(tmp_path / "blobs")
    r = Registry(RegistryOptions())
    r.fetch_blobs(ref, r.resolve(ref).layers, dest)
    assert len(proxy.requests("GET", "/blobs/sha256:")) == 1 + 3  # config + layers
    r.fetch_blobs(ref, img.layers, dest)
    os.unlink(os.path.join(dest, img.layers[1].digest.replace(":", "/")))
    r.fetch_blobs(ref, img.layers, dest)
    gets = [p for _, p, _ in proxy.requests("GET", "/blobs/sha256:")]
    assert len(gets) == 5 and gets[-1].endswith(img.layers[1].digest)
    assert_fetched(dest, img)


def test_concurrent_fetches_download_each_blob_once(proxy: FaultProxy, tmp_path: Path) -> None:
    img = make_image([400_000] * 4, seed=7)
    ref = push(proxy.host, "pull/concurrent:v1", img)
    dest = str(tmp_path / "blobs")
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            Registry(RegistryOptions()).fetch_blobs(ref, img.layers, dest)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for layer in img.layers:
        assert len(proxy.requests("GET", f"/blobs/{layer.digest}")) == 1
    assert_fetched(dest, img)


def test_concurrent_processes_share_downloads(proxy: FaultProxy, tmp_path: Path) -> None:
    img = make_image([300_000] * 3, seed=8)
    ref = push(proxy.host, "pull/procs:v1", img)
    dest = str(tmp_path / "blobs")
    layers = json.dumps([d.__dict__ for d in img.layers])
    code = (
        "import json, sys; from rootless.registry.api import *; from rootless.oci.reference import parse_reference;"
        f"Registry(RegistryOptions()).fetch_blobs(parse_reference({str(ref)!r}),"
        f"[Descriptor(**d) for d in json.loads({layers!r})], {dest!r})"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    for layer in img.layers:
        assert len(proxy.requests("GET", f"/blobs/{layer.digest}")) == 1
    assert_fetched(dest, img)


def test_push_skips_blobs_the_registry_has(proxy: FaultProxy) -> None:
    img = make_image([10_000, 10_000])
    push(proxy.host, "push/skip:v1", img)
    assert len(proxy.requests("POST", "/blobs/uploads/")) == 3
    proxy.log.clear()
    push(proxy.host, "push/skip:v2", img)
    assert proxy.requests("POST") == [] and proxy.requests("PATCH") == []
    assert len(proxy.requests("HEAD", "/blobs/")) == 3
    assert [m for m, p, _ in proxy.log if "/manifests/" in p] == ["PUT"]


def test_cross_repository_mount(proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image([10_000, 10_000])
    push(proxy.host, "mount/src:v1", img)
    proxy.log.clear()
    push(proxy.host, "mount/dst:v1", img)
    mounts = proxy.requests("POST", "mount=")
    assert len(mounts) == 3 and all(status == 201 for _, _, status in mounts)
    assert proxy.requests("PUT", "/blobs/uploads/") == []
    # A pull in one process is remembered for a push in the next (the location cache persists).
    other = make_image([5_000])
    ref = push(proxy.host, "mount/base:v1", other)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    Registry(RegistryOptions()).resolve(ref)
    proxy.log.clear()
    push(proxy.host, "mount/derived:v1", other)
    assert len([s for _, _, s in proxy.requests("POST", "mount=") if s == 201]) == 2


def test_mount_refused_falls_back_to_upload(proxy: FaultProxy) -> None:
    img = make_image([10_000])
    Registry(RegistryOptions()).client.locations.record(proxy.host, "never/pushed", [d.digest for d in img.layers])
    push(proxy.host, "mount/fallback:v1", img)
    assert [s for _, _, s in proxy.requests("POST", "mount=")] == [202]
    assert len(proxy.requests("PUT", "/blobs/uploads/")) == 2


def test_chunked_upload_for_large_blobs(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(reg_mod, "CHUNK_THRESHOLD", 256 * 1024)
    monkeypatch.setattr(reg_mod, "CHUNK_SIZE", 100 * 1024)
    img = make_image([700_000, 1_000], kinds=["none", "gzip"])
    ref = push(proxy.host, "push/chunked:v1", img)
    assert len(proxy.requests("PATCH", "/blobs/uploads/")) == -(-img.layers[0].size // (100 * 1024))
    dest = str(tmp_path / "blobs")
    Registry(RegistryOptions()).fetch_blobs(ref, img.layers, dest)
    assert_fetched(dest, img)


def test_push_by_digest_must_match(server: RegistryServer) -> None:
    img = make_image([100])
    with pytest.raises(RbuildError, match="does not match the reference"):
        Registry(RegistryOptions()).push(
            parse_reference(f"{server.host}/x/y@sha256:{'0' * 64}"),
            img.manifest,
            img.media_type,
            img.config,
            img.config_bytes,
            img.openers(),
        )


def test_push_rejects_unknown_blob_clearly(server: RegistryServer) -> None:
    img = make_image([100, 100])
    with pytest.raises(RbuildError, match=r"pushing .*push/missing:v1: manifest rejected: 400"):
        Registry(RegistryOptions()).push(
            parse_reference(f"{server.host}/push/missing:v1"),
            img.manifest,
            img.media_type,
            img.config,
            img.config_bytes,
            img.openers()[:1],
        )


def test_non_distributable_layer_from_urls(server: RegistryServer, tmp_path: Path) -> None:
    base = make_image([5_000])
    foreign = make_image([7_000], seed=3).layers[0]
    foreign_bytes = make_image([7_000], seed=3).blobs[foreign.digest]
    with file_server({"/layer.tar.gz": foreign_bytes}) as url:
        layer = Descriptor(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            foreign.digest,
            foreign.size,
            urls=[f"{url}/missing", f"{url}/layer.tar.gz"],
        )
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": base.media_type,
                "config": base.config.to_json(),
                "layers": [layer.to_json()],
            }
        ).encode()
        ref = parse_reference(f"{server.host}/foreign/img:v1")
        r = Registry(RegistryOptions())
        r.push(ref, manifest, base.media_type, base.config, base.config_bytes, [])
        remote = r.resolve(ref)
        assert remote.layers[0].urls == layer.urls
        dest = str(tmp_path / "blobs")
        r.fetch_blobs(ref, remote.layers, dest)
        assert blob_files(dest) == {foreign.digest.replace(":", "/"): foreign_bytes}
        broken = Descriptor(layer.media_type, "sha256:" + "1" * 64, 10, urls=[f"{url}/missing"])
        with pytest.raises(RbuildError, match=r"non-distributable layer sha256:1+ could not be fetched"):
            r.fetch_blobs(ref, [broken], str(tmp_path / "b2"))
        assert blob_files(str(tmp_path / "b2")) == {}


def test_clear_errors_name_the_reference(server: RegistryServer) -> None:
    r = Registry(RegistryOptions())
    with pytest.raises(RbuildError, match=rf"pulling {server.host}/no/such:tag: manifest unknown .*404"):
        r.resolve(parse_reference(f"{server.host}/no/such:tag"))
    with socket_closed_port() as port:
        with pytest.raises(RbuildError, match=rf"cannot reach registry 127.0.0.1:{port}: connection refused"):
            r.resolve(parse_reference(f"127.0.0.1:{port}/x/y"))


class socket_closed_port:
    """A loopback port nobody listens on."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = int(s.getsockname()[1])
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


def test_mirror_then_primary_and_search_order(server: RegistryServer, home: str) -> None:
    img = make_image([1_000])
    push(server.host, "mirrored/app:v1", img)
    with docker_registry() as mirror:
        write(
            os.path.join(home, ".config", "containers", "registries.conf"),
            f"""
unqualified-search-registries = ["{mirror.host}", "{server.host}"]
[[registry]]
prefix = "{server.host}/mirrored"
location = "{server.host}/mirrored"
[[registry.mirror]]
location = "{mirror.host}/copy"
""",
        )
        remote = Registry(RegistryOptions()).resolve(parse_reference(f"{server.host}/mirrored/app:v1"))
        assert remote.source == parse_reference(f"{server.host}/mirrored/app:v1")
        push(mirror.host, "copy/app:v1", img)
        r = Registry(RegistryOptions())
        remote = r.resolve(parse_reference(f"{server.host}/mirrored/app:v1"))
        assert remote.source == parse_reference(f"{mirror.host}/copy/app:v1")
        candidates = resolve_names("mirrored/app:v1")
        assert [c.registry for c in candidates] == [mirror.host, server.host]
        assert r.resolve_any(candidates).ref.registry == server.host
        with pytest.raises(RbuildError, match="not found in any registry searched"):
            r.resolve_any(resolve_names("nothing/here"))


def test_registry_import_is_lazy() -> None:
    code = (
        "import sys, rootless.registry.api, rootless.oci.reference;"
        "bad = [m for m in ('requests', 'urllib3', 'oras', 'jsonschema', 'ssl', 'rootless.registry.client')"
        " if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stale_temp_files_of_killed_pulls_are_swept(server: RegistryServer, tmp_path: Path) -> None:
    img = make_image([1_000])
    ref = push(server.host, "pull/sweep:v1", img)
    dest = tmp_path / "blobs"
    dest.mkdir()
    stale, fresh = dest / ".partial-0123456789abcdef-x", dest / ".partial-fedcba9876543210-y"
    old_lock = dest / f".lock-sha256-{'e' * 64}"
    for path in (stale, fresh, old_lock):
        path.write_bytes(b"half")
    os.utime(stale, (1, 1))
    os.utime(old_lock, (1, 1))
    Registry(RegistryOptions()).fetch_blobs(ref, img.layers, str(dest))
    assert not stale.exists() and not old_lock.exists() and fresh.exists()


def test_loopback_bypasses_proxy_environment(server: RegistryServer, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = push(server.host, "pull/proxied:v1", make_image([1_000]))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: anything sent there is lost
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert Registry(RegistryOptions()).resolve(ref).layers
