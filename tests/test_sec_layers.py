"""Security review, items 3 and 8: one image cannot change another image's layers or pushed blobs, layer
blobs with trailing bytes are refused, and a RUN cannot forge rbuild's private `user.rbuild.*` records.

Everything runs as the unprivileged test users: builds through `rbuild`, layer-level checks inside their
user namespace (`hostile.userns.in_userns`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Runner, busybox_layer, write_oci_layout
from hostile.userns import in_userns
from ocitree import Tree, diff_trees, flatten, load
from registry_helpers import isolate

from rootless.oci.reference import parse_reference
from rootless.registry.api import Descriptor, Registry, RegistryOptions

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def tar_of(*entries: tuple[Any, ...]) -> bytes:
    """A layer tar of (name, type, mode, uid, gid[, data | (major, minor)]) entries, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, mode, uid, gid, *rest in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, 1700000000
            data = b""
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = rest[0]
            elif rest:
                data = rest[0]
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def layout_with_blobs(path: str, layers: list[tuple[bytes, bytes, str]], cmd: str = "sh") -> str:
    """An OCI layout whose layers are given as (uncompressed tar, exact blob, media type)."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(path, "blobs", "sha256", h), "wb") as f:
            f.write(data)
        return "sha256:" + h

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": [cmd]},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest() for raw, _, _ in layers],
            },
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": [{"mediaType": mt, "digest": put(blob), "size": len(blob)} for _, blob, mt in layers],
        }
    ).encode()
    digest = put(manifest)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(
            {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}]}, f
        )
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return digest


def tree_of(rb: Runner, image: str, root: str) -> Tree:
    out = rb.mkdir()
    rb.run("push", image, f"oci:{out}/img", root=root)
    return flatten(load(f"{out}/img").layers)


def last_layer(rb: Runner, image: str, root: str) -> dict[str, tarfile.TarInfo]:
    out = rb.mkdir()
    rb.run("push", image, f"oci:{out}/img", root=root)
    with tarfile.open(fileobj=io.BytesIO(load(f"{out}/img").layers[-1])) as tf:
        return {m.name.rstrip("/"): m for m in tf}


# -------------------------------------------------------------------------------------------------------
# item 3a: a layer's directory depends on its parents, so it is stored per chain


def shared_layer_images(rb: Runner) -> tuple[str, str]:
    """(victim, hostile) OCI layouts sharing the diff_id of a layer whose tar leaves out its parent
    directories; below it, the victim has /usr/local/bin 0755 root, the hostile one 0777 uid 1000."""
    shared = tar_of(("usr/local/bin/tool", tarfile.REGTYPE, 0o755, 0, 0, b"#!/bin/sh\necho tool\n"))
    dirs = [("usr/local", tarfile.DIRTYPE, 0o755, 0, 0)]
    victim, hostile = rb.mkdir("victim"), rb.mkdir("hostile")
    bb = busybox_layer()
    write_oci_layout(victim, [bb, tar_of(*dirs, ("usr/local/bin", tarfile.DIRTYPE, 0o755, 0, 0)), shared])
    write_oci_layout(
        hostile,
        [bb, tar_of(*dirs, ("usr/local/bin", tarfile.DIRTYPE, 0o777, 1000, 1000)), shared],
        config_extra={"Cmd": ["hostile"]},
    )
    return victim, hostile


def test_shared_layer_keeps_its_own_parents(rb: Runner) -> None:
    victim, hostile = shared_layer_images(rb)
    ctx = rb.context(
        {
            "Containerfile": f"FROM oci:{victim}\nRUN touch /usr/local/bin/new && "
            "stat -c '%a %u:%g' /usr/local/bin > /seen\n"
        }
    )
    root = rb.fresh_root()
    rb.run("pull", f"oci:{hostile}", root=root)  # the first importer of the shared diff_id
    poisoned = tree_of(rb, rb.build(ctx, root=root), root)
    fresh_root = rb.fresh_root()
    fresh = tree_of(rb, rb.build(ctx, root=fresh_root), fresh_root)
    assert poisoned["/usr/local/bin"][1:4] == (0o755, 0, 0), poisoned["/usr/local/bin"]
    assert diff_trees(poisoned, fresh, ("after the hostile image", "fresh store")) == []


# -------------------------------------------------------------------------------------------------------
# item 3b: each image pushes the blobs it came with


@pytest.fixture
def registry_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Registry:
    isolate(monkeypatch, str(tmp_path))  # the client this test uses reads no configuration of the machine
    return Registry(RegistryOptions())


def upload(client: Registry, ref: str, config: bytes, layers: list[bytes]) -> None:
    config_desc = Descriptor(OCI_CONFIG, "sha256:" + hashlib.sha256(config).hexdigest(), len(config))
    descs = [Descriptor(GZIP_LAYER, "sha256:" + hashlib.sha256(b).hexdigest(), len(b)) for b in layers]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [d.to_json() for d in descs],
        }
    ).encode()
    client.push(
        parse_reference(ref),
        manifest,
        OCI_MANIFEST,
        config_desc,
        config,
        [(d, lambda b=b: io.BytesIO(b)) for d, b in zip(descs, layers, strict=True)],
    )


def pushed_layers(registry: str, repo: str, tag: str) -> list[str]:
    req = urllib.request.Request(
        f"http://{registry}/v2/{repo}/manifests/{tag}",
        headers={"Accept": f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [d["digest"] for d in json.load(resp)["layers"]]


def test_each_image_pushes_its_own_layer_blobs(rb: Runner, registry: str, registry_client: Registry) -> None:
    raw = busybox_layer()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    own = gzip.compress(raw, mtime=0)
    other = gzip.compress(raw, compresslevel=1, mtime=1234)  # the same tar, other bytes
    own_digest, other_digest = ("sha256:" + hashlib.sha256(b).hexdigest() for b in (own, other))

    def config(cmd: str) -> bytes:
        return json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": [cmd]},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode()

    upload(registry_client, f"{registry}/sec/hostile:1", config("hostile"), [other])
    upload(registry_client, f"{registry}/sec/victim:1", config("sh"), [own])
    upload(registry_client, f"{registry}/sec/twin:1", config("sh"), [other])  # the victim's config: its image id
    root = rb.fresh_root()
    rb.run("pull", f"{registry}/sec/hostile:1", root=root)  # first to bring the diff_id
    rb.run("pull", f"{registry}/sec/victim:1", root=root)
    rb.run("pull", f"{registry}/sec/twin:1", root=root)  # same id as the victim, pulled last

    rb.run("push", f"{registry}/sec/victim:1", f"{registry}/sec/victim-copy:1", root=root)
    assert pushed_layers(registry, "sec/victim-copy", "1") == [own_digest]
    rb.run("push", f"{registry}/sec/twin:1", f"{registry}/sec/twin-copy:1", root=root)
    assert pushed_layers(registry, "sec/twin-copy", "1") == [other_digest]

    ctx = rb.context({"Containerfile": f"FROM {registry}/sec/victim:1\nRUN echo built > /built\n"})
    rb.run("build", "-q", "--push", "-t", f"{registry}/sec/built:1", ctx, root=root)
    built = pushed_layers(registry, "sec/built", "1")
    assert len(built) == 2 and built[0] == own_digest


# -------------------------------------------------------------------------------------------------------
# item 3c: bytes after the compressed stream are refused, as Go's readers refuse them


@pytest.mark.parametrize("kind, tail", [("gzip", b"\0" * 512), ("gzip", b"junk"), ("zstd", b"\x28\xb5\x2f")])
def test_layer_blob_with_trailing_bytes_is_refused(rb: Runner, kind: str, tail: bytes) -> None:
    raw = tar_of(("file", tarfile.REGTYPE, 0o644, 0, 0, b"data\n"))
    if kind == "gzip":
        blob, mt = gzip.compress(raw, mtime=0) + tail, GZIP_LAYER
    else:
        blob, mt = zstandard.ZstdCompressor().compress(raw) + tail, "application/vnd.oci.image.layer.v1.tar+zstd"
    path = rb.mkdir()
    layout_with_blobs(path, [(raw, blob, mt)])
    res = rb.run("pull", f"oci:{path}", root=rb.fresh_root(), check=False)
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "trailing bytes" in lines[0] and digest in lines[0], (
        res.stderr
    )


def test_gzip_members_back_to_back_are_one_layer(rb: Runner) -> None:
    """What Go's gzip reader accepts (multistream) still pulls."""
    raw = tar_of(("a", tarfile.REGTYPE, 0o644, 0, 0, b"a\n"), ("b", tarfile.REGTYPE, 0o644, 0, 0, b"b\n"))
    blob = gzip.compress(raw[:512], mtime=0) + gzip.compress(raw[512:], mtime=0)
    path = rb.mkdir()
    layout_with_blobs(path, [(raw, blob, GZIP_LAYER)])
    root = rb.fresh_root()
    image = rb.run("pull", f"oci:{path}", root=root).stdout.strip()
    assert tree_of(rb, image, root)["/b"].size == 2


