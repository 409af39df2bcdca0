"""Interoperability with containers' own tools: rbuild pushes and skopeo pulls, skopeo pushes and rbuild
pulls (OCI and Docker formats), and a multi-platform list made by buildah is pulled per platform."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import RegistryServer, SampleImage, blob_files, docker_registry, isolate, make_image

from rootless.oci.image import DOCKER_MANIFEST, OCI_MANIFEST
from rootless.oci.reference import parse_reference
from rootless.registry.api import Descriptor, Registry, RegistryOptions, convert_manifest

pytestmark = pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo is not installed")


@pytest.fixture(scope="module")
def server() -> Iterator[RegistryServer]:
    with docker_registry() as srv:
        yield srv


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    return isolate(monkeypatch, str(tmp_path))


def run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"
    return res.stdout


def skopeo(*args: str) -> str:
    return run("skopeo", "--insecure-policy", *args)


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_rbuild_pushes_skopeo_pulls(server: RegistryServer, tmp_path: Path, fmt: str) -> None:
    img = make_image([30_000, 40_000])
    manifest, media_type = convert_manifest(img.manifest, fmt)
    config = Descriptor(json.loads(manifest)["config"]["mediaType"], img.config.digest, img.config.size)
    ref = f"{server.host}/interop/rb-{fmt}:v1"
    digest = Registry(RegistryOptions()).push(
        parse_reference(ref), manifest, media_type, config, img.config_bytes, img.openers()
    )
    assert skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{ref}").encode() == manifest
    inspect = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))
    assert inspect["Digest"] == digest
    # dir: keeps the manifest as is, and skopeo checks every blob digest on the way.
    skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{tmp_path / 'dir'}")
    assert (tmp_path / "dir" / "manifest.json").read_bytes() == manifest
    for layer in img.layers:
        assert (tmp_path / "dir" / layer.digest.split(":")[1]).read_bytes() == img.blobs[layer.digest]
    want_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    assert json.loads(manifest)["mediaType"] == want_type


@pytest.mark.parametrize(("fmt", "want"), [("oci", OCI_MANIFEST), ("v2s2", DOCKER_MANIFEST)])
def test_skopeo_pushes_rbuild_pulls(server: RegistryServer, tmp_path: Path, fmt: str, want: str) -> None:
    img = make_image([25_000, 35_000])
    img.write_layout(str(tmp_path / "layout"))
    ref = f"{server.host}/interop/sk-{fmt}:v1"
    skopeo("copy", "--dest-tls-verify=false", "--format", fmt, f"oci:{tmp_path / 'layout'}:latest", f"docker://{ref}")
    skopeo_digest = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))["Digest"]
    r = Registry(RegistryOptions())
    remote = r.resolve(parse_reference(ref))
    assert remote.manifest_media_type == want
    assert remote.manifest_digest == skopeo_digest
    assert json.loads(remote.config) == json.loads(img.config_bytes)
    r.fetch_blobs(parse_reference(ref), remote.layers, str(tmp_path / "blobs"))
    assert blob_files(str(tmp_path / "blobs")) == {d.digest.replace(":", "/"): img.blobs[d.digest] for d in img.layers}


def _images() -> dict[str, SampleImage]:
    return {
        "amd64": make_image([3_000], arch="amd64"),
        "arm64": make_image([3_000], arch="arm64", variant="v8"),
        "arm": make_image([3_000], arch="arm", variant="v7"),
    }


def _check_platforms(host: str, name: str, images: dict[str, SampleImage], list_digest: str) -> None:
    ref = parse_reference(f"{host}/{name}")
    for platform, arch in (("linux/amd64", "amd64"), ("linux/arm64/v8", "arm64"), ("linux/arm/v7", "arm")):
        remote = Registry(RegistryOptions(platform=platform)).resolve(ref)
        assert json.loads(remote.config)["architecture"] == arch
        assert [d.digest for d in remote.layers] == [d.digest for d in images[arch].layers]
        assert remote.index_digest == list_digest


@pytest.mark.skipif(not shutil.which("buildah"), reason="buildah is not installed")
@pytest.mark.parametrize("fmt", ["v2s2", "oci"])
def test_buildah_manifest_list_by_platform(server: RegistryServer, tmp_path: Path, fmt: str) -> None:
    images = _images()
    store = ["buildah", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), "--storage-driver", "vfs"]
    run(*store, "manifest", "create", "mylist")
    for arch, img in images.items():
        img.write_layout(str(tmp_path / arch))
        variant = ["--variant", {"arm64": "v8", "arm": "v7"}[arch]] if arch != "amd64" else []
        run(
            *store,
            "manifest",
            "add",
            "--os",
            "linux",
            "--arch",
            arch,
            *variant,
            "mylist",
            f"oci:{tmp_path / arch}:latest",
        )
    ref = f"{server.host}/interop/buildah-{fmt}:v1"
    run(*store, "manifest", "push", "--all", "--tls-verify=false", "--format", fmt, "mylist", f"docker://{ref}")
    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{ref}").encode()
    assert json.loads(raw)["mediaType"].endswith("manifest.list.v2+json" if fmt == "v2s2" else "image.index.v1+json")
    _check_platforms(server.host, f"interop/buildah-{fmt}:v1", images, "sha256:" + hashlib.sha256(raw).hexdigest())


def test_skopeo_copies_a_hand_written_index(server: RegistryServer, tmp_path: Path) -> None:
    images = _images()
    layout = tmp_path / "layout"
    entries = []
    for arch, img in images.items():
        img.write_layout(str(layout))  # shares one blobs/ directory; index.json rewritten below
        platform = {"os": "linux", "architecture": arch}
        if arch != "amd64":
            platform["variant"] = {"arm64": "v8", "arm": "v7"}[arch]
        entries.append(
            {"mediaType": img.media_type, "digest": img.digest, "size": len(img.manifest), "platform": platform}
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    ).encode()
    index_digest = "sha256:" + hashlib.sha256(index).hexdigest()
    (layout / "blobs" / "sha256" / index_digest.split(":")[1]).write_bytes(index)
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "digest": index_digest,
                        "size": len(index),
                        "annotations": {"org.opencontainers.image.ref.name": "multi"},
                    }
                ],
            }
        )
    )
    ref = f"{server.host}/interop/handmade:v1"
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{ref}")
    _check_platforms(server.host, "interop/handmade:v1", images, index_digest)
