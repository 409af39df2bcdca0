"""Instructions mean what they mean in BuildKit (issue 18, "Known gaps"): expected-result tests.

Where buildah 1.28 accepts a case and follows BuildKit, the case is a differential one instead
(tests/differential/); these are the rest. Each expectation names the BuildKit code it follows, as of
moby/buildkit 73ed6825c4b7569379ef89df0aedcdbe64473d31 (its vendored tonistiigi/fsutil and
tonistiigi/dchapes-mode included), as FILE:LINE.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile

import pytest
from conftest import Runner, busybox_layer, write_oci_layout
from ocitree import Entry, Image, flatten, load

FSUTIL = "vendor/github.com/tonistiigi/fsutil"


def cf(busybox: str, body: str) -> str:
    return f"FROM oci:{busybox}\n{body}"


def built(rb: Runner, ctx: str, tag: str) -> tuple[Image, dict[str, Entry]]:
    """Build ctx as tag; the image as pushed to an OCI layout, and its merged tree."""
    rb.build(ctx, "-t", tag)
    out = rb.mkdir()
    rb.run("push", tag, f"oci:{out}/l:latest")
    image = load(f"{out}/l", "latest")
    return image, flatten(image.layers)


def failed(rb: Runner, ctx: str) -> str:
    """The one error line of a build that must fail (exit 125, no traceback)."""
    res = rb.run("build", "-q", "--no-cache", ctx, check=False)
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.stderr and "Error:" not in lines[0][7:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# COPY --chmod


def test_copy_chmod_symbolic(rb: Runner, busybox: str) -> None:
    """frontend/dockerfile/dockerfile2llb/convert_copy.go:66-84 takes a non-octal --chmod as a mode string
    (dchapes-mode, umask 0: fsutil copy/copy.go:96-103), applied to each copied entry's own mode
    (copy/copy_linux.go:31-33); X adds execute to a directory or to a file with an execute bit already
    (dchapes-mode/mode.go:372-375). Directories made on the way get 0755 (copy/copy.go:85-89, 169-173)."""
    ctx = rb.context(
        {
            "Containerfile": cf(
                busybox,
                "COPY --chmod=u=rwX,go=rX plain tool /out/\n"
                "COPY --chmod=u=rwX,go=rX d /new/d/\n"
                "COPY --chmod=go-w,u+x plain /minus\n"
                "COPY --chmod=a=r <<EOF /heredoc\nhi\nEOF\n",
            ),
            "plain": "p\n",
            "tool": "t\n",
            "d/f": "f\n",
            "d/x": "x\n",
            "d/sub/g": "g\n",
        }
    )
    for rel, mode in (("plain", 0o666), ("tool", 0o700), ("d", 0o700), ("d/f", 0o600), ("d/x", 0o744)):
        os.chmod(os.path.join(ctx, rel), mode)
    os.chmod(os.path.join(ctx, "d/sub"), 0o700)
    _, tree = built(rb, ctx, "chmod-symbolic")
    modes = {p: tree[p].mode for p in ("/out/plain", "/out/tool", "/new", "/new/d", "/new/d/f", "/new/d/x")}
    assert modes == {
        "/out/plain": 0o644,
        "/out/tool": 0o755,
        "/new": 0o755,
        "/new/d": 0o755,
        "/new/d/f": 0o644,
        "/new/d/x": 0o755,
    }
    assert tree["/new/d/sub"].mode == 0o755 and tree["/new/d/sub/g"].mode == 0o644
    assert tree["/minus"].mode == 0o744  # 0666, go-w -> 0644, u+x -> 0744
    assert tree["/heredoc"].mode == 0o444


@pytest.mark.parametrize("mode", ["u=rwZ", "0o755", "8", "u=r,", "x+r"])
def test_copy_chmod_invalid_is_one_error(rb: Runner, busybox: str, mode: str) -> None:
    """convert_copy.go:68-81: not octal and not a mode string is an error."""
    ctx = rb.context({"Containerfile": cf(busybox, f"COPY --chmod={mode} f /f\n"), "f": "f"})
    line = failed(rb, ctx)
    assert "Containerfile:2:" in line and f"invalid --chmod value {mode!r}" in line


def test_copy_chmod_octal_makes_parents_with_that_mode(rb: Runner, busybox: str) -> None:
    """fsutil copy/copy.go:85-89 (and 169-173): the directories COPY creates on the way take an octal
    --chmod as their mode (fsutil#228 for moby/buildkit#4945; MkdirAll: copy/mkdir.go:49-68)."""
    ctx = rb.context({"Containerfile": cf(busybox, "COPY --chmod=0750 f /a/b/f\nRUN ls /a/b/f\n"), "f": "f"})
    _, tree = built(rb, ctx, "chmod-parents")
    assert (tree["/a"].mode, tree["/a/b"].mode, tree["/a/b/f"].mode) == (0o750, 0o750, 0o750)


# ---------------------------------------------------------------------------------------------------------
# COPY --chown, EXPOSE, WORKDIR, VOLUME, ONBUILD


def test_copy_chown_name_takes_primary_group(rb: Runner, busybox: str) -> None:
    """solver/llbsolver/ops/user_linux.go:64-66: a user name takes uid and gid from the stage's /etc/passwd;
    :69-70: a uid alone is the gid too."""
    body = (
        "RUN echo 'svc:x:1001:50:svc:/:/bin/sh' >> /etc/passwd\n"
        "COPY --chown=svc f /by-name\nCOPY --chown=1001 f /by-id\nCOPY --chown=svc:app f /by-both\n"
    )
    ctx = rb.context({"Containerfile": cf(busybox, body), "f": "f"})
    _, tree = built(rb, ctx, "chown-name")
    assert (tree["/by-name"].uid, tree["/by-name"].gid) == (1001, 50)
    assert (tree["/by-id"].uid, tree["/by-id"].gid) == (1001, 1001)
    assert (tree["/by-both"].uid, tree["/by-both"].gid) == (1001, 1000)


def test_expose_protocol_in_lower_case(rb: Runner, busybox: str) -> None:
    """dockerfile2llb/convert_expose.go:143: each port is recorded as PORT/strings.ToLower(proto)."""
    ctx = rb.context({"Containerfile": cf(busybox, "EXPOSE 443/TCP 53/Udp 80\n")})
    image, _ = built(rb, ctx, "expose-case")
    assert image.runtime_config["ExposedPorts"] == {"443/tcp": {}, "53/udp": {}, "80/tcp": {}}


def test_workdir_made_at_once_and_kept_as_written(rb: Runner, busybox: str) -> None:
    """dockerfile2llb/convert.go:1540-1560: WORKDIR makes its directory (llb.Mkdir 0755 with parents, owned
    by USER) whatever follows; util/system/path.go:68-71 (NormalizeWorkdir): an absolute path is kept as
    written, a relative one joined to the current WORKDIR (path.Join, so cleaned)."""
    ctx = rb.context(
        {"Containerfile": cf(busybox, "USER app\nWORKDIR /srv/app/data/\nUSER root\nWORKDIR /var/lib/etcd/\n")}
    )
    image, tree = built(rb, ctx, "workdir-last")
    assert image.runtime_config["WorkingDir"] == "/var/lib/etcd/"
    assert tree["/var/lib/etcd"].type == "dir" and tree["/var/lib/etcd"].mode == 0o755
    for path in ("/srv", "/srv/app", "/srv/app/data"):
        assert (tree[path].uid, tree[path].gid, tree[path].mode) == (1000, 1000, 0o755), path
    history = image.config["history"]
    assert not history[-1].get("empty_layer") and history[-1]["created_by"] == "WORKDIR /var/lib/etcd/"
    ctx = rb.context({"Containerfile": cf(busybox, "WORKDIR /var/lib/etcd/\nWORKDIR sub/./x/\nRUN pwd > /pwd\n")})
    image, tree = built(rb, ctx, "workdir-rel")
    assert image.runtime_config["WorkingDir"] == "/var/lib/etcd/sub/x"
    assert tree["/var/lib/etcd/sub/x"].type == "dir"


def test_volume_is_metadata_only(rb: Runner, busybox: str) -> None:
    """dockerfile2llb/convert.go:1649-1660: VOLUME only records the path in the config; no later step makes
    the directory, so it has no owner to give (docker's classic builder and buildah make mount points)."""
    body = "VOLUME /data /var/cache/app\nUSER app\nRUN touch /tmp/ran\nUSER root\nCOPY f /etc/f\n"
    ctx = rb.context({"Containerfile": cf(busybox, body), "f": "f"})
    image, tree = built(rb, ctx, "volume-meta")
    assert image.runtime_config["Volumes"] == {"/data": {}, "/var/cache/app": {}}
    assert "/data" not in tree and "/var/cache" not in tree and "/tmp/ran" in tree


@pytest.mark.parametrize("trigger", ["ONBUILD RUN true", "onbuild RUN true"])
def test_onbuild_onbuild_rejected(rb: Runner, busybox: str, trigger: str) -> None:
    """frontend/dockerfile/instructions/parse.go:447: docker's message."""
    ctx = rb.context({"Containerfile": cf(busybox, f"ONBUILD {trigger}\n")})
    line = failed(rb, ctx)
    assert "Containerfile:2:" in line and "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed" in line


# ---------------------------------------------------------------------------------------------------------
# .dockerignore allow-lists, directory modes, symlinks in the way


def test_dockerignore_allow_list_keeps_parent_dirs(rb: Runner, busybox: str) -> None:
    """fsutil filter.go:336-368 (the context sent to BuildKit): the parent directories of a re-included path
    are sent, with their own stat, before it; nothing else below an excluded directory is."""
    files = {
        "Containerfile": cf(busybox, "COPY dir /x/\nCOPY . /all/\n"),
        ".dockerignore": "*\n!dir/sub/file\n",
        "dir/sub/file": "kept\n",
        "dir/sub/other": "no\n",
        "dir/top": "no\n",
        "else": "no\n",
    }
    ctx = rb.context(files)
    os.chmod(os.path.join(ctx, "dir"), 0o750)
    os.chmod(os.path.join(ctx, "dir/sub"), 0o700)
    _, tree = built(rb, ctx, "allow-list")
    assert sorted(p for p in tree if p.startswith(("/x", "/all"))) == [
        "/all",
        "/all/dir",
        "/all/dir/sub",
        "/all/dir/sub/file",
        "/x",
        "/x/sub",
        "/x/sub/file",
    ]
    assert (tree["/all/dir"].mode, tree["/all/dir/sub"].mode, tree["/x/sub"].mode) == (0o750, 0o700, 0o700)
    assert tree["/x"].mode == 0o755  # made by COPY (copy/copy.go:165-173), not copied
    # a path that is not re-included is still not there
    ctx = rb.context({**files, "Containerfile": cf(busybox, "COPY dir/top /t\n")})
    assert "dir/top: no such file or directory in the build context" in failed(rb, ctx)
    # and through a symlink to the excluded directory only the re-included file is seen
    ctx = rb.context(
        {
            **files,
            "Containerfile": cf(
                busybox,
                "COPY link/ /y/\n"
                "RUN --mount=type=bind,source=link,target=/s test ! -e /s/sub/other && cat /s/sub/file > /seen\n",
            ),
            ".dockerignore": "dir\n!dir/sub/file\n",
        }
    )
    os.symlink("dir", os.path.join(ctx, "link"))
    os.lchown(os.path.join(ctx, "link"), rb.uid, rb.gid)
    _, tree = built(rb, ctx, "allow-list-link")
    assert sorted(p for p in tree if p.startswith("/y")) == ["/y", "/y/sub", "/y/sub/file"]
    assert tree["/seen"].size == len("kept\n")


def test_copy_dir_modes_umask_002_context(rb: Runner, busybox: str) -> None:
    """Copied directories keep their own mode (fsutil copy/copy.go:641-649 mkdir with the source's mode, then
    copyFileInfo); the destination COPY creates, and the directories on the way, are 0755 (copy.go:85-89,
    165-173), and an existing destination keeps its mode (copyDirectoryOnly: no chmod at the top)."""
    files = {
        "Containerfile": cf(
            busybox, "RUN mkdir -m 0700 /have\nCOPY tree /a/b/\nCOPY tree /have\nCOPY tree/d/f /c/d/\n"
        ),
        "tree/d/f": "f\n",
    }
    ctx = rb.context(files)
    for rel in ("tree", "tree/d"):
        os.chmod(os.path.join(ctx, rel), 0o775)
    os.chmod(os.path.join(ctx, "tree/d/f"), 0o664)
    _, tree = built(rb, ctx, "umask-002")
    got = {p: tree[p].mode for p in ("/a", "/a/b", "/a/b/d", "/a/b/d/f", "/have", "/have/d", "/c", "/c/d", "/c/d/f")}
    assert got == {
        "/a": 0o755,
        "/a/b": 0o755,
        "/a/b/d": 0o775,
        "/a/b/d/f": 0o664,
        "/have": 0o700,
        "/have/d": 0o775,
        "/c": 0o755,
        "/c/d": 0o755,
        "/c/d/f": 0o664,
    }


def test_copy_dir_onto_symlink(rb: Runner, busybox: str) -> None:
    """The destination itself is resolved inside the image, symlinks followed (fsutil copy/copy.go:105,
    fs.RootPath); a directory below it that the image has as a symlink is an error, BuildKit's "cannot copy
    to non-directory" (copy.go:641-651 copyDirectoryOnly; moby/moby#47367)."""
    pre = "RUN mkdir -p /usr/lib /real && ln -s usr/lib /lib && ln -s /real /lnk && ln -s /etc /abs\n"
    ctx = rb.context({"Containerfile": cf(busybox, pre + "COPY tree /lnk\nCOPY tree /abs/\n"), "tree/f": "f\n"})
    _, tree = built(rb, ctx, "onto-link")
    assert tree["/lnk"].type == "symlink" and tree["/real/f"].type == "file" and tree["/etc/f"].type == "file"
    # a directory inside the copied tree meets a symlink: /lib -> usr/lib, /abs -> /etc (never followed out)
    for sub in ("lib", "abs"):
        files = {"Containerfile": cf(busybox, pre + "COPY rootfs/ /\n"), f"rootfs/{sub}/planted": "x\n"}
        line = failed(rb, rb.context(files))
        assert "Containerfile:3: COPY" in line and f"cannot copy to non-directory: /{sub}" in line
    # and a file where the tree has a directory is the same error
    files = {"Containerfile": cf(busybox, "RUN touch /plain\nCOPY rootfs/ /\n"), "rootfs/plain/x": "x\n"}
    assert "cannot copy to non-directory: /plain" in failed(rb, rb.context(files))
    assert not os.path.exists("/etc/planted")


# ---------------------------------------------------------------------------------------------------------
# repeated layers, xattrs


def test_identical_layers_in_one_image(rb: Runner, busybox: str) -> None:
    """An image may hold the same layer twice (COPY f /f twice; COPY then a RUN that changes nothing but
    rewrites the same file): the next step still mounts it. overlayfs refuses a lower dir given twice
    ("conflicting lowerdir path", ELOOP); the store keys unpacked layers by chain id, so a repeated
    diff_id is a different directory."""
    body = "COPY f /f\nCOPY f /f\nRUN cat /f > /seen\nCOPY g /g\nRUN chmod 0644 /g\nRUN cat /g >> /seen\n"
    ctx = rb.context({"Containerfile": cf(busybox, body), "f": "f\n", "g": "g\n"})
    image, tree = built(rb, ctx, "twice")
    diff_ids = image.config["rootfs"]["diff_ids"]
    assert diff_ids[1] == diff_ids[2], "the two COPYs should make the same layer, else this proves little"
    assert tree["/seen"].size == len("f\ng\n")


def test_pulled_image_repeating_a_layer(rb: Runner, busybox: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("again")
        ti.size, ti.mode = 3, 0o644
        tf.addfile(ti, io.BytesIO(b"hi\n"))
    layer = buf.getvalue()
    layout = rb.mkdir() + "/repeat"
    write_oci_layout(layout, [busybox_layer(), layer, layer], compress=False)
    rb.own(os.path.dirname(layout))
    ctx = rb.context({"Containerfile": f"FROM oci:{layout}\nRUN cat /again > /copy\n"})
    _, tree = built(rb, ctx, "repeat-base")
    assert tree["/copy"].size == 3


# security.capability v2 (as read inside the user namespace): cap_net_raw permitted + effective
CAP_V2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def test_copy_keeps_xattrs_and_file_capabilities(rb: Runner, busybox: str) -> None:
    """fsutil copy/copy.go:464-471: after chown and chmod every xattr is copied (copyXAttrs,
    copy_nowindows.go:15-31), for the context (COPY) as for a stage (COPY --from)."""
    body = "FROM oci:{b} AS tools\nCOPY ping /bin/ping-cap\nFROM oci:{b}\nCOPY --from=tools /bin/ping-cap /usr/bin/p\n"
    ctx = rb.context({"Containerfile": body.format(b=busybox), "ping": "binary\n"})
    path = os.path.join(ctx, "ping")
    os.chmod(path, 0o755)
    os.setxattr(path, "user.origin", b"context")
    # a capability the user namespace's root owns: v3 with rootid = the host uid that namespace root maps to
    os.setxattr(path, "security.capability", struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, rb.uid))
    image, tree = built(rb, ctx, "xattrs")
    xattrs = dict(tree["/usr/bin/p"].xattrs)
    assert xattrs.get("user.origin") == "context", tree["/usr/bin/p"]
    assert xattrs["security.capability"].encode("utf-8", "surrogateescape") == CAP_V2
    assert tree["/usr/bin/p"].mode == 0o755