# -------------------------------------------------------------------------------------------------------
# item 8: a RUN's output never carries rbuild's records unless copy-up brought them


SETX_C = r"""
#include <stdio.h>
#include <sys/xattr.h>
/* setx PATH NAME VALUE: set an extended attribute; "%00" in VALUE is a NUL byte */
int main(int argc, char **argv) {
    char buf[4096];
    size_t n = 0;
    if (argc != 4) return 2;
    for (const char *p = argv[3]; *p && n < sizeof buf; p++) {
        if (p[0] == '%' && p[1] == '0' && p[2] == '0') { buf[n++] = 0; p += 2; } else buf[n++] = *p;
    }
    if (setxattr(argv[1], argv[2], buf, n, 0) != 0) { perror("setxattr"); return 1; }
    return 0;
}
"""


@pytest.fixture(scope="module")
def setx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """A static setxattr(2) tool (busybox has no setfattr)."""
    d = tmp_path_factory.mktemp("setx")
    (d / "setx.c").write_text(SETX_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "setx"), str(d / "setx.c")], check=True, capture_output=True)
    yield (d / "setx").read_bytes()


def forging_build(runner: Runner, setx: bytes, script: str) -> dict[str, tarfile.TarInfo]:
    """The layer a RUN of `script` makes on busybox plus a layer whose owners and device are recorded."""
    base = runner.mkdir()
    # owners beyond the subuid range (and any but root without one) are held in user.rbuild.* records
    write_oci_layout(
        base,
        [
            busybox_layer(),
            tar_of(
                ("srv", tarfile.DIRTYPE, 0o755, 0, 0),
                ("srv/sda", tarfile.BLKTYPE, 0o600, 0, 6, (8, 0)),
                ("srv/bigowner", tarfile.REGTYPE, 0o644, 70000, 70000, b"old\n"),
                ("srv/chowned", tarfile.REGTYPE, 0o644, 70000, 70000, b"old\n"),
            ),
        ],
    )
    ctx = runner.context(
        {"Containerfile": f"FROM oci:{base}\nCOPY setx run.sh /\nRUN sh -e /run.sh\n", "setx": setx, "run.sh": script}
    )
    os.chmod(os.path.join(ctx, "setx"), 0o755)
    root = runner.fresh_root()
    res = runner.run("build", "-q", ctx, root=root, check=False)
    assert res.returncode == 0, res.stderr
    return last_layer(runner, res.stdout.strip(), root)


