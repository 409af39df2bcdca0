"""One copy each of: media types, digest parsing, reference qualification, platform selection, the verifying
reader, atomic writes and the tar reader (issue 10). Each test pins a case where the copies disagreed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from typing import Any

import pytest
from conftest import Runner, write_oci_layout
from hostile.corpus import Case, cases
from test_hostile import make_canary, snapshot

from rootless.blob.digest import check_digest, hex_of, parse_digest
from rootless.errors import RbuildError
from rootless.oci import image as img
from rootless.oci import names
from rootless.oci.platform import host_platform
from rootless.oci.reference import is_qualified, parse_reference


@pytest.mark.parametrize(
    "name",
    ["MyHost/app", "Registry.Example/team/app:1", "index.docker.io/library/busybox", "app", "org/app", "h:5000/a"],
)
def test_local_names_and_references_agree_on_the_registry(name: str) -> None:
    """names.py had its own "is this qualified" rule: `MyHost/app` (a host, as docker reads it: the first
    component has upper case) was stored as `localhost/MyHost/app`, and `index.docker.io/...` kept the legacy
    hub name a pull normalises to docker.io."""
    stored = names.normalize(name)
    assert names.valid(stored)
    want = parse_reference(name).registry if is_qualified(name) else "localhost"
    assert stored.split("/", 1)[0] == want
    assert stored in names.candidates(name)


def test_digest_parsing_is_one_rule() -> None:
    """The store's hex_of and the references' check_digest were two parsers with two error texts."""
    good = "sha256:" + "a" * 64
    assert check_digest(good) == good and hex_of(good) == "a" * 64
    assert parse_digest("sha512:" + "0" * 128) == ("sha512", "0" * 128)
    for bad in ("sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "sha256:../" + "a" * 61, ""):
        with pytest.raises(RbuildError, match="invalid digest"):
            check_digest(bad)
    with pytest.raises(RbuildError, match="want sha256"):
        hex_of("sha512:" + "0" * 128)


# -- platform selection: oci: layouts and oci-archive: files honour --platform as registry pulls do ----------

_PLATFORMS = [("amd64", ""), ("arm64", "v8"), ("arm", "v7")]


def _put(layout: str, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def _one_file_tar(name: str, body: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(name)
        ti.size = len(body)
        tf.addfile(ti, io.BytesIO(body))
    return buf.getvalue()


def multi_platform_layout(layout: str, nested: bool) -> None:
    """amd64 + arm64/v8 + arm/v7 images of one name: each config says its platform, each layer holds
    /plat naming it. `nested`: index.json names one index (tag v1) that lists them, as `buildah manifest
    push` writes; else index.json lists the three (each tagged v1), as skopeo's multi-arch copies do."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    entries = []
    for arch, variant in _PLATFORMS:
        plat = {"architecture": arch, "os": "linux", **({"variant": variant} if variant else {})}
        layer = _one_file_tar("plat", "/".join(["linux", arch, variant]).rstrip("/").encode())
        config = {
            **plat,
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
            "config": {},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": img.OCI_MANIFEST,
            "config": {"mediaType": img.OCI_CONFIG, **_put(layout, json.dumps(config).encode())},
            "layers": [{"mediaType": img.OCI_LAYER, **_put(layout, layer)}],
        }
        entries.append({"mediaType": img.OCI_MANIFEST, **_put(layout, json.dumps(manifest).encode()), "platform": plat})
    tagged = {"org.opencontainers.image.ref.name": "v1"}
    if nested:
        inner = {"schemaVersion": 2, "mediaType": img.OCI_INDEX, "manifests": entries}
        top = [{"mediaType": img.OCI_INDEX, **_put(layout, json.dumps(inner).encode()), "annotations": tagged}]
    else:
        top = [{**e, "annotations": tagged} for e in entries]
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": img.OCI_INDEX, "manifests": top}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


def _pulled(rb: Runner, root: str, *args: str) -> dict[str, Any]:
    image_id = rb.run("pull", "-q", *args, root=root).stdout.split()[-1]
    doc = json.loads(rb.run("inspect", image_id, root=root).stdout)
    return dict(doc[0] if isinstance(doc, list) else doc)


@pytest.fixture(scope="module", params=["nested", "flat"])
def platforms(rb: Runner, request: pytest.FixtureRequest) -> tuple[str, str]:
    """The multi-platform layout as `oci:DIR:v1` and as `oci-archive:FILE:v1`."""
    base = rb.mkdir()
    layout = os.path.join(base, "layout")
    multi_platform_layout(layout, request.param == "nested")
    archive = os.path.join(base, "layout.tar")
    with tarfile.open(archive, "w") as tf:
        for name in sorted(os.listdir(layout)):
            tf.add(os.path.join(layout, name), name)
    rb.own(base)
    return f"oci:{layout}:v1", f"oci-archive:{archive}:v1"


