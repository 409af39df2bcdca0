"""`rbuild build --output` (local, tar, oci, docker) and `--metadata-file`, as the unprivileged users."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import pytest

CF = """FROM oci:{busybox}
RUN mkdir -p /home/app/data && echo hi > /home/app/data/x && chown -R 1000:50 /home/app/data \\
 && echo secret > /root/key && chmod 600 /root/key && ln -s data/x /home/app/link \\
 && echo gone > /tmp/gone
RUN rm /tmp/gone && chown -h 1000:1000 /home/app/link
CMD ["sh"]
"""


def _ctx(r, busybox: str) -> str:
    return r.context({"Containerfile": CF.format(busybox=busybox)})


def _subid_start(name: str) -> int:
    with open("/etc/subuid") as f:
        for line in f:
            n, start, _ = line.strip().split(":")
            if n == name:
                return int(start)
    raise AssertionError("no range")


def test_local_keeps_owners_with_a_range(rb, busybox: str) -> None:
    ctx = _ctx(rb, busybox)
    dest = os.path.join(rb.mkdir(), "rootfs")
    res = rb.run("build", "--output", f"type=local,dest={dest}", ctx)
    assert res.stdout.strip().startswith("sha256:")
    assert "rbuild unshare" in res.stderr
    # inside the namespace: the image's owners
    seen = rb.run("unshare", "stat", "-c", "%u:%g %a %n", f"{dest}/home/app/data/x", f"{dest}/root/key").stdout
    assert f"1000:50 644 {dest}/home/app/data/x" in seen
    assert f"0:0 600 {dest}/root/key" in seen
    link = rb.run("unshare", "stat", "-c", "%u:%g", f"{dest}/home/app/link").stdout.strip()
    assert link == "1000:1000"
    assert not os.path.lexists(f"{dest}/tmp/gone")
    # on the host: root's files are the user's, the rest subordinate ids
    assert os.stat(f"{dest}/root/key").st_uid == rb.uid
    assert os.stat(f"{dest}/home/app/data/x").st_uid == _subid_start(rb.name) + 999
    # no rbuild records left in the tree
    assert not [n for n in os.listxattr(f"{dest}/home/app") if n.startswith("user.rbuild")]
    # a file system image of it, made by the user, has the image's owners
    img = os.path.join(rb.mkdir(), "disk.img")
    rb.run("unshare", "mkfs.ext4", "-q", "-d", dest, img, "16M")
    stat = subprocess.run(
        ["debugfs", "-R", "stat /home/app/data/x", img], capture_output=True, text=True, check=True
    ).stdout
    assert "User:  1000" in stat and "Group:    50" in stat
    # an export into a non-empty directory is refused with one line
    again = rb.run("build", "-q", "--output", f"type=local,dest={dest}", ctx, check=False)
    assert again.returncode == 125
    assert again.stderr.strip().splitlines()[-1].startswith("Error: --output type=local:")
    rb.run("unshare", "rm", "-rf", dest)


def test_local_without_a_range_is_the_users_own(rb_single, busybox: str) -> None:
    r = rb_single
    dest = os.path.join(r.mkdir(), "rootfs")
    res = r.run("build", "-q", "--output", dest, _ctx(r, busybox))
    assert "every file belongs to you" in res.stderr
    for path in ("home/app/data/x", "root/key", "bin/busybox"):
        assert os.lstat(f"{dest}/{path}").st_uid == r.uid
    assert not [n for n in os.listxattr(f"{dest}/home/app/data/x") if n.startswith("user.rbuild")]
    img = os.path.join(r.mkdir(), "disk.img")
    r.sh(f"mkfs.ext4 -q -d {dest} {img} 16M")
    assert os.path.getsize(img) > 0


@pytest.mark.parametrize("who", ["rb", "rb_single"])
def test_tar_keeps_every_owner(who: str, request: pytest.FixtureRequest, busybox: str) -> None:
    r = request.getfixturevalue(who)
    out = os.path.join(r.mkdir(), "rootfs.tar")
    r.run("build", "-q", "--output", f"type=tar,dest={out}", _ctx(r, busybox))
    with tarfile.open(out) as tf:
        members = {m.name.rstrip("/"): m for m in tf}
    assert (members["home/app/data/x"].uid, members["home/app/data/x"].gid) == (1000, 50)
    assert members["home/app/link"].issym() and members["home/app/link"].uid == 1000
    assert members["root/key"].mode == 0o600 and members["root/key"].uid == 0
    assert "tmp/gone" not in members
    assert not [n for n in members if ".wh." in n]


def test_tar_to_stdout(rb, busybox: str) -> None:
    res = subprocess.run(
        rb._prefix() + [rb.bin, "build", "-q", "-o", "-", _ctx(rb, busybox)],
        cwd=rb.base,
        env=rb._env(None),
        capture_output=True,
        check=True,
    )
    with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tf:
        assert "bin/busybox" in tf.getnames()
    assert b"sha256:" in res.stderr  # the image id goes to stderr when stdout is the tar


def test_oci_and_docker_archives_and_metadata(rb, busybox: str) -> None:
    d = rb.mkdir()
    meta = os.path.join(d, "meta.json")
    oci, docker = os.path.join(d, "img.oci.tar"), os.path.join(d, "img.docker.tar")
    image_id = rb.build(
        _ctx(rb, busybox),
        "-t",
        "outs:1",
        "--output",
        f"type=oci,dest={oci},name=example.com/outs:2",
        "--output",
        f"type=docker,dest={docker}",
        "--metadata-file",
        meta,
    )
    doc = json.load(open(meta))
    assert doc["containerimage.config.digest"] == image_id
    assert doc["image.name"] == "localhost/outs:1"
    with tarfile.open(oci) as tf:
        index = json.load(tf.extractfile("index.json"))
    ann = index["manifests"][0]["annotations"]
    assert ann == {"io.containerd.image.name": "example.com/outs:2", "org.opencontainers.image.ref.name": "2"}
    assert doc["containerimage.digest"] == index["manifests"][0]["digest"]
    with tarfile.open(docker) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == ["localhost/outs:1"]
    assert rb.run("images", "--format", "json").stdout.count(image_id) == 1  # -t and --output: both
    # both archives read back as the same image
    other = rb.fresh_root()
    assert rb.run("pull", f"oci-archive:{oci}", root=other).stdout.strip() == image_id
    assert rb.run("load", "-i", docker, root=other).stdout.strip().endswith("localhost/outs:1")


def test_metadata_without_outputs(rb, busybox: str) -> None:
    meta = os.path.join(rb.mkdir(), "m.json")
    image_id = rb.build(rb.context({"Containerfile": f"FROM oci:{busybox}\nENV A=1\n"}), "--metadata-file", meta)
    doc = json.load(open(meta))
    assert doc["containerimage.config.digest"] == image_id
    assert doc["containerimage.descriptor"]["digest"] == doc["containerimage.digest"]
    assert "image.name" not in doc


@pytest.mark.parametrize(
    "spec,message",
    [
        ("type=zip,dest=x", "unknown type 'zip'"),
        ("type=local", "dest= is missing"),
        ("type=tar,dest=x,compression=gzip", "unknown key 'compression'"),
        ("type=local,dest=-", "type=local needs a directory"),
        ("type=tar,dest=x,name=y", "name= is for type=oci"),
    ],
)
def test_bad_output_is_one_line(rb, spec: str, message: str) -> None:
    res = rb.run("build", "--output", spec, rb.context({"Containerfile": "FROM scratch\n"}), check=False)
    assert res.returncode == 125
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: --output {spec!r}: ") and message in lines[0]


def test_notes_are_events(rb_single, busybox: str) -> None:
    """With --progress=json every line on stderr is an event, the owners' note a warning among them."""
    r = rb_single
    dest = os.path.join(r.mkdir(), "rootfs")
    res = r.run("build", "--progress", "json", "-o", dest, _ctx(r, busybox))
    events = [json.loads(line) for line in res.stderr.splitlines()]
    warnings = [e["text"] for e in events if e["type"] == "warning"]
    assert any("every file belongs to you" in w for w in warnings)


def test_tar_to_a_terminal_is_refused(rb) -> None:
    import pty

    master, slave = pty.openpty()
    try:
        ctx = rb.context({"Containerfile": "FROM scratch\n"})
        res = subprocess.run(
            rb._prefix() + [rb.bin, "build", "-o", "-", ctx], stdout=slave, stderr=subprocess.PIPE, env=rb._env(None)
        )
        assert res.returncode == 125
        assert (
            res.stderr.decode().strip()
            == "Error: --output: refusing to write a tar to a terminal (redirect standard output)"
        )
    finally:
        os.close(master)
        os.close(slave)