@pytest.mark.e2e  # builds as the session's users (fixtures looked up by name)
@pytest.mark.parametrize("who", ["sub", "single"])
def test_run_cannot_forge_rbuild_records(who: str, request: pytest.FixtureRequest, setx: bytes) -> None:
    runner: Runner = request.getfixturevalue("rb" if who == "sub" else "rb_single")
    layer = forging_build(
        runner,
        setx,
        (
            "touch /dev-forged /owned && mkdir /d && ln -s target /d/link\n"
            "/setx /dev-forged user.rbuild.dev b:8:0\n"  # the record /srv/sda has
            "chmod 666 /dev-forged && ln /dev-forged /dev-forged2\n"
            "/setx /owned user.rbuild.stat 4242:4242\n"
            "/setx /d user.rbuild.stat 4242:4242\n"
            '/setx /d user.rbuild.lstat "link%004242:4242:$(stat -c %i /d/link)%00"\n'
            "chmod 640 /srv/sda && echo new >> /srv/bigowner && ln /srv/bigowner /srv/bighl\n"
            + ("chown 5:5 /srv/chowned\n" if runner.has_range else "")
        ),
    )
    assert layer["dev-forged"].isreg() and layer["dev-forged"].mode == 0o666
    assert layer["dev-forged2"].islnk() and layer["dev-forged2"].linkname == "dev-forged"
    for name in ("owned", "d", "d/link", "dev-forged", "dev-forged2"):
        assert (layer[name].uid, layer[name].gid) == (0, 0), name
    # what copy-up brought from the layer below stays: the device (with its new mode), recorded owners
    sda = layer["srv/sda"]
    assert sda.isblk() and (sda.devmajor, sda.devminor, sda.mode, sda.gid) == (8, 0, 0o640, 6)
    for name in ("srv/bigowner", "srv/bighl"):  # one file, two names
        assert (layer[name].uid, layer[name].gid) == (70000, 70000), name
    if runner.has_range:  # chowned after copy-up: the record no longer tells its owner
        assert (layer["srv/chowned"].uid, layer["srv/chowned"].gid) == (5, 5)


