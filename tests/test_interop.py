"""Other tools accept rbuild's output: skopeo, umoci and buildah read what `rbuild push` writes.

One image is built (as the unprivileged test user) and written to an OCI layout, an oci-archive, a
docker-archive and a zstd-compressed OCI layout. skopeo inspects and copies each (skopeo verifies every
blob's digest as it copies); `umoci unpack --rootless` unpacks the gzip layout (umoci 0.4.7 cannot read
zstd); `buildah from` + `buildah run --isolation chroot` runs it. The files every tool ends up with are
compared with what tests/ocitree.py reads from the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import Runner
from ocitree import Entry, Image, compared_config, diff_trees, flatten, load
from test_differential import Buildah, buildah_session

CONTAINERFILE = """\
FROM oci:{busybox}
RUN mkdir -p /data/sub /data/empty && echo hello > /data/hello && ln /data/hello /data/hello.hard \\
 && ln -s hello /data/hello.sym && ln -s /nonexistent /data/dangling && echo x > /data/sub/x \\
 && chmod 0750 /data/sub && chown -R 1000:50 /data/sub && chmod 4755 /data/hello \\
 && rm /bin/vi && rm -rf /home/app
RUN rm /data/hello.sym && mkdir /data/new && echo y > /data/new/y && rm -rf /data/empty
COPY greet /usr/local/bin/greet
ENV GREETING="hi there"
WORKDIR /data
LABEL org.example.interop=yes
USER app
ENTRYPOINT ["/usr/local/bin/greet"]
CMD ["world"]
"""
GREET = '#!/bin/sh\necho "$GREETING $* from $(pwd) as $(id -u):$(id -g)"\n'
GREETING = "hi there world from /data as 1000:1000"


@dataclass
class Exports:
    image: Image  # as read back from the gzip OCI layout
    tree: dict[str, Entry]
    digest: str  # the manifest digest rbuild reported for the OCI layout
    layout: str  # oci:DIR:TAG transport strings, and the archive paths
    zstd: str
    oci_archive: str
    docker_archive: str
    out: str


@pytest.fixture(scope="module")
def exports(rb: Runner, busybox: str) -> Exports:
    ctx = rb.context({"Containerfile": CONTAINERFILE.format(busybox=busybox), "greet": GREET})
    os.chmod(os.path.join(ctx, "greet"), 0o755)
    rb.build(ctx, "-t", "localhost/interop:1")
    out = rb.mkdir("interop-out")
    dfile = os.path.join(out, "digest")
    rb.run("push", "--digestfile", dfile, "--compression-format", "gzip", "localhost/interop:1", f"oci:{out}/layout:v1")
    with open(dfile) as f:
        digest = f.read().strip()
    rb.run("push", "--compression-format", "zstd", "localhost/interop:1", f"oci:{out}/zstd:v1")
    rb.run("push", "localhost/interop:1", f"oci-archive:{out}/image.oci.tar:v1")
    rb.run("push", "localhost/interop:1", f"docker-archive:{out}/image.docker.tar")
    image = load(f"{out}/layout", "v1")
    return Exports(
        image,
        flatten(image.layers),
        digest,
        f"oci:{out}/layout:v1",
        f"oci:{out}/zstd:v1",
        f"oci-archive:{out}/image.oci.tar:v1",
        f"docker-archive:{out}/image.docker.tar",
        out,
    )


def test_the_image_is_what_was_built(exports: Exports) -> None:
    """The reference the other tools are compared with: ocitree's reading of the layout is right."""
    t = exports.tree
    assert exports.digest.startswith("sha256:")
    assert t["/data/hello"] == t["/data/hello.hard"] and t["/data/hello"].link == "=/data/hello"
    assert t["/data/hello"].mode == 0o4755 and t["/data/sub"] == Entry("dir", 0o750, 1000, 50, 0, "", "")
    assert t["/data/dangling"].link == "/nonexistent" and t["/usr/local/bin/greet"].mode == 0o755
    for gone in ("/bin/vi", "/home/app", "/data/hello.sym", "/data/empty"):
        assert gone not in t
    assert not {"/dev", "/proc", "/sys", "/etc/hosts"} & set(t)
    assert len(exports.image.layers) == 4
    mts = [d["mediaType"] for d in exports.image.manifest["layers"]]
    assert mts == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 4


# -------------------------------------------------------------------------------------------------------
# skopeo


def skopeo(rb: Runner, *args: str) -> str:
    return rb.sh(shlex.join(["skopeo", *args])).stdout


