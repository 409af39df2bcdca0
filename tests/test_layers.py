"""Layer unpack / commit: exact round trips, overlay whiteout format, records, compression.

Ownership is only ever checked as an unprivileged user inside rbuild's user namespace (`rbuild unshare`),
both for the user with a subuid range and for the single-uid user. Tests running as the test process
itself cover pure tar logic only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator

import pytest
from hostile.userns import in_userns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rootless.blob import compress
from rootless.layer import layers
from rootless.layer.layers import LayerError

# security.capability v2: cap_net_raw (bit 13) permitted+effective, as ping carries it
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


@pytest.fixture
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="rbt-layers-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def add(
    tf: tarfile.TarFile,
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_600_000_000,
    link: str = "",
    dev: tuple[int, int] = (0, 0),
    xattrs: dict[str, bytes] | None = None,
) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = kind, mode, uid, gid, mtime, link
    ti.uname = ti.gname = ""
    ti.devmajor, ti.devminor = dev
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    if xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
    tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tar(build) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        build(tf)
    return buf.getvalue()


def rich_layer(tf: tarfile.TarFile) -> None:
    """Every entry kind real images carry, with owners outside 0 and outside a 65536 subuid range."""
    D = tarfile.DIRTYPE
    add(tf, "bin", D, mode=0o755, mtime=1000)
    add(
        tf,
        "bin/ping",
        data=b"\x7fELF ping",
        mode=0o755,
        xattrs={"security.capability": CAP_NET_RAW, "user.note": b"kept"},
    )
    add(tf, "bin/su", data=b"su", mode=0o4755)
    add(tf, "bin/wall", data=b"wall", mode=0o2755, gid=5)
    add(tf, "dev", D, mode=0o755, mtime=2000)
    add(tf, "dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    add(tf, "dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(8, 0))
    add(tf, "dev/zero0", tarfile.CHRTYPE, mode=0o600, dev=(0, 0))  # a device, not a whiteout
    add(tf, "dev/fifo", tarfile.FIFOTYPE, mode=0o620, uid=1000, gid=1000)
    add(tf, "etc", D, mode=0o755, mtime=3000)
    add(tf, "etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")
    add(tf, "etc/passwd.hard", tarfile.LNKTYPE, link="etc/passwd")
    add(tf, "home", D, mode=0o755)
    add(tf, "home/app", D, mode=0o750, uid=1000, gid=1000, mtime=4000)
    add(tf, "home/app/secret", data=b"s" * 70000, mode=0o600, uid=1000, gid=1000)
    add(tf, "home/app/link", tarfile.SYMTYPE, mode=0o777, uid=1000, gid=1000, link="/etc/passwd")
    add(tf, "home/app/far", data=b"far", uid=70000, gid=3_000_000)  # beyond a 65536 range; PAX gid
    add(tf, "home/app/farlink", tarfile.SYMTYPE, mode=0o777, uid=70001, gid=70001, link="secret")
    add(tf, "home/app/.wh.gone", mode=0o600, uid=1000, gid=1000)
    add(tf, "opq", D, mode=0o711, uid=1000, gid=1000, mtime=5000)
    add(tf, "opq/.wh..wh..opq", mode=0o711, uid=1000, gid=1000, mtime=5000)
    add(tf, "opq/kept", data=b"k")
    add(tf, "tmp", D, mode=0o1777)
    deep = "p" * 60 + "/" + "q" * 60
    add(tf, "p" * 60, D, mode=0o755)
    add(tf, deep, D, mode=0o755)
    add(tf, deep + "/" + "r" * 60, data=b"deep")  # fits ustar's prefix + name
    add(tf, "long-" + "n" * 150, data=b"long")  # needs a PAX path
    add(tf, "longlink", tarfile.SYMTYPE, mode=0o777, link="/" + "t" * 200)  # PAX linkpath
    add(tf, "café", data=b"utf-8 name")
    add(tf, "sparse-ish", data=bytes(200_000) + b"end")


def entries(data: bytes) -> list[tuple]:
    """What a tar says, order-independent and encoding-independent, for comparing two tars."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            body = hashlib.sha256(f.read()).hexdigest() if f else ""
            xattrs = sorted((k, v) for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr."))
            out.append(
                (
                    ti.name,
                    ti.type,
                    ti.mode,
                    ti.uid,
                    ti.gid,
                    int(ti.mtime),
                    ti.size,
                    ti.linkname,
                    ti.devmajor if ti.ischr() or ti.isblk() else 0,
                    ti.devminor if ti.ischr() or ti.isblk() else 0,
                    xattrs,
                    body,
                )
            )
    return sorted(out)


# --------------------------------------------------------------------------------------------------------
# as an unprivileged user in rbuild's user namespace

ROUNDTRIP = r"""
import os, sys
from rootless.layer import layers
from rootless.layer.ownership import Ownership
src, work = sys.argv[1], sys.argv[2]
for i, out in ((1, "t1.tar"), (2, "t2.tar")):
    d = os.path.join(work, f"l{i}")
    os.mkdir(d)
    with open(src, "rb") as f:
        layers.unpack(f, d, ownership=Ownership.for_mapping(os.environ["SINGLE"] == "1"))
    with open(os.path.join(work, out), "wb") as f:
        layers.write_tar(d, f)
    src = os.path.join(work, out)
st = os.lstat(os.path.join(work, "l1/home/app/secret"))
print(st.st_uid, st.st_gid, oct(st.st_mode))
"""


def roundtrip(runner, data: bytes, single: bool) -> tuple[bytes, bytes, str]:  # type: ignore[no-untyped-def]
    work = runner.mkdir()
    src = runner.write(os.path.join(work, "in.tar"), data)
    runner.own(work)
    out = in_userns(runner, ROUNDTRIP, src, work, single=single)
    with open(os.path.join(work, "t1.tar"), "rb") as f1, open(os.path.join(work, "t2.tar"), "rb") as f2:
        return f1.read(), f2.read(), out


def test_roundtrip_exact_with_subuid_and_single_uid(rb, rb_single) -> None:  # type: ignore[no-untyped-def]
    data = make_tar(rich_layer)
    t1, t2, out = roundtrip(rb, data, single=False)
    assert t1 == t2, "write_tar(unpack(write_tar(x))) must give the same bytes"
    assert entries(t1) == entries(data)
    assert out.split()[:2] == ["1000", "1000"], "a mapped owner is chowned, not recorded"
    s1, s2, out_single = roundtrip(rb_single, data, single=True)
    assert s1 == s2
    assert s1 == t1, "the single-uid map must give the same layer bytes"
    assert out_single.split()[:2] == ["0", "0"]


def test_unpack_records_unmappable_owners(rb) -> None:  # type: ignore[no-untyped-def]
    script = r"""
import os, sys, tarfile
from rootless.layer import layers
from rootless.layer.ownership import Ownership
d = os.path.join(sys.argv[2], "l")
os.mkdir(d)
with open(sys.argv[1], "rb") as f:
    layers.unpack(f, d)
print(os.getxattr(d + "/home/app/far", "user.rbuild.stat").decode())
rec = os.getxattr(d + "/home/app", "user.rbuild.lstat")
print(rec == b"farlink\0" + b"70001:70001:%d\0" % os.lstat(d + "/home/app/farlink").st_ino)
print(os.getxattr(d + "/dev/null", "user.rbuild.dev").decode(), oct(os.stat(d + "/dev/null").st_mode))
print(os.getxattr(d + "/bin/ping", "security.capability").hex())
print(oct(os.stat(d + "/bin/su").st_mode), os.stat(d + "/bin/wall").st_gid)
print(os.stat(d + "/home/app/.wh.gone" if os.path.exists(d + "/home/app/.wh.gone") else d + "/home/app/gone",
              follow_symlinks=False).st_rdev, os.getxattr(d + "/opq", "user.overlay.opaque"))
"""
    work = rb.mkdir()
    src = rb.write(os.path.join(work, "in.tar"), make_tar(rich_layer))
    lines = in_userns(rb, script, src, work, single=False).splitlines()
    assert lines[0] == "70000:3000000"
    assert lines[1] == "True", "symlink owner recorded in the parent, tied to the symlink's inode"
    assert lines[2] == "c:1:3 0o100666"
    assert lines[3] == CAP_NET_RAW.hex(), "file capabilities survive"
    assert lines[4] == "0o104755 5", "setuid kept after chown; gid 5 applied"
    assert lines[5] == "0 b'y'", "whiteout is a 0:0 char device; opaque dir has the userxattr marker"


# --------------------------------------------------------------------------------------------------------
# pure tar logic (no ownership checked)


def unpack_bytes(data: bytes, dest: str, **kw) -> None:  # type: ignore[no-untyped-def]
    os.makedirs(dest, exist_ok=True)
    layers.unpack(io.BytesIO(data), dest, **kw)


def tar_of(d: str) -> bytes:
    buf = io.BytesIO()
    layers.write_tar(d, buf)
    return buf.getvalue()


def test_write_tar_hash_matches_stream_and_sorts(tmp: str) -> None:
    d = os.path.join(tmp, "l")
    os.makedirs(d + "/b/c")
    for name in ("b/z", "b/a", "a", "b-c", "b/c/x"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(name.encode() * 1000)
    os.link(d + "/b/z", d + "/a2")
    buf = io.BytesIO()
    diff_id, size = layers.write_tar(d, buf)
    data = buf.getvalue()
    assert diff_id == "sha256:" + hashlib.sha256(data).hexdigest() and size == len(data)
    assert layers.write_tar(d, None) == (diff_id, size)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["a", "a2", "b", "b/a", "b/c", "b/c/x", "b/z", "b-c"]
    assert members[6].islnk() and members[6].linkname == "a2", "the first name in order keeps the data"
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert data.endswith(bytes(1024)) and len(data) % 512 == 0


def test_header_formats() -> None:
    h = layers._header(b"x" * 60 + b"/" + b"y" * 90, 0o644, 0, 0, 5, 10, b"0")
    assert len(h) == 512 and h[345:405] == b"x" * 60, "ustar prefix split, no PAX"
    h = layers._header(b"n" * 150, 0o644, 2**22, 0, 2**34, -5, b"0", b"l" * 101, xattrs=[(b"user.a", b"\0\1")])
    with tarfile.open(fileobj=io.BytesIO(h + bytes(2**34 % 512 and 0) + bytes(1024)), mode="r:") as tf:
        ti = tf.next()
    assert ti is not None
    assert (ti.name, ti.uid, ti.size, ti.mtime, ti.linkname) == ("n" * 150, 2**22, 2**34, -5, "l" * 101)
    assert ti.pax_headers["SCHILY.xattr.user.a"] == "\0\1"


def test_same_layer_whiteout_never_removes_what_the_layer_adds(tmp: str) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add(tf, "keep", data=b"1")
        add(tf, ".wh.keep")
        add(tf, ".wh.dir")
        add(tf, "dir", tarfile.DIRTYPE, mode=0o755)
        add(tf, "dir/new", data=b"2")
        add(tf, "dir2", tarfile.DIRTYPE, mode=0o755)
        add(tf, ".wh.dir2")
        add(tf, ".wh.gone")

    d = os.path.join(tmp, "l")
    unpack_bytes(make_tar(build), d)
    assert open(d + "/keep", "rb").read() == b"1"
    assert os.getxattr(d + "/dir", "user.overlay.opaque") == b"y", "re-added dir hides the lower one"
    assert os.getxattr(d + "/dir2", "user.overlay.opaque") == b"y"
    assert os.listdir(d + "/dir") == ["new"]
    assert os.lstat(d + "/gone").st_rdev == 0 and stat.S_ISCHR(os.lstat(d + "/gone").st_mode)
    names = [ti.name for ti in tarfile.open(fileobj=io.BytesIO(tar_of(d)))]
    assert names == [".wh.gone", "dir", "dir/.wh..wh..opq", "dir/new", "dir2", "dir2/.wh..wh..opq", "keep"]


def test_directory_mtimes_set_after_contents(tmp: str) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add(tf, "a", tarfile.DIRTYPE, mode=0o555, mtime=1234)
        add(tf, "a/f", data=b"x", mtime=99)
        add(tf, "a/.wh.old")

    d = os.path.join(tmp, "l")
    unpack_bytes(make_tar(build), d)
    assert os.stat(d + "/a").st_mtime == 1234 and os.stat(d + "/a/f").st_mtime == 99
    assert stat.S_IMODE(os.stat(d + "/a").st_mode) == 0o555


def test_implicit_parent_copies_lower_dir_and_symlinked_lower_parent_is_refused(tmp: str) -> None:
    lower = os.path.join(tmp, "lower")
    os.makedirs(lower + "/usr/share")
    os.chmod(lower + "/usr", 0o711)
    os.utime(lower + "/usr", (777, 777))
    os.symlink("usr/lib", lower + "/lib")
    os.symlink("/etc", lower + "/evil")
    d = os.path.join(tmp, "l")
    unpack_bytes(make_tar(lambda tf: add(tf, "usr/share/x", data=b"x")), d, lowers=[lower])
    st = os.stat(d + "/usr")
    assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_mtime == 777, "like overlay copy-up"
    for name in ("lib/x", "evil/passwd"):
        with pytest.raises(LayerError, match="is a symlink in a lower layer"):
            unpack_bytes(
                make_tar(lambda tf, n=name: add(tf, n, data=b"x")), os.path.join(tmp, "x" + name[:3]), lowers=[lower]
            )
    # a whiteout in a higher layer hides the symlink: the path is free again
    upper = os.path.join(tmp, "upper")
    os.makedirs(upper)
    os.mknod(upper + "/evil", stat.S_IFCHR, 0)
    unpack_bytes(make_tar(lambda tf: add(tf, "evil/passwd", data=b"x")), os.path.join(tmp, "ok"), lowers=[upper, lower])
    assert os.path.isfile(os.path.join(tmp, "ok/evil/passwd"))


def test_sparse_gnu_and_pax(tmp: str) -> None:
    src = os.path.join(tmp, "src")
    os.mkdir(src)
    with open(src + "/sp", "wb") as f:
        f.write(b"head")
        f.seek(50 << 20)
        f.write(b"tail")
    for fmt in ("gnu", "pax"):
        tarpath = os.path.join(tmp, fmt + ".tar")
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", tarpath, "-C", src, "sp"], check=True)
        d = os.path.join(tmp, fmt)
        with open(tarpath, "rb") as f:
            os.mkdir(d)
            layers.unpack(f, d)
        st = os.stat(d + "/sp")
        assert st.st_size == (50 << 20) + 4 and st.st_blocks * 512 < (1 << 20), "holes stay holes"
        with open(d + "/sp", "rb") as f:
            assert f.read(4) == b"head" and f.seek(50 << 20) and f.read() == b"tail"


def test_overlay_shared_whiteout_inode_is_not_a_hardlink(tmp: str) -> None:
    d = os.path.join(tmp, "l")
    os.mkdir(d)
    os.mknod(d + "/w1", stat.S_IFCHR, 0)
    os.link(d + "/w1", d + "/w2")
    with tarfile.open(fileobj=io.BytesIO(tar_of(d))) as tf:
        got = [(m.name, m.isreg(), m.size) for m in tf]
    assert got == [(".wh.w1", True, 0), (".wh.w2", True, 0)]


def test_normalize_timestamps_and_overlay_xattrs(tmp: str) -> None:
    d = os.path.join(tmp, "l")
    os.makedirs(d + "/sub")
    with open(d + "/sub/f", "w") as f:
        f.write("x")
    os.symlink("/nonexistent", d + "/sub/ln")
    os.setxattr(d + "/sub", "user.overlay.impure", b"y")
    os.setxattr(d + "/sub", "user.overlay.opaque", b"y")
    os.setxattr(d + "/sub/f", "user.overlay.origin", b"junk")
    os.setxattr(d + "/sub/f", "user.keep", b"1")
    os.utime(d + "/sub/f", (100, 100))
    layers.normalize(d, clamp_mtime=500)
    assert os.listxattr(d + "/sub") == ["user.overlay.opaque"]
    assert os.listxattr(d + "/sub/f") == ["user.keep"]
    assert os.stat(d + "/sub/f").st_mtime == 100, "older mtimes are kept"
    assert os.lstat(d + "/sub/ln").st_mtime == 500 and os.stat(d + "/sub").st_mtime == 500
    layers.normalize(d, set_mtime=42)
    assert {os.lstat(os.path.join(r, n)).st_mtime for r, ds, fs in os.walk(d) for n in ds + fs} == {42}


def test_limits_stop_bombs(tmp: str) -> None:
    data = make_tar(lambda tf: [add(tf, f"f{i}", data=b"x" * 1000) for i in range(5)])
    with pytest.raises(LayerError, match="limit of 3000 bytes"):
        unpack_bytes(data, os.path.join(tmp, "a"), limits=layers.UnpackLimits(max_bytes=3000))
    with pytest.raises(LayerError, match="more than 3 entries"):
        unpack_bytes(data, os.path.join(tmp, "b"), limits=layers.UnpackLimits(max_entries=3))
    bomb = os.path.join(tmp, "bomb.gz")
    with gzip.open(bomb, "wb") as f:
        f.write(data)
        f.write(bytes(10 << 20))  # zeros after the tar's end still count
    with layers.open_blob(bomb) as r, pytest.raises(LayerError, match="decompression bomb"):
        layers.unpack(r, os.path.join(tmp, "a"), limits=layers.UnpackLimits(max_bytes=1 << 20))


def test_open_blob_formats_and_verification(tmp: str) -> None:
    data = make_tar(lambda tf: add(tf, "f", data=os.urandom(3000)))
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    import zstandard

    blobs = {
        "plain": data,
        "gzip": gzip.compress(data[:1000]) + gzip.compress(data[1000:]),
        "zstd": zstandard.ZstdCompressor().compress(data),
    }
    for name, blob in blobs.items():
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(blob)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        with layers.open_blob(path, digest=digest, diff_id=diff_id) as r:
            assert r.read() == data, name
        with layers.open_blob(path, digest="sha256:" + "0" * 64) as r, pytest.raises(LayerError, match="mismatch"):
            r.read()
        with layers.open_blob(path, diff_id="sha256:" + "0" * 64) as r, pytest.raises(LayerError, match="diff_id"):
            r.read()
    path = os.path.join(tmp, "trunc")
    with open(path, "wb") as f:
        f.write(blobs["gzip"][:-30])
    with layers.open_blob(path) as r, pytest.raises(LayerError, match="corrupt"):
        r.read()


def test_compress_layer_deterministic_and_readable(tmp: str) -> None:
    d = os.path.join(tmp, "l")
    os.mkdir(d)
    with open(d + "/f", "wb") as f:
        f.write(os.urandom(1 << 20) + bytes(3 << 20))
    diff_id, _ = layers.write_tar(d, None)
    for fmt in ("gzip", "zstd"):
        a = compress.compress_layer(d, os.path.join(tmp, fmt + ".1"), fmt)
        b = compress.compress_layer(d, os.path.join(tmp, fmt + ".2"), fmt)
        assert a == b and a[2] == diff_id
        c = compress.compress_file(
            os.path.join(tmp, fmt + ".1"), os.path.join(tmp, fmt + ".3"), "zstd" if fmt == "gzip" else "gzip"
        )
        assert c[2] == diff_id
        with layers.open_blob(os.path.join(tmp, fmt + ".1"), digest=a[0], diff_id=diff_id) as r:
            assert hashlib.sha256(r.read()).hexdigest() == diff_id[7:]
    with open(os.path.join(tmp, "gzip.1"), "rb") as f:
        assert f.read(10) == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", "fixed gzip header"
    with open(os.path.join(tmp, "gzip.1"), "rb") as f:
        assert "sha256:" + hashlib.sha256(gzip.decompress(f.read())).hexdigest() == diff_id, "plain gzip"


def test_zstd_output_independent_of_threads() -> None:
    import zstandard

    data = os.urandom(1 << 16) * 40 + bytes(8 << 20)
    outs = set()
    for threads in (1, 2, 4):
        c = zstandard.ZstdCompressor(level=3, threads=threads).compressobj()
        outs.add(
            b"".join([c.compress(data[i : i + layers.CHUNK]) for i in range(0, len(data), layers.CHUNK)] + [c.flush()])
        )
    assert len(outs) == 1


def test_entries_replace_each_other_at_any_depth(tmp: str) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add(tf, "a", tarfile.DIRTYPE, mode=0o755)
        add(tf, "a/b", tarfile.DIRTYPE, mode=0o755)
        add(tf, "a/b/c", data=b"c")
        add(tf, "a/x", data=b"x")
        add(tf, "a/b", data=b"now a file")  # a dir replaced while its parent is the current one
        add(tf, "a/x", tarfile.DIRTYPE, mode=0o700)  # a file replaced by a dir
        add(tf, "a/x/y", tarfile.SYMTYPE, mode=0o777, link="../b")
        add(tf, "a/x/y", data=b"y")  # a symlink replaced by a file: written in place, not through it
        add(tf, "a/h", tarfile.LNKTYPE, link="a/x/y")

    d = os.path.join(tmp, "l")
    unpack_bytes(make_tar(build), d)
    assert open(d + "/a/b", "rb").read() == b"now a file"
    assert open(d + "/a/x/y", "rb").read() == b"y" and os.stat(d + "/a/h").st_ino == os.stat(d + "/a/x/y").st_ino
    assert stat.S_IMODE(os.stat(d + "/a/x").st_mode) == 0o700
    assert sorted(os.listdir(d + "/a")) == ["b", "h", "x"]


CANARY_TARGETS = ["a", "b/c", "..", "../..", "../../../../../../../../..", "/", "/tmp"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_layers_are_contained_and_round_trip(tmp: str, data: st.DataObject) -> None:
    """Any mix of entries: refused with LayerError or unpacked inside dest, and then exactly reproducible."""
    comp = st.sampled_from(["a", "b", "c", ".wh.a", ".wh.b", ".wh..wh..opq", "..", "."])
    path = st.lists(comp, min_size=1, max_size=3).map("/".join)
    canary = os.path.join(tmp, "canary")
    os.makedirs(canary + "/a", exist_ok=True)
    entry = st.tuples(
        st.sampled_from(["file", "dir", "sym", "link", "fifo"]),
        path,
        st.sampled_from(CANARY_TARGETS + [canary, canary + "/a"]),
        path,
    )

    def layer(entries: list[tuple[str, str, str, str]]) -> bytes:
        def build(tf: tarfile.TarFile) -> None:
            for kind, name, target, other in entries:
                if kind == "file":
                    add(tf, name, data=name.encode())
                elif kind == "dir":
                    add(tf, name, tarfile.DIRTYPE, mode=0o755)
                elif kind == "sym":
                    add(tf, name, tarfile.SYMTYPE, mode=0o777, link=target)
                elif kind == "link":
                    add(tf, name, tarfile.LNKTYPE, link=other)
                else:
                    add(tf, name, tarfile.FIFOTYPE)

        return make_tar(build)

    n = len(os.listdir(tmp))
    lower, upper = os.path.join(tmp, f"lo{n}"), os.path.join(tmp, f"up{n}")
    os.mkdir(lower)
    try:
        unpack_bytes(layer(data.draw(st.lists(entry, max_size=8))), lower)
        lowers = [lower]
    except LayerError:
        lowers = []
    try:
        unpack_bytes(layer(data.draw(st.lists(entry, max_size=10))), upper, lowers=lowers)
    except LayerError:
        return
    finally:
        assert sorted(os.listdir(canary)) == ["a"] and os.listdir(canary + "/a") == []
        assert all(x == "canary" or x[:2] in ("lo", "up", "rt") for x in os.listdir(tmp)), "nothing beside dest"
    t1 = tar_of(upper)
    again = os.path.join(tmp, f"rt{n}")
    unpack_bytes(t1, again)
    assert tar_of(again) == t1


def test_deep_trees_need_no_recursion_and_unpack_bounds_depth(tmp: str) -> None:
    d = os.path.join(tmp, "l")
    os.mkdir(d)
    fd = os.open(d, os.O_RDONLY)
    for _ in range(1100):  # deeper than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    try:
        layers.normalize(d, set_mtime=7)
        with tarfile.open(fileobj=io.BytesIO(tar_of(d))) as tf:
            assert len(tf.getmembers()) == 1100
    finally:
        subprocess.run(["rm", "-rf", d], check=True)  # shutil.rmtree recurses too deep
    with pytest.raises(LayerError, match="deeper than 512"):
        unpack_bytes(make_tar(lambda tf: add(tf, "a/" * 512 + "f")), os.path.join(tmp, "u"))


def test_symlink_owner_record_follows_the_inode_not_the_name(tmp: str) -> None:
    """A directory copied up by overlay keeps its record; a new symlink of the same name is not its subject."""
    d = os.path.join(tmp, "l")
    os.makedirs(d + "/dir")
    os.symlink("x", d + "/dir/ln")
    ino = os.lstat(d + "/dir/ln").st_ino
    os.setxattr(d + "/dir", "user.rbuild.lstat", b"ln\0" + b"70001:70002:%d\0" % ino)

    def owner() -> tuple[int, int]:
        with tarfile.open(fileobj=io.BytesIO(tar_of(d))) as tf:
            m = tf.getmember("dir/ln")
            return m.uid, m.gid

    assert owner() == (70001, 70002)
    os.unlink(d + "/dir/ln")
    with open(d + "/dir/keep-inode-busy", "w"):
        pass
    os.symlink("y", d + "/dir/ln")
    assert os.lstat(d + "/dir/ln").st_ino != ino
    assert owner() == (os.getuid(), os.getgid())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=6)
)
def test_corrupted_tar_bytes_give_layer_errors_only(tmp: str, flips: list[tuple[int, int]]) -> None:
    """Damaged headers (checksums, sizes, PAX records, sparse maps) end in LayerError, never another error."""
    data = bytearray(make_tar(rich_layer))
    for pos, value in flips:
        data[pos % 6000] = value  # the headers and PAX records are up front
    for off in range(0, 6144, 512):  # keep checksums valid, so that damage gets past them
        if data[off + 257 : off + 262] == b"ustar":
            data[off + 148 : off + 156] = b"        "
            data[off + 148 : off + 156] = b"%06o\0 " % sum(data[off : off + 512])
    n = len(os.listdir(tmp))
    try:
        unpack_bytes(bytes(data), os.path.join(tmp, f"c{n}"))
    except LayerError as e:
        assert "\n" not in str(e)


def test_open_blob_closed_early_stops_its_read_ahead(tmp: str) -> None:
    path = os.path.join(tmp, "big.gz")
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(os.urandom(24 << 20))  # more than the read-ahead queue holds
    r = layers.open_blob(path)
    assert len(r.read(10)) == 10
    r.close()
    raw = r.raw  # type: ignore[attr-defined]
    assert raw.thread is not None and not raw.thread.is_alive()