@pytest.mark.parametrize("kind", ["layout", "archive"])
@pytest.mark.parametrize(
    ("flag", "arch", "variant"),
    [
        ("linux/arm64", "arm64", "v8"),
        ("linux/arm64/v8", "arm64", "v8"),
        ("linux/arm", "arm", "v7"),
        (None, "amd64", ""),
    ],
)
def test_layouts_choose_the_platform(
    rb: Runner, platforms: tuple[str, str], kind: str, flag: str | None, arch: str, variant: str
) -> None:
    """--platform (and variants, normalised as containerd does) picks the image, the host's without it;
    an oci: layout ignored the flag and an index of platform manifests was "3 images, name one"."""
    if flag is None and host_platform().architecture != "amd64":
        pytest.skip("the default case expects an amd64 host")
    spec = platforms[0] if kind == "layout" else platforms[1]
    root = rb.mkdir()
    got = _pulled(rb, root, *(["--platform", flag] if flag else []), spec)
    assert (got["Architecture"], got["Variant"]) == (arch, variant)


@pytest.mark.parametrize("kind", ["layout", "archive"])
def test_layouts_without_the_platform_are_one_error(rb: Runner, platforms: tuple[str, str], kind: str) -> None:
    spec = platforms[0] if kind == "layout" else platforms[1]
    res = rb.run("pull", "--platform", "linux/s390x", spec, check=False, root=rb.mkdir())
    error = one_error(res)
    assert "no image for platform linux/s390x (available: linux/amd64, linux/arm/v7, linux/arm64)" in error, error


def test_from_a_layout_takes_the_build_platform(rb: Runner, platforms: tuple[str, str]) -> None:
    """FROM oci: passed no registry options, so `build --platform` never reached the layout."""
    ctx = rb.context({"Containerfile": f"FROM {platforms[0]}\nLABEL x=1\n"})
    root = rb.mkdir()
    rb.run("build", "-q", "--platform", "linux/arm64", "-t", "plat", ctx, root=root)
    doc = json.loads(rb.run("inspect", "plat", root=root).stdout)
    assert (doc[0] if isinstance(doc, list) else doc)["Architecture"] == "arm64"


def one_error(res: subprocess.CompletedProcess[str]) -> str:
    """Exit 125 with exactly one `Error:` line, no traceback and no exception name."""
    assert res.returncode == 125, (res.returncode, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert not re.search(r"\b[A-Z][A-Za-z]*(Error|Exception)\b", errors[0]), errors[0]
    return errors[0]


# -- the tar reader: ADD of a local archive and oci-archive: imports go through the layer unpacker -----------


@pytest.fixture(scope="module")
def canary(rb: Runner) -> tuple[str, list[tuple[Any, ...]], dict[str, Case]]:
    path = make_canary(rb)
    return path, snapshot(path), {c.name: c for c in cases(path)}


@pytest.mark.parametrize("name", [c.name for c in cases("/canary")])
def test_corpus_as_added_archives(
    name: str, rb: Runner, busybox: str, canary: tuple[str, list[tuple[Any, ...]], dict[str, Case]]
) -> None:
    """Each layer of the case ADDed in turn to one directory: refused with one error line, or contained."""
    path, before, by_name = canary
    c = by_name[name]
    files: dict[str, str | bytes] = {f"l{i}.tar": layer for i, layer in enumerate(c.layers)}
    adds = "".join(f"ADD l{i}.tar /x/\n" for i in range(len(c.layers)))
    files["Containerfile"] = f"FROM oci:{busybox}\n{adds}"
    res = rb.run("build", "-q", "--no-cache", rb.context(files), check=False, env=c.env)
    if res.returncode != 0:
        assert "ADD: archive l" in one_error(res)
    assert snapshot(path) == before


@pytest.mark.parametrize("name", [c.name for c in cases("/canary")])
def test_corpus_as_oci_archives(
    name: str, rb: Runner, canary: tuple[str, list[tuple[Any, ...]], dict[str, Case]]
) -> None:
    """The case's last layer as the archive itself (refused or contained, then no layout in it), and the case
    as an image in an oci-archive: used by FROM (refused as FROM oci: refuses it)."""
    path, before, by_name = canary
    c = by_name[name]
    base = rb.mkdir()
    raw = os.path.join(base, "raw.tar")
    with open(raw, "wb") as f:
        f.write(c.layers[-1])
    layout = os.path.join(base, "layout")
    write_oci_layout(layout, c.layers)
    archive = os.path.join(base, "image.tar")
    with tarfile.open(archive, "w") as tf:
        for entry in sorted(os.listdir(layout)):
            tf.add(os.path.join(layout, entry), entry)
    rb.own(base)
    assert "oci-archive:" in one_error(rb.run("pull", f"oci-archive:{raw}", check=False, root=rb.mkdir(), env=c.env))
    assert snapshot(path) == before
    ctx = rb.context({"Containerfile": f"FROM oci-archive:{archive}\nLABEL hostile={name}\n"})
    res = rb.run("build", "-q", ctx, check=False, env=c.env)
    if c.refused:
        assert re.search(c.refused, one_error(res)), res.stderr
    else:
        assert res.returncode == 0, res.stderr
    assert snapshot(path) == before