@pytest.mark.parametrize("which", ["layout", "zstd", "oci_archive", "docker_archive"])
def test_skopeo_inspect(rb: Runner, exports: Exports, which: str) -> None:
    ref: str = getattr(exports, which)
    info = json.loads(skopeo(rb, "inspect", ref))
    config = json.loads(skopeo(rb, "inspect", "--config", ref))
    assert config == exports.image.config  # the same config document in every format
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert "GREETING=hi there" in info["Env"]
    assert info["Labels"]["org.example.interop"] == "yes"
    raw = skopeo(rb, "inspect", "--raw", ref).encode()
    assert info["Digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    if which == "layout":
        assert info["Digest"] == exports.digest
        assert info["Layers"] == [d["digest"] for d in exports.image.manifest["layers"]]
    if which == "zstd":
        manifest = json.loads(raw)
        assert {d["mediaType"] for d in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    if which == "docker_archive":  # the archive's layers are the uncompressed diffs, named by RepoTags
        assert info["Layers"] == exports.image.config["rootfs"]["diff_ids"]
        assert load(exports.docker_archive.removeprefix("docker-archive:")).manifest["RepoTags"] == [
            "localhost/interop:1"
        ]


@pytest.mark.parametrize("which", ["layout", "zstd", "oci_archive", "docker_archive"])
def test_skopeo_copy(rb: Runner, exports: Exports, which: str) -> None:
    """skopeo copies every format into an OCI layout (checking blob digests); the image is unchanged."""
    ref: str = getattr(exports, which)
    dest = os.path.join(exports.out, f"copy-{which}")
    skopeo(rb, "copy", "-q", ref, f"oci:{dest}:copied")
    copied = load(dest, "copied")
    assert copied.config == exports.image.config
    assert diff_trees(exports.tree, flatten(copied.layers), ("rbuild", "skopeo")) == []
    if which in ("layout", "oci_archive"):  # nothing to convert: the very same manifest
        with open(os.path.join(dest, "index.json")) as f:
            assert json.load(f)["manifests"][0]["digest"] == exports.digest


def test_skopeo_copy_to_docker_archive(rb: Runner, exports: Exports) -> None:
    dest = os.path.join(exports.out, "skopeo.docker.tar")
    skopeo(rb, "copy", "-q", exports.layout, f"docker-archive:{dest}:localhost/interop:copied")
    copied = load(dest)
    assert compared_config(copied) == compared_config(exports.image)
    assert diff_trees(exports.tree, flatten(copied.layers), ("rbuild", "skopeo")) == []


# -------------------------------------------------------------------------------------------------------
# umoci


def _rootless_owner(raw: bytes) -> tuple[int, int]:
    """uid, gid from a user.rootlesscontainers xattr (protobuf: uint32 uid = 1; uint32 gid = 2)."""
    ids = {1: 0, 2: 0}
    i = 0
    while i < len(raw):
        key, i = _varint(raw, i)
        if key & 7 != 0:
            raise ValueError(f"unexpected protobuf wire type in {raw!r}")
        value, i = _varint(raw, i)
        ids[key >> 3] = value
    return ids[1], ids[2]


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


ROOTLESS_XATTR = "user.rootlesscontainers"


def walk_rootfs(root: str) -> dict[str, Entry]:
    """An unpacked rootfs as ocitree entries. A rootless unpack cannot chown: umoci records an owner
    other than 0:0 in the user.rootlesscontainers xattr (rootlesscontainers.io), read back here."""
    tree: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            host = os.path.join(dirpath, n)
            path = "/" + os.path.relpath(host, root)
            st = os.lstat(host)
            mode = stat.S_IMODE(st.st_mode)
            names = os.listxattr(host, follow_symlinks=False)
            uid, gid = 0, 0
            if ROOTLESS_XATTR in names:
                uid, gid = _rootless_owner(os.getxattr(host, ROOTLESS_XATTR, follow_symlinks=False))
            xattrs = tuple(
                sorted(
                    (x, os.getxattr(host, x, follow_symlinks=False).decode("utf-8", "surrogateescape"))
                    for x in names
                    if x != ROOTLESS_XATTR
                )
            )
            size, digest, link = 0, "", ""
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISLNK(st.st_mode):
                kind, link = "symlink", os.readlink(host)
            elif stat.S_ISREG(st.st_mode):
                kind, size = "file", st.st_size
                with open(host, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
            elif stat.S_ISFIFO(st.st_mode):
                kind = "fifo"
            else:
                kind = "other"
            tree[path] = Entry(kind, mode, uid, gid, size, digest, link, xattrs)
    for paths in inodes.values():
        if len(paths) > 1:
            for p in paths:
                tree[p] = tree[p]._replace(link="=" + min(paths))
    return tree


def test_umoci_unpack_rootless(rb: Runner, exports: Exports) -> None:
    bundle = os.path.join(exports.out, "bundle")
    layout = exports.layout.removeprefix("oci:")
    rb.sh(shlex.join(["umoci", "unpack", "--rootless", "--image", layout, bundle]))
    got = walk_rootfs(os.path.join(bundle, "rootfs"))
    assert diff_trees(exports.tree, got, ("image", "umoci")) == []
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    proc = spec["process"]
    assert proc["args"] == ["/usr/local/bin/greet", "world"]
    assert proc["cwd"] == "/data" and "GREETING=hi there" in proc["env"]
    assert proc["user"]["uid"] == 1000 and proc["user"]["gid"] == 1000
    assert spec["annotations"]["org.example.interop"] == "yes"


# -------------------------------------------------------------------------------------------------------
# buildah


@pytest.fixture(scope="module")
def buildah(rb: Runner) -> Iterator[Buildah]:
    with buildah_session(rb, "buildah-interop") as b:
        yield b


@pytest.fixture(scope="module")
def buildah_layout(rb: Runner, exports: Exports) -> Iterator[str]:
    """The OCI layout again, at a path buildah accepts.

    buildah names an image it takes from an oci: layout after the layout's path and rejects a path that
    is not a valid image name, as the session's temporary directory can be (a random name ending in "_").
    """
    path = f"/var/tmp/rbinterop-{os.getpid()}-{rb.uid}"
    shutil.copytree(exports.layout.removeprefix("oci:").rpartition(":")[0], os.path.join(path, "layout"))
    rb.own(path)
    try:
        yield f"oci:{path}/layout:v1"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("which", ["layout", "oci_archive", "docker_archive"])
def test_buildah_from_and_run(buildah: Buildah, exports: Exports, buildah_layout: str, which: str) -> None:
    ref: str = buildah_layout if which == "layout" else getattr(exports, which)
    ctr = buildah.run("from", "-q", ref).strip().splitlines()[-1]
    try:
        cfg = json.loads(buildah.run("inspect", "--type", "container", ctr))["OCIv1"]["config"]
        assert cfg["Entrypoint"] == ["/usr/local/bin/greet"] and cfg["Cmd"] == ["world"]
        assert cfg["WorkingDir"] == "/data" and cfg["User"] == "app"
        # buildah run uses the image's USER, WORKDIR and environment
        out = buildah.run("run", "--isolation", "chroot", ctr, "--", "/usr/local/bin/greet", "world")
        assert out.strip() == GREETING
        script = (
            "stat -c '%n %u:%g %a %h' /data/hello /data/hello.hard /data/sub /data/sub/x; "
            "cat /data/hello.hard /data/new/y; readlink /data/dangling; "
            "for p in /bin/vi /home/app /data/hello.sym /data/empty; do test -e $p && echo present $p; done; "
            "true"
        )
        out = buildah.run("run", "--isolation", "chroot", "--user", "0:0", ctr, "--", "/bin/sh", "-c", script)
        assert out.splitlines() == [
            "/data/hello 0:0 4755 2",
            "/data/hello.hard 0:0 4755 2",
            "/data/sub 1000:50 750 2",
            "/data/sub/x 1000:50 644 1",
            "hello",
            "y",
            "/nonexistent",
        ], out
    finally:
        buildah.run("rm", ctr)


# -------------------------------------------------------------------------------------------------------
# a registry


def test_skopeo_reads_what_rbuild_pushed_to_a_registry(rb: Runner, exports: Exports, registry: str) -> None:
    dfile = os.path.join(exports.out, "registry-digest")
    ref = f"{registry}/interop/image:1"
    rb.run(
        "push",
        "--tls-verify=false",
        "--digestfile",
        dfile,
        "--compression-format",
        "gzip",
        "localhost/interop:1",
        f"docker://{ref}",
    )
    with open(dfile) as f:
        digest = f.read().strip()
    info = json.loads(skopeo(rb, "inspect", "--tls-verify=false", f"docker://{ref}"))
    assert info["Digest"] == digest == exports.digest  # the same manifest as in the OCI layout
    dest = os.path.join(exports.out, "from-registry")
    skopeo(rb, "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}:pulled")
    pulled = load(dest, "pulled")
    assert pulled.config == exports.image.config
    assert diff_trees(exports.tree, flatten(pulled.layers), ("rbuild", "registry")) == []
