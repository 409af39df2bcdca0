"""Single uid, every owner kept (issue 12): a user without a subuid range gets the image a user with one gets.

Each case is built from the same Containerfile by `rb_single` (one mapped uid: the RUN's ownership calls
go to rbuild's seccomp supervisor, rootless/sandbox/notify.py) and by `rb` (a subuid range: the kernel does
them), pushed to an OCI layout, and the merged trees (type, mode, owner, size, content, link or device)
and configs compared.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest
from conftest import Runner
from ocitree import Image, flatten, load

pytestmark = pytest.mark.e2e

# busybox has no adduser/addgroup applets here: "busybox style" is what they do (passwd and group lines,
# a home made and chowned, a skeleton copied with cp -a) and a tar extracted by root (owners kept)
ADDUSER = (
    "echo 'svc:x:2000:2000::/home/svc:/bin/sh' >> /etc/passwd && echo 'svc:x:2000:' >> /etc/group "
    "&& mkdir -p /home/svc && echo x > /home/svc/.profile && chmod 600 /home/svc/.profile "
    "&& chown -R svc:svc /home/svc"
)
CASES = {
    "chown": "RUN mkdir /x && touch /x/f /x/g && chown 1234:5678 /x && chown 42 /x/f && chgrp 7 /x/f && chgrp 9 /x/g\n",
    "chown-R": (
        "RUN mkdir -p /t/a/b && touch /t/a/f /t/a/b/g && ln -s f /t/a/l && mkfifo /t/a/p "
        "&& chown -R 1000:1000 /t && chown -h 5:6 /t/a/l && chmod 4755 /t/a/f\n"
    ),
    "chown-base": "RUN chown 77:88 /bin /etc/passwd && chown -h 9:9 /bin/sh && chown 0:0 /home/app\n",
    "adduser": f"RUN {ADDUSER} && cp -a /home/svc /home/copy && mkdir /data && chown svc /data\n",
    "tar": "COPY t.tar /t.tar\nRUN mkdir /out && tar -xpf /t.tar -C /out && rm /t.tar\n",
    "user-app": (
        f"RUN {ADDUSER}\n"
        "USER svc\n"
        "RUN id > /tmp/id.txt && touch /tmp/made && mkdir /tmp/dir && ln -s made /tmp/link "
        "&& (chown 0 /tmp/made 2>/dev/null; echo $? > /tmp/chown-rc) && chgrp svc /tmp/dir && echo ~ > /tmp/home\n"
        "USER root\n"
        "RUN cp /tmp/id.txt /id.txt\n"
    ),
    "ls-later": "RUN touch /o && chown 4:5 /o\nRUN ls -ln /o | cut -c1-10 > /ls.txt && find / -xdev -user 4 > /found\n",
}


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, uid, gid in (("d", tarfile.DIRTYPE, 11, 12), ("d/f", tarfile.REGTYPE, 13, 14)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.uid, ti.gid, ti.mode, ti.mtime = kind, uid, gid, 0o750, 1700000000
            tf.addfile(ti, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
        ti = tarfile.TarInfo("d/l")
        ti.type, ti.linkname, ti.uid, ti.gid, ti.mtime = tarfile.SYMTYPE, "f", 15, 16, 1700000000
        tf.addfile(ti)
    return buf.getvalue()


def _image(rb: Runner, busybox: str, body: str, tag: str) -> Image:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n{body}", "t.tar": _tar()})
    rb.build(ctx, "-t", tag, "--no-cache")
    out = rb.mkdir()
    rb.run("push", tag, f"oci:{out}/l")
    return load(f"{out}/l")


def _both(rb: Runner, rb_single: Runner, busybox: str, name: str, body: str) -> tuple[Image, Image]:
    return _image(rb, busybox, body, f"su-{name}"), _image(rb_single, busybox, body, f"su-{name}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_image_with_and_without_a_range(rb: Runner, rb_single: Runner, busybox: str, name: str) -> None:
    sub, single = _both(rb, rb_single, busybox, name, CASES[name])
    want, got = flatten(sub.layers), flatten(single.layers)
    diff = {p: (str(want.get(p)), str(got.get(p))) for p in want.keys() | got.keys() if want.get(p) != got.get(p)}
    assert not diff, diff
    assert sub.runtime_config == single.runtime_config


def test_records_where_the_subuid_build_has_owners(rb_single: Runner, busybox: str) -> None:
    """The single-uid image itself holds the owners asked for, and the devices a subuid build cannot make."""
    body = CASES["chown"] + "RUN mknod /dev0 c 1 3 && mknod -m 600 /blk b 8 1 && chown 3:4 /dev0 && mkfifo /fifo\n"
    img = _image(rb_single, busybox, body, "su-own")
    tree = flatten(img.layers)
    assert (tree["/x"].uid, tree["/x"].gid) == (1234, 5678)
    assert (tree["/x/f"].uid, tree["/x/f"].gid) == (42, 7)
    assert (tree["/x/g"].uid, tree["/x/g"].gid) == (0, 9)
    assert tree["/dev0"].type == "char" and tree["/dev0"].link == "c:1:3" and tree["/dev0"].uid == 3
    assert tree["/blk"].type == "block" and tree["/blk"].mode == 0o600 and tree["/blk"].link.endswith(":8:1")
    assert tree["/fifo"].type == "fifo"


def test_user_app_sees_itself_and_owns_what_it_makes(rb_single: Runner, busybox: str) -> None:
    img = _image(rb_single, busybox, CASES["user-app"], "su-app")
    tree = flatten(img.layers)
    for path in ("/tmp/made", "/tmp/dir", "/tmp/link", "/tmp/id.txt"):
        assert (tree[path].uid, tree[path].gid) == (2000, 2000), (path, str(tree[path]))
    assert (tree["/id.txt"].uid, tree["/id.txt"].gid) == (0, 0)
    files = {n: f for n, f in _files(img).items()}
    assert files["tmp/id.txt"].startswith(b"uid=2000(svc) gid=2000(svc)"), files["tmp/id.txt"]
    assert files["tmp/chown-rc"] == b"1\n" and files["tmp/home"] == b"/home/svc\n"


def test_setxattr_refused_in_the_sandbox(rb_single: Runner, busybox: str, tmp_path: os.PathLike[str]) -> None:
    """A static program's setxattr("user.rbuild.stat") in a RUN is not carried out (as a subuid build's
    commit drops it), and the file stays 0:0, also to stat in a later step."""
    cc = subprocess.run(["sh", "-c", "command -v gcc || command -v cc"], capture_output=True, text=True).stdout.strip()
    if not cc:
        pytest.skip("no C compiler to build the static test program")
    ctx = rb_single.context(
        {"Containerfile": f"FROM oci:{busybox}\nCOPY forge /forge\nRUN /forge /f > /rc\nRUN ls -ln /f > /ls\n"}
    )
    src = os.path.join(ctx, "forge.c")
    with open(src, "w") as f:
        f.write(
            "#include <sys/xattr.h>\n#include <stdio.h>\n#include <errno.h>\n#include <fcntl.h>\n#include <unistd.h>\n"
            "int main(int c, char **v) { close(open(v[1], O_CREAT|O_WRONLY, 0644));\n"
            ' int r = setxattr(v[1], "user.rbuild.stat", "1:1", 3, 0);\n'
            ' printf("%d %d\\n", r, r ? errno : 0); return 0; }\n'
        )
    subprocess.run([cc, "-static", "-O1", "-o", os.path.join(ctx, "forge"), src], check=True)
    rb_single.own(ctx)
    rb_single.build(ctx, "-t", "su-forge2", "--no-cache")
    out = rb_single.mkdir()
    rb_single.run("push", "su-forge2", f"oci:{out}/l")
    img = load(f"{out}/l")
    tree = flatten(img.layers)
    assert (tree["/f"].uid, tree["/f"].gid) == (0, 0)
    files = _files(img)
    assert files["rc"] == b"0 0\n" and files["ls"].split()[2:4] == [b"0", b"0"], files


def test_switching_ids_is_warned(rb_single: Runner, busybox: str) -> None:
    """What su creates cannot be followed (nor, under root, the ids it sees): the build says so, loudly."""
    ctx = rb_single.context({"Containerfile": f"FROM oci:{busybox}\nRUN su -s /bin/sh nobody -c 'touch /tmp/u'\n"})
    res = rb_single.run("build", "-q", "--no-cache", ctx)
    assert "WARNING: " in res.stderr and "Containerfile:2: RUN: su switched to uid 65534" in res.stderr, res.stderr


def _files(img: Image) -> dict[str, bytes]:
    out = {}
    for raw in img.layers:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            for m in tf.getmembers():
                f = tf.extractfile(m) if m.isreg() else None
                if f is not None:
                    out[m.name] = f.read()
    return out


def test_debian_same_image_with_and_without_a_range(rb: Runner, rb_single: Runner, debian_layout: str) -> None:
    """useradd -m, chown -R and dpkg-statoverride on Debian: the same image with and without a range."""
    body = (
        "RUN useradd -m -u 1500 app && mkdir -p /srv/data/sub && touch /srv/data/sub/f "
        "&& chown -R app:app /srv/data && dpkg-statoverride --update --add root app 4750 /usr/bin/newgrp\n"
    )
    images = []
    for runner in (rb, rb_single):
        ctx = runner.context({"Containerfile": f"FROM oci:{debian_layout}\n{body}"})
        runner.build(ctx, "-t", "su-debian", "--no-cache")
        out = runner.mkdir()
        runner.run("push", "su-debian", f"oci:{out}/l")
        images.append(load(f"{out}/l"))
    want, got = flatten(images[0].layers), flatten(images[1].layers)
    assert want["/home/app"].uid == 1500 and want["/usr/bin/newgrp"].mode == 0o4750
    diff = {p: (str(want.get(p)), str(got.get(p))) for p in want.keys() | got.keys() if want.get(p) != got.get(p)}
    assert not diff, diff