@pytest.mark.e2e  # builds as the session's users (fixtures looked up by name)
@pytest.mark.parametrize("who", ["sub", "single"])
def test_run_setting_a_malformed_record_is_no_error(who: str, request: pytest.FixtureRequest, setx: bytes) -> None:
    runner: Runner = request.getfixturevalue("rb" if who == "sub" else "rb_single")
    layer = forging_build(runner, setx, "touch /bad && /setx /bad user.rbuild.stat not-a-number\n")
    assert layer["bad"].isreg() and (layer["bad"].uid, layer["bad"].gid) == (0, 0)


MALFORMED = r"""
import os, sys
from rootless.layer import layers
from rootless.layer.ownership import Ownership
base = sys.argv[1]
out = []
def attempt(what, fn):
    try:
        fn()
        out.append(f"{what}: accepted")
    except layers.LayerError as e:
        out.append(f"{what}: LayerError: {e}")
    except Exception as e:
        out.append(f"{what}: {type(e).__name__}: {e}")
for i, (name, value, kind) in enumerate([
        ("user.rbuild.stat", b"12", "file"), ("user.rbuild.stat", b"1:-2", "file"),
        ("user.rbuild.dev", b"b:8", "file"), ("user.rbuild.dev", b"x:1:2", "file"),
        ("user.rbuild.lstat", b"name\0oops\0", "dir"), ("user.rbuild.lstat", b"name\x001:2:3", "dir")]):
    d = os.path.join(base, f"w{i}")
    os.makedirs(d)
    target = os.path.join(d, "x")
    if kind == "file":
        open(target, "w").close()
    else:
        os.mkdir(target)
    os.setxattr(target, name, value)
    attempt(f"write_tar {name}={value!r}", lambda d=d: layers.write_tar(d, None))
lower = os.path.join(base, "lower")
os.makedirs(os.path.join(lower, "usr"))
os.setxattr(os.path.join(lower, "usr"), "user.rbuild.stat", b"garbage")
import io, tarfile
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as tf:
    tf.addfile(tarfile.TarInfo("usr/file"), io.BytesIO(b""))
dest = os.path.join(base, "dest")
os.mkdir(dest)
attempt("unpack under a malformed lower", lambda: layers.unpack(io.BytesIO(buf.getvalue()), dest, lowers=[lower]))
os.setxattr(base, "user.rbuild.lstat", b"\xff")
os.symlink("t", os.path.join(base, "link"))
attempt("set_owner", lambda: layers.set_owner(os.path.join(base, "link"), 5, 5, ownership=Ownership.RECORDED))
print("\n".join(out))
"""


def test_malformed_records_are_layer_errors(rb: Runner) -> None:
    base = rb.mkdir()
    lines = in_userns(rb, MALFORMED, base, single=False).strip().splitlines()
    assert len(lines) == 8, lines
    for line in lines:
        assert ": LayerError: layer entry " in line and "malformed user.rbuild." in line, line


# -------------------------------------------------------------------------------------------------------
# a store made by rbuild before layers were keyed by chain id


