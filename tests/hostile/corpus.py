"""A corpus of hostile layers, each named for its attack, with the outcome rbuild must give.

Layers are made at test time because most attacks aim at a canary directory outside the store whose
absolute path is only known then. `cases(canary)` returns the corpus; each `Case` has:

  layers   uncompressed tars, bottom first (an image's layers)
  refused  regex the one-line error must match, or None when the layer is contained (accepted, harmless)
  check    for contained cases: what must hold in the unpacked top layer dir (path -> predicate name)

Whatever the outcome, nothing outside the store may change: the canary is compared before and after.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field

LIMIT = 16 << 20  # RBUILD_MAX_LAYER_BYTES for the bomb cases (the default, 64 GiB, is too big to test)


@dataclass
class Case:
    name: str
    layers: list[bytes]
    refused: str | None
    check: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


Entry = Callable[[tarfile.TarFile], None]


def _info(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    link: str = "",
    size: int = 0,
    pax: dict[str, str] | None = None,
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname, ti.size, ti.mtime = kind, mode, link, size, 1_600_000_000
    ti.uname = ti.gname = ""
    if pax:
        ti.pax_headers = pax
    return ti


def f(name: str, data: bytes = b"pwned\n", pax: dict[str, str] | None = None) -> Entry:
    return lambda tf: tf.addfile(_info(name, size=len(data), pax=pax), io.BytesIO(data))


def d(name: str, mode: int = 0o755) -> Entry:
    return lambda tf: tf.addfile(_info(name, tarfile.DIRTYPE, mode))


def sym(name: str, target: str) -> Entry:
    return lambda tf: tf.addfile(_info(name, tarfile.SYMTYPE, 0o777, target))


def hard(name: str, target: str, pax: dict[str, str] | None = None) -> Entry:
    return lambda tf: tf.addfile(_info(name, tarfile.LNKTYPE, link=target, pax=pax))


def dev(name: str, kind: bytes, major: int, minor: int) -> Entry:
    def add(tf: tarfile.TarFile) -> None:
        ti = _info(name, kind, 0o666)
        ti.devmajor, ti.devminor = major, minor
        tf.addfile(ti)

    return add


def tar(*entries: Entry, fmt: int = tarfile.PAX_FORMAT, global_pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_pax) as tf:
        for e in entries:
            e(tf)
    return buf.getvalue()


def raw_header(ti: tarfile.TarInfo) -> bytes:
    """A header whose declared size is not followed by the data (tarfile would insist on writing it)."""
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def huge_pax_header() -> bytes:
    ti = _info("././@PaxHeader", tarfile.XHDTYPE, size=100 << 20)
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + b"9 a=b\n".ljust(512, b"\0") + bytes(1024)


def declared_size_bomb() -> bytes:
    return raw_header(_info("big", size=1 << 40)) + bytes(4096)


def sparse_bomb() -> bytes:
    """A PAX 1.0 sparse file of 32 TiB apparent size stored in 1 KiB."""
    pax = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "sparse",
        "GNU.sparse.realsize": str(1 << 45),
    }
    sparse_map = f"1\n{(1 << 45) - 512}\n512\n".encode().ljust(512, b"\0")
    ti = _info("GNUSparseFile.0/sparse", size=1024, pax=pax)
    return raw_header(ti) + sparse_map + b"x" * 512 + bytes(1024)


def gzip_bomb_layer() -> bytes:
    """Compresses to ~60 KiB; unpacks to 64 MiB, past the LIMIT the test sets."""
    return tar(*[f(f"zero{i}", bytes(1 << 20)) for i in range(64)])


def sparse_map_garbage() -> bytes:
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse", "GNU.sparse.realsize": "1024"}
    return raw_header(_info("GNUSparseFile.0/sparse", size=1024, pax=pax)) + b"1\nx\n".ljust(1024, b"\0") + bytes(1024)


def sparse_map_truncated() -> bytes:
    """A PAX 1.0 sparse map that announces more numbers than the stream holds."""
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse", "GNU.sparse.realsize": "1024"}
    return raw_header(_info("GNUSparseFile.0/sparse", size=1024, pax=pax)) + b"5\n0\n10".ljust(512, b"7")


def sparse_map_huge() -> bytes:
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse", "GNU.sparse.realsize": "1024"}
    return raw_header(_info("GNUSparseFile.0/sparse", size=1024, pax=pax)) + b"999999999999\n".ljust(1024, b"\0")


def cases(canary: str) -> list[Case]:
    """The corpus, aimed at `canary` (an absolute directory path holding a file `secret`)."""
    up = "../" * 40
    esc = up + canary.lstrip("/")
    ref_dotdot = r"leads outside the layer \(\.\.\)"
    ref_abs = r"absolute (path|link target)"
    ref_sym = r"is a symlink"
    ref_lower = r"is a symlink in a lower layer"
    ref_limit = r"limit of \d+ bytes"
    return [
        Case("dotdot_file", [tar(f(esc + "/pwned"))], ref_dotdot),
        Case("dotdot_inside_name", [tar(d("a"), f("a/../../" + esc + "/pwned"))], ref_dotdot),
        Case("dotdot_dir", [tar(d(esc + "/newdir"))], ref_dotdot),
        Case("absolute_file", [tar(f(canary + "/pwned"))], ref_abs),
        Case("absolute_dir", [tar(d(canary + "/newdir"))], ref_abs),
        Case("symlink_parent_absolute", [tar(sym("ln", canary), f("ln/pwned"))], ref_sym),
        Case("symlink_parent_relative", [tar(sym("ln", esc), f("ln/pwned"))], ref_sym),
        Case("symlink_parent_nested", [tar(d("a"), sym("a/b", canary), f("a/b/c/pwned"))], ref_sym),
        Case("symlink_parent_chain", [tar(sym("x", "y"), sym("y", canary), f("x/pwned"))], ref_sym),
        Case("symlink_loop_parent", [tar(sym("a", "b"), sym("b", "a"), f("a/pwned"))], ref_sym),
        Case("symlink_parent_earlier_layer", [tar(sym("ln", canary)), tar(f("ln/pwned"))], ref_lower),
        Case("symlink_parent_two_layers_down", [tar(sym("ln", canary)), tar(f("other")), tar(d("ln/sub"))], ref_lower),
        Case(
            "dir_replaced_by_symlink_between_layers",
            [tar(d("dir"), f("dir/a")), tar(sym("dir", canary)), tar(f("dir/pwned"))],
            ref_lower,
        ),
        Case(
            "dir_replaced_by_symlink_same_layer",
            [tar(d("dir"), f("dir/a"), sym("dir", canary), f("dir/pwned"))],
            ref_sym,
        ),
        Case("dir_mtime_after_symlink_swap", [tar(d("dir", 0o777), sym("dir", canary))], None, {"dir": "symlink"}),
        Case("hardlink_absolute", [tar(hard("h", canary + "/secret"))], ref_abs),
        Case("hardlink_dotdot", [tar(hard("h", esc + "/secret"))], ref_dotdot),
        Case("hardlink_through_symlink_parent", [tar(sym("ln", canary), hard("h", "ln/secret"))], ref_sym),
        Case(
            "hardlink_through_lower_symlink",
            [tar(sym("ln", canary)), tar(hard("h", "ln/secret"))],
            r"not in this layer|is a symlink",
        ),
        Case(
            "hardlink_to_symlink_then_write",
            [tar(sym("ln", canary + "/secret"), hard("h", "ln"), f("h", b"overwrite"))],
            None,
            {"h": "file", "ln": "symlink"},
        ),
        Case("hardlink_to_directory", [tar(d("dir"), hard("h", "dir"))], r"is a directory"),
        Case("hardlink_to_missing", [tar(hard("h", "nowhere"))], r"not in this layer"),
        Case("write_through_symlink", [tar(sym("f", canary + "/secret"), f("f", b"overwrite"))], None, {"f": "file"}),
        Case(
            "write_through_lower_symlink",
            [tar(sym("f", canary + "/secret")), tar(f("f", b"overwrite"))],
            None,
            {"f": "file"},
        ),
        Case(
            "fifo_over_symlink",
            [tar(sym("p", canary + "/secret"), lambda tf: tf.addfile(_info("p", tarfile.FIFOTYPE)))],
            None,
            {"p": "fifo"},
        ),
        Case("whiteout_dotdot", [tar(f(esc + "/.wh.secret", b""))], ref_dotdot),
        Case("whiteout_of_dotdot", [tar(f(".wh..."))], r"whiteout names no entry"),
        Case("whiteout_name_as_directory", [tar(f(".wh.secret/x"))], r"whiteout name \(\.wh\.\) used as a directory"),
        Case("whiteout_through_symlink", [tar(sym("ln", canary), f("ln/.wh.secret", b""))], ref_sym),
        Case("whiteout_through_lower_symlink", [tar(sym("ln", canary)), tar(f("ln/.wh.secret", b""))], ref_lower),
        Case("opaque_through_symlink", [tar(sym("ln", canary), f("ln/.wh..wh..opq", b""))], ref_sym),
        Case("opaque_through_lower_symlink", [tar(sym("ln", canary)), tar(f("ln/.wh..wh..opq", b""))], ref_lower),
        Case("opaque_dotdot", [tar(f(esc + "/.wh..wh..opq", b""))], ref_dotdot),
        Case("pax_path_renames_entry", [tar(f("innocent", pax={"path": esc + "/pwned"}))], ref_dotdot),
        Case("pax_path_renames_to_absolute", [tar(f("innocent", pax={"path": canary + "/pwned"}))], ref_abs),
        Case("pax_global_header_renames", [tar(f("innocent"), global_pax={"path": esc + "/pwned"})], ref_dotdot),
        Case(
            "pax_linkpath_renames_target", [tar(f("t"), hard("h", "t", pax={"linkpath": canary + "/secret"}))], ref_abs
        ),
        Case("gnu_longname_dotdot", [tar(f(esc + "/" + "n" * 120), fmt=tarfile.GNU_FORMAT)], ref_dotdot),
        Case(
            "gnu_longlink_absolute",
            [tar(hard("h", canary + "/" + "n" * 120 + "/../secret"), fmt=tarfile.GNU_FORMAT)],
            ref_abs,
        ),
        Case(
            "overlay_xattrs_smuggled",
            [
                tar(
                    d("dir"),
                    f(
                        "dir/x",
                        pax={
                            "SCHILY.xattr.user.overlay.redirect": canary,
                            "SCHILY.xattr.user.overlay.metacopy": "",
                            "SCHILY.xattr.user.overlay.opaque": "y",
                            "SCHILY.xattr.trusted.overlay.opaque": "y",
                        },
                    ),
                )
            ],
            None,
            {"dir/x": "no-overlay-xattrs"},
        ),
        Case(
            "rbuild_record_spoofed",
            [
                tar(
                    f(
                        "fake",
                        b"",
                        pax={"SCHILY.xattr.user.rbuild.dev": "c:1:3", "SCHILY.xattr.user.rbuild.stat": "0:0"},
                    )
                )
            ],
            None,
            {"fake": "no-rbuild-xattrs"},
        ),
        Case(
            "device_nodes",
            [
                tar(
                    d("dev"),
                    dev("dev/null", tarfile.CHRTYPE, 1, 3),
                    dev("dev/sda", tarfile.BLKTYPE, 8, 0),
                    dev("dev/zero0", tarfile.CHRTYPE, 0, 0),
                )
            ],
            None,
            {"dev/null": "device-record", "dev/zero0": "device-record"},
        ),
        Case("root_entry_is_symlink", [tar(sym(".", canary))], r"root must be a directory"),
        Case("huge_pax_header", [huge_pax_header()], r"extended header of \d+ bytes exceeds"),
        Case("declared_size_bomb", [declared_size_bomb()], ref_limit),
        Case("sparse_apparent_size_bomb", [sparse_bomb()], ref_limit),
        Case("gzip_decompression_bomb", [gzip_bomb_layer()], ref_limit, env={"RBUILD_MAX_LAYER_BYTES": str(LIMIT)}),
        Case("pax_path_with_nul", [tar(f("innocent", pax={"path": "etc\0passwd"}))], r"null byte"),
        Case("sparse_map_garbage", [sparse_map_garbage()], r"corrupt tar"),
        Case("sparse_map_truncated", [sparse_map_truncated()], r"unexpected end of data"),
        Case("sparse_map_huge", [sparse_map_huge()], r"sparse map of more than \d+ chunks"),
        Case("pax_mtime_infinite", [tar(f("t", pax={"mtime": "1e400"}))], r"modification time .* out of range"),
        Case("pax_uid_out_of_range", [tar(f("u", pax={"uid": str(2**40)}))], r"owner .* out of range"),
        Case(
            "device_number_negative",
            [tar(dev("dv", tarfile.CHRTYPE, -5, 1), fmt=tarfile.GNU_FORMAT)],
            r"device number .* out of range",
        ),
        Case("not_a_tar", [b"PK\x03\x04" + bytes(2000)], r"not a tar archive|corrupt tar"),
        Case("truncated_layer", [tar(f("big", b"x" * 100_000))[:20_000]], r"truncated|unexpected end|corrupt"),
    ]
