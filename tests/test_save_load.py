"""`rbuild history`, `rbuild save` and `rbuild load`, as the unprivileged users; archives of skopeo and buildah."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shlex
import subprocess
import tarfile

import pytest
from test_differential import buildah_session

CF = """FROM oci:{busybox}
ENV GREETING=hello
RUN mkdir -p /srv && head -c 5000 /dev/zero > /srv/zeros && chown 1000:1000 /srv/zeros
LABEL purpose="a label that is long enough to be cut short in the table"
RUN echo second > /srv/second
"""


@pytest.fixture(scope="module")
def image(rb, busybox: str) -> str:
    return rb.build(rb.context({"Containerfile": CF.format(busybox=busybox)}), "-t", "saveload:1")


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_history_table(rb, image: str) -> None:
    lines = rb.run("history", "saveload:1").stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    rows = lines[1:]
    assert rows[0].startswith(image[7:19]) and all(r.startswith("<missing>") for r in rows[1:])
    assert "echo second" in rows[0]  # newest first
    label = next(r for r in rows if "LABEL" in r)
    assert "…" in label and "0B" in label
    zeros = next(r for r in rows if "head -c" in r)
    assert "kB" in zeros  # the RUN's layer has its size
    full = rb.run("history", "--no-trunc", "saveload:1").stdout
    assert "a label that is long enough to be cut short in the table" in full and image in full
    assert rb.run("history", "-q", "saveload:1").stdout.strip() == image[7:19]


def test_history_json(rb, image: str) -> None:
    docs = [json.loads(ln) for ln in rb.run("history", "--format", "json", "saveload:1").stdout.splitlines()]
    assert set(docs[0]) == {"ID", "CreatedAt", "CreatedSince", "CreatedBy", "Size", "Comment"}
    assert docs[-1]["CreatedBy"] == "test layer"  # the busybox layout's own history, oldest last
    assert rb.run("history", "nosuch:1", check=False).stderr.strip() == "Error: nosuch:1: image not known"


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_save_load_round_trip(rb, image: str, fmt: str) -> None:
    d = rb.mkdir()
    first = os.path.join(d, "first.tar")
    rb.run("save", "--format", fmt, "-o", first, "saveload:1")
    other = rb.fresh_root()
    out = rb.run("load", "-i", first, root=other).stdout
    assert out.strip() == "Loaded image: localhost/saveload:1"
    info = json.loads(rb.run("inspect", "saveload:1", root=other).stdout)[0]
    assert info["Id"] == image
    # saved again from the second store: the same bytes (the same digests, the same layer tars)
    second = os.path.join(d, "second.tar")
    rb.run("save", "--format", fmt, "-o", second, "saveload:1", root=other)
    assert _sha(first) == _sha(second)
    # skopeo reads the archive (checking every digest) and finds the same config
    transport = fmt if fmt == "docker-archive" else "oci-archive"
    config = json.loads(rb.sh(shlex.join(["skopeo", "inspect", "--config", f"{transport}:{first}"])).stdout)
    assert config["rootfs"]["diff_ids"] == json.loads(rb.run("inspect", "saveload:1").stdout)[0]["RootFS"]["Layers"]
    copied = os.path.join(d, "copied")
    keep = ["--format", "v2s2"] if fmt == "docker-archive" else []  # converting, skopeo rewrites the config
    rb.sh(shlex.join(["skopeo", "copy", "-q", *keep, f"{transport}:{first}", f"oci:{copied}:x"]))
    assert rb.run("pull", f"oci:{copied}:x", root=rb.fresh_root()).stdout.strip() == image
    # the loaded image builds on and runs
    ctx = rb.context({"Containerfile": "FROM saveload:1\nRUN test -s /srv/zeros && cat /srv/second\n"})
    rb.build(ctx, root=other)


def test_save_load_single_uid(rb_single, busybox: str) -> None:
    """Without a range owners live in rbuild's records: the archive has them, and a load gives them back."""
    r = rb_single
    image_id = r.build(r.context({"Containerfile": CF.format(busybox=busybox)}), "-t", "saveload:single")
    path = os.path.join(r.mkdir(), "single.tar")
    r.run("save", "-o", path, "saveload:single")
    with tarfile.open(path) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        layer = tarfile.open(fileobj=tf.extractfile(manifest[0]["Layers"][1]))
        zeros = layer.getmember("srv/zeros")
        assert (zeros.uid, zeros.gid) == (1000, 1000)
    other = r.fresh_root()
    r.run("load", "-i", path, root=other)
    assert json.loads(r.run("inspect", "saveload:single", root=other).stdout)[0]["Id"] == image_id
    ctx = r.context({"Containerfile": 'FROM saveload:single\nRUN test "$(stat -c %u /srv/zeros)" = 1000\n'})
    r.build(ctx, root=other)


