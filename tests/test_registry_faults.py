"""Faults injected by a proxy between rbuild and a real registry: every transfer ends with correct
digests or a clear error naming the reference, and the destination never holds anything partial."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import (
    Fault,
    FaultProxy,
    RegistryServer,
    SampleImage,
    blob_files,
    docker_registry,
    fault_proxy,
    isolate,
    make_image,
)

from rootless.errors import RbuildError
from rootless.oci.reference import Reference, parse_reference
from rootless.registry import client as reg_mod
from rootless.registry.api import Registry, RegistryOptions

BLOB = r"/blobs/sha256:"


@pytest.fixture(scope="module")
def server() -> Iterator[RegistryServer]:
    with docker_registry() as srv:
        yield srv


@pytest.fixture
def proxy(server: RegistryServer) -> Iterator[FaultProxy]:
    with fault_proxy(server.host) as p:
        yield p


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    return isolate(monkeypatch, str(tmp_path))


@pytest.fixture
def pushed(proxy: FaultProxy, request: pytest.FixtureRequest) -> tuple[Reference, SampleImage]:
    """An image (three layers of ~200 KB) pushed cleanly through the proxy, the log then cleared."""
    img = make_image([200_000, 200_000, 200_000])
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    ref = parse_reference(f"{proxy.host}/faults/{name}:v1")
    Registry(RegistryOptions()).push(ref, img.manifest, img.media_type, img.config, img.config_bytes, img.openers())
    proxy.log.clear()
    return ref, img


def pull(ref: Reference, dest: Path) -> None:
    r = Registry(RegistryOptions())
    r.fetch_blobs(ref, r.resolve(ref).layers, str(dest))


def assert_complete(dest: Path, img: SampleImage) -> None:
    assert blob_files(str(dest)) == {d.digest.replace(":", "/"): img.blobs[d.digest] for d in img.layers}


def assert_clean(dest: Path, img: SampleImage) -> None:
    """Whatever is there is a whole, correct blob: no temp files, no locks, no partial content."""
    for rel, data in blob_files(str(dest)).items():
        assert rel.startswith("sha256/") and img.blobs["sha256:" + rel.split("/")[1]] == data, rel


def test_dropped_connection_resumes_with_range(
    proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path
) -> None:
    ref, img = pushed
    layer = img.layers[1].digest
    proxy.add(Fault("drop", path=layer))
    pull(ref, tmp_path / "b")
    assert [s for _, _, s in proxy.requests("GET", layer)] == [200, 206]
    assert_complete(tmp_path / "b", img)


def test_dropped_connection_restarts_when_range_is_ignored(
    proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path
) -> None:
    ref, img = pushed
    layer = img.layers[0].digest
    proxy.add(Fault("drop", path=layer))
    proxy.add(Fault("ignore-range", path=layer))
    pull(ref, tmp_path / "b")
    assert [s for _, _, s in proxy.requests("GET", layer)] == [200, 200]
    assert_complete(tmp_path / "b", img)


@pytest.mark.parametrize("where", ["/manifests/", BLOB])
def test_500_then_200(proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path, where: str) -> None:
    ref, img = pushed
    proxy.add(Fault("status", path=where, status=500, times=2))
    pull(ref, tmp_path / "b")
    assert_complete(tmp_path / "b", img)


def test_429_with_retry_after(proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path) -> None:
    ref, img = pushed
    fault = proxy.add(Fault("status", path=BLOB, status=429, headers={"Retry-After": "1"}))
    pull(ref, tmp_path / "b")
    assert fault.hits == 1
    assert_complete(tmp_path / "b", img)


@pytest.mark.parametrize("kind", ["truncate", "flip"])
def test_corruption_once_is_refetched(
    proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path, kind: str
) -> None:
    ref, img = pushed
    proxy.add(Fault(kind, path=img.layers[2].digest))
    pull(ref, tmp_path / "b")
    assert len(proxy.requests("GET", img.layers[2].digest)) == 2
    assert_complete(tmp_path / "b", img)


@pytest.mark.parametrize(("kind", "message"), [("truncate", "200000|bytes"), ("flip", "digest mismatch")])
def test_persistent_corruption_is_a_clear_error(
    proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path, kind: str, message: str
) -> None:
    ref, img = pushed
    bad = img.layers[1].digest
    proxy.add(Fault(kind, path=bad, times=None))
    with pytest.raises(RbuildError, match=rf"pulling {ref}: blob {bad} failed verification: .*({message})"):
        pull(ref, tmp_path / "b")
    assert_clean(tmp_path / "b", img)
    assert not (tmp_path / "b" / bad.replace(":", "/")).exists()


def test_tampered_manifest(proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path) -> None:
    ref, img = pushed
    proxy.add(Fault("flip", path="/manifests/v1"))
    assert Registry(RegistryOptions()).resolve(ref).manifest_digest == img.digest
    proxy.add(Fault("flip", path="/manifests/", times=None))
    with pytest.raises(RbuildError, match=rf"pulling {ref}: manifest digest mismatch"):
        Registry(RegistryOptions()).resolve(ref)


def test_persistent_500_names_reference_and_status(
    proxy: FaultProxy, pushed: tuple[Reference, SampleImage], tmp_path: Path
) -> None:
    ref, img = pushed
    r = Registry(RegistryOptions())
    remote = r.resolve(ref)
    proxy.add(Fault("status", path=img.layers[0].digest, status=503, times=None))
    with pytest.raises(RbuildError, match=rf"pulling {ref}: blob {img.layers[0].digest}: 503"):
        r.fetch_blobs(ref, remote.layers, str(tmp_path / "b"))
    assert_clean(tmp_path / "b", img)


def test_push_survives_faults(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(reg_mod, "CHUNK_THRESHOLD", 300_000)
    monkeypatch.setattr(reg_mod, "CHUNK_SIZE", 100_000)
    img = make_image([500_000, 50_000], kinds=["none", "gzip"])
    big, small = img.layers
    proxy.add(Fault("reset", path="/blobs/uploads/", method="PATCH"))  # a chunk lands, its answer is lost
    proxy.add(Fault("status", path="/blobs/uploads/", method="PATCH", status=500))
    proxy.add(Fault("status", path=f"digest={small.digest.replace(':', '%3A')}", method="PUT", status=502))
    proxy.add(Fault("status", path="/manifests/", method="PUT", status=429, headers={"Retry-After": "0"}))
    proxy.add(Fault("reset", path="/blobs/sha256:", method="HEAD"))
    ref = parse_reference(f"{proxy.host}/faults/push:v1")
    Registry(RegistryOptions()).push(ref, img.manifest, img.media_type, img.config, img.config_bytes, img.openers())
    assert all(f.hits == 1 for f in proxy.faults)
    pull(ref, tmp_path / "b")
    assert_complete(tmp_path / "b", img)


def test_push_persistent_failure_is_clear(proxy: FaultProxy) -> None:
    img = make_image([1_000])
    proxy.add(Fault("status", path="/blobs/uploads/", method="PUT", status=500, times=None))
    ref = parse_reference(f"{proxy.host}/faults/pushfail:v1")
    with pytest.raises(RbuildError, match=rf"pushing {ref}: uploading blob sha256:[0-9a-f]+: .*500"):
        Registry(RegistryOptions()).push(ref, img.manifest, img.media_type, img.config, img.config_bytes, img.openers())
    assert proxy.requests("PUT", "/manifests/") == []  # the manifest never goes up without its blobs