DOWNGRADE = r"""
# Rewrites a store into format 1 as rbuild before the chain-id change left it: layers/DIFFID/ unpacked on
# the lowers of the first image that brought the diff_id, which kept its blob as "original" (the blobs of
# later images with that diff_id were never stored); built layers as their upper dirs, built images'
# manifests naming every layer by its diff_id, uncompressed.
import gzip, hashlib, json, os, shutil, sys
from rootless.layer import layers
from rootless.layer.ownership import Ownership
root = sys.argv[1]
single = os.environ["SINGLE"] == "1"
if json.load(open(os.path.join(root, "store.json")))["version"] == 1:
    sys.exit(0)  # made by an rbuild of format 1 already
blob = lambda d: os.path.join(root, "blobs", "sha256", d[7:])
read = lambda d: json.load(open(blob(d), "rb"))
index = json.load(open(os.path.join(root, "images.json")))
os.mkdir(os.path.join(root, "layers"))
never_stored, originals = set(), set()
for rec in index["images"]:
    diff_ids = read(rec["id"])["rootfs"]["diff_ids"]
    manifest = read(rec["manifest"])
    lowers, c = [], ""
    for d, desc in zip(diff_ids, manifest["layers"]):
        c = d if not c else "sha256:" + hashlib.sha256(f"{c} {d}".encode()).hexdigest()  # the chain id
        dest = os.path.join(root, "layers", d[7:])
        if desc["digest"] == d:  # made by a build
            os.rename(os.path.join(root, "chains", c[7:]), dest)
            meta = {"diff_id": d, "size": 0, "origin": "dir", "blobs": []}
        elif os.path.exists(dest + ".json"):
            never_stored.add(desc["digest"])
            lowers.append(dest)
            continue
        else:
            os.mkdir(dest)
            with gzip.open(blob(desc["digest"])) as f:  # this python lacks isal
                layers.unpack(f, dest, lowers=lowers[::-1], ownership=Ownership.for_mapping(single))
            meta = {"diff_id": d, "size": 0, "origin": "blob", "blobs": [dict(desc, original=True)]}
            originals.add(desc["digest"])
        json.dump(meta, open(dest + ".json", "w"))
        lowers.append(dest)
    if any(desc["digest"] == d for d, desc in zip(diff_ids, manifest["layers"])):
        old = dict(manifest, layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                                      "size": 0} for d in diff_ids])
        data = json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
        rec["manifest"] = "sha256:" + hashlib.sha256(data).hexdigest()
        open(blob(rec["manifest"]), "wb").write(data)
    rec.pop("manifests", None)
for digest in never_stored - originals:
    os.unlink(blob(digest))
json.dump(index, open(os.path.join(root, "images.json"), "w"))
shutil.rmtree(os.path.join(root, "chains"))
meta = json.load(open(os.path.join(root, "store.json")))
meta["version"] = 1
json.dump(meta, open(os.path.join(root, "store.json"), "w"))
"""


def test_store_of_format_1_is_converted(rb: Runner) -> None:
    victim, hostile = shared_layer_images(rb)
    root = rb.fresh_root()
    rb.run("pull", f"oci:{hostile}", root=root)
    rb.run("tag", rb.run("pull", f"oci:{victim}", root=root).stdout.strip(), "victim", root=root)
    ctx = rb.context({"Containerfile": "FROM victim\nRUN echo built > /built\n"})
    built = rb.build(ctx, "-t", "built", root=root)
    in_userns(rb, DOWNGRADE, root, single=False, env={"RBUILD_ROOT": root})
    with open(os.path.join(root, "store.json")) as f:
        assert json.load(f)["version"] == 1

    res = rb.run("images", "--format", "json", root=root)  # converted on first use
    assert "converting the store" in res.stderr and built in res.stdout
    with open(os.path.join(root, "store.json")) as f:
        assert json.load(f)["version"] == 2
    assert not os.path.exists(os.path.join(root, "layers"))
    assert tree_of(rb, built, root)["/built"].size == 6  # a built image survives
    # steps the old store cached may have run on another image's parents: they run again
    assert "Using cache" not in rb.run("build", ctx, root=root).stderr

    ctx = rb.context({"Containerfile": "FROM victim\nRUN touch /usr/local/bin/new\n"})
    after = tree_of(rb, rb.build(ctx, root=root), root)
    fresh_root = rb.fresh_root()
    rb.run("tag", rb.run("pull", f"oci:{victim}", root=fresh_root).stdout.strip(), "victim", root=fresh_root)
    fresh = tree_of(rb, rb.build(ctx, root=fresh_root), fresh_root)
    assert after["/usr/local/bin"][1:4] == (0o755, 0, 0), after["/usr/local/bin"]
    assert diff_trees(after, fresh, ("converted store", "fresh store")) == []