def test_save_to_stdout_and_load_gzip_from_stdin(rb, image: str) -> None:
    res = subprocess.run(
        rb._prefix() + [rb.bin, "save", "saveload:1"], env=rb._env(None), cwd=rb.base, capture_output=True, check=True
    )
    with tarfile.open(fileobj=__import__("io").BytesIO(res.stdout)) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == ["localhost/saveload:1"]
        assert "repositories" in tf.getnames()
    other = rb.fresh_root()
    loaded = rb.run("load", "-q", input=gzip.compress(res.stdout), root=other)
    assert loaded.stdout.decode().strip() == image


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_save_several_and_by_id(rb, image: str, busybox: str, fmt: str) -> None:
    base = rb.run("pull", f"oci:{busybox}").stdout.strip()
    rb.run("tag", base, "bb:saved")
    path = os.path.join(rb.mkdir(), "two.tar")
    rb.run("save", "--format", fmt, "-o", path, "saveload:1", "bb:saved", image[7:19])
    other = rb.fresh_root()
    out = rb.run("load", "-i", path, root=other).stdout.splitlines()
    assert sorted(out) == ["Loaded image: localhost/bb:saved", "Loaded image: localhost/saveload:1"]
    ids = {json.loads(rb.run("inspect", n, root=other).stdout)[0]["Id"] for n in ("bb:saved", "saveload:1")}
    assert ids == {base, image}


def test_load_skopeo_docker_archive(rb, busybox: str) -> None:
    path = os.path.join(rb.mkdir(), "skopeo.tar")
    rb.sh(shlex.join(["skopeo", "copy", "-q", f"oci:{busybox}:latest", f"docker-archive:{path}:example.com/sk:v1"]))
    other = rb.fresh_root()
    assert rb.run("load", "-i", path, root=other).stdout.strip() == "Loaded image: example.com/sk:v1"
    pulled = json.loads(rb.run("inspect", "example.com/sk:v1", root=other).stdout)[0]
    with open(os.path.join(busybox, "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(busybox, "blobs", "sha256", manifest_digest[7:])) as f:
        config_digest = json.load(f)["config"]["digest"]
    assert pulled["Id"] == config_digest  # the same config: the same image
    rb.run("run", "example.com/sk:v1", "true", root=other)


def test_load_buildah_docker_archive(rb, busybox: str) -> None:
    with buildah_session(rb, "buildah-saveload") as b:
        name = b.import_layout(busybox, "localhost/bh")
        path = os.path.join(b.dir, "pushed.tar")
        b.push(name, f"docker-archive:{path}:localhost/bh:pushed")
        other = rb.fresh_root()
        out = rb.run("load", "-i", path, root=other).stdout.splitlines()
        assert "Loaded image: localhost/bh:pushed" in out  # buildah lists the image's own name too
        ctx = rb.context({"Containerfile": "FROM localhost/bh:pushed\nRUN busybox true\n"})
        rb.build(ctx, root=other)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"not an archive at all", "not a tar archive"),
        (gzip.compress(b"junk", mtime=0), "not a tar archive"),
    ],
    ids=["junk", "gzip-junk"],
)
def test_load_bad_input_is_one_line(rb, content: bytes, message: str) -> None:
    path = rb.write(os.path.join(rb.mkdir(), "bad.tar"), content)
    res = rb.run("load", "-i", path, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 125 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_load_archive_without_manifest(rb) -> None:
    d = rb.mkdir()
    path = os.path.join(d, "empty.tar")
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("hello")
        tf.addfile(info)
    rb.own(d)
    res = rb.run("load", "-i", path, check=False)
    assert res.returncode == 125
    assert (
        res.stderr.strip() == f"Error: {path}: neither a docker-archive (manifest.json) nor an oci-archive (index.json)"
    )


def test_save_and_load_refuse_a_terminal(rb) -> None:
    """An archive is never written to, or read from, a terminal."""
    import pty

    master, slave = pty.openpty()
    try:
        for args, message in (
            (["save", "saveload:1"], "Error: save: refusing to write an archive to a terminal"),
            (["load"], "Error: load: standard input is a terminal"),
        ):
            res = subprocess.run(
                rb._prefix() + [rb.bin, *args], stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=rb._env(None)
            )
            assert res.returncode == 125 and res.stderr.decode().startswith(message)
    finally:
        os.close(master)
        os.close(slave)
