"""kernel-patches/ and examples/bootable/: what CI can check cheaply (issue 17).

The config fragments parse and name symbols that exist in the pinned source's Kconfig files; every patch of
the series is a `git format-patch` mail that applies cleanly (no fuzz) to the pinned source, Debian 12's
linux-source-6.1, of which only the Kconfig files and the files the patches touch are extracted. The
bootable example builds its image with rbuild and becomes an ext4 disk without privilege. Building the
kernel and booting the disk (kernel-patches/build.sh, boot-test.sh) take minutes and are opt-in.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from conftest import Runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(REPO, "kernel-patches")
FRAGMENTS = [os.path.join(PATCHES, n) for n in ("rbuild.config", "qemu.config")]
SERIES = sorted(glob.glob(os.path.join(PATCHES, "[0-9][0-9][0-9][0-9]-*.patch")))
TARBALL = "/usr/src/linux-source-6.1.tar.xz"
TOP = "linux-source-6.1"
ASSIGN = re.compile(r'CONFIG_([A-Z0-9_]+)=(y|m|n|-?[0-9]+|0x[0-9a-fA-F]+|"[^"]*")')
NOT_SET = re.compile(r"# CONFIG_([A-Z0-9_]+) is not set")
SYMBOL = re.compile(r"^\s*(?:menu)?config\s+([A-Z0-9_]+)\s*$", re.M)


def parse_fragment(path: str) -> dict[str, str]:
    """Symbol -> value of a Kconfig fragment; an AssertionError names the file, line and cause."""
    values: dict[str, str] = {}
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            where = f"{os.path.basename(path)}:{n}"
            m = ASSIGN.fullmatch(line) or NOT_SET.fullmatch(line)
            if m is None:
                assert not line.strip() or (line.startswith("# ") and "CONFIG_" not in line), f"{where}: {line!r}"
                continue
            assert m.group(1) not in values, f"{where}: CONFIG_{m.group(1)} set twice"
            values[m.group(1)] = m.group(2) if m.re is ASSIGN else "n"
    return values


def touched(patch: str) -> list[str]:
    with open(patch) as f:
        return sorted({line[6:].strip() for line in f if line.startswith("+++ b/")})


@pytest.fixture(scope="module")
def source() -> Iterator[str]:
    """The pinned source's Kconfig files and the files the series touches, extracted (one pass over the xz)."""
    if not os.path.exists(TARBALL):
        pytest.skip(f"{TARBALL} missing (apt-get install linux-source-6.1; scripts/setup.sh does)")
    wanted = sorted({f"{TOP}/{p}" for patch in SERIES for p in touched(patch)})
    work = tempfile.mkdtemp(prefix="rbtest-kernel-", dir="/var/tmp")
    try:
        subprocess.run(
            ["tar", "-C", work, "-xJf", TARBALL, "--wildcards", f"{TOP}/*Kconfig*", *wanted],
            check=True,
        )
        yield os.path.join(work, TOP)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_fragments_parse() -> None:
    for path in FRAGMENTS:
        assert parse_fragment(path), path
    # the two fragments do not fight over a symbol
    rb, qemu = (parse_fragment(p) for p in FRAGMENTS)
    assert not {k for k in rb.keys() & qemu.keys() if rb[k] != qemu[k]}


def test_parse_fragment_refuses_bad_lines(tmp_path: object) -> None:
    bad = os.path.join(str(tmp_path), "bad.config")
    for text, cause in (
        ("CONFIG_USER_NS=yes\n", "bad.config:1"),
        ("CONFIG_OVERLAY_FS=y\nCONFIG_OVERLAY_FS=n\n", "set twice"),
        ("# CONFIG_FUSE_FS=y\n", "bad.config:1"),
        ("USER_NS=y\n", "bad.config:1"),
    ):
        with open(bad, "w") as f:
            f.write(text)
        with pytest.raises(AssertionError, match=cause):
            parse_fragment(bad)


def test_fragment_symbols_exist_in_the_pinned_source(source: str) -> None:
    known: set[str] = set()
    for dirpath, _, files in os.walk(source):
        for name in files:
            if name.startswith("Kconfig"):
                with open(os.path.join(dirpath, name), errors="replace") as f:
                    known.update(SYMBOL.findall(f.read()))
    assert {"USER_NS", "OVERLAY_FS", "VIRTIO_BLK"} <= known  # the scan itself works
    for path in FRAGMENTS:
        unknown = sorted(set(parse_fragment(path)) - known)
        assert not unknown, f"{os.path.basename(path)}: no such Kconfig symbol: {unknown}"


def test_series_is_format_patch_mail() -> None:
    assert SERIES, "kernel-patches/ has no patch"
    for patch in SERIES:
        with open(patch) as f:
            text = f.read()
        name = os.path.basename(patch)
        assert text.startswith("From "), name
        assert re.search(r"^Subject: \[PATCH[^\]]*\] \S+: ", text, re.M), f"{name}: subsystem: summary"
        assert "\nSigned-off-by: " in text, name
        assert touched(patch), f"{name}: no file changed"


def test_series_applies_cleanly_to_the_pinned_source(source: str) -> None:
    for patch in SERIES:
        res = subprocess.run(
            ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "-i", patch],
            cwd=source,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, f"{os.path.basename(patch)}:\n{res.stdout}{res.stderr}"
        assert "offset" not in res.stdout and "fuzz" not in res.stdout, res.stdout
    # applying again is refused: the series really changed the files
    again = subprocess.run(["patch", "-p1", "--dry-run", "--forward", "--batch", "-i", SERIES[0]], cwd=source)
    assert again.returncode != 0


def _bootable_tree(rb: Runner) -> str:
    """What mkdisk.sh needs of the checkout, in a directory the builder user owns (the checkout may be
    unreadable to it)."""
    tree = rb.mkdir()
    for name in ("rootless", "csrc", "examples/bootable"):
        shutil.copytree(
            os.path.join(REPO, name),
            os.path.join(tree, name),
            ignore=shutil.ignore_patterns("__pycache__", "*.o", "libexec"),
        )
    os.makedirs(os.path.join(tree, "kernel-patches"))
    for name in ("pyproject.toml", "setup.py", "README.md", "kernel-patches/sysctl.conf"):
        shutil.copy(os.path.join(REPO, name), os.path.join(tree, name))
    for name in ("metacopy-bench.sh", "metacopy-security.sh"):
        shutil.copy(os.path.join(PATCHES, name), os.path.join(tree, "kernel-patches"))
    rb.own(tree)
    return tree


def _debugfs(image: str, request: str) -> str:
    res = subprocess.run(["debugfs", "-R", request, image], capture_output=True, text=True, check=True)
    return res.stdout


def test_bootable_example_builds_and_becomes_a_disk(rb: Runner, debian_layout: str) -> None:
    """mkdisk.sh as the unprivileged user: `rbuild build` of the example, then the root disk with ext4's
    owners and modes as the image has them (setuid newuidmap of root, the user's home of uid 1000)."""
    for tool in ("umoci", "mkfs.ext4", "debugfs"):
        if not shutil.which(tool, path="/usr/bin:/usr/sbin:/sbin:/bin"):
            pytest.skip(f"{tool} missing (scripts/setup.sh installs it)")
    tree = _bootable_tree(rb)
    out = rb.mkdir()
    kernel = os.path.join(rb.mkdir(), "bzImage")
    # The image build does not look into the kernel; booting it is kernel-patches/boot-test.sh's job. A
    # flavor kernel built on this machine is used when there is one, else a stand-in file.
    built = "/var/tmp/kbuild/bzImage"
    if os.path.exists(built) and os.path.exists(built.replace("bzImage", "config")):
        shutil.copy(built, kernel)
        shutil.copy(built.replace("bzImage", "config"), os.path.join(os.path.dirname(kernel), "config"))
    else:
        rb.write(kernel, b"stand-in for the flavor's bzImage\n")
        rb.write(os.path.join(os.path.dirname(kernel), "config"), "CONFIG_OVERLAY_FS=y\n")
    rb.own(os.path.dirname(kernel))
    res = rb.sh(
        f"sh {tree}/examples/bootable/mkdisk.sh {out}",
        env={"BASE": f"oci:{debian_layout}", "KERNEL": kernel, "PYTHON": sys.executable, "SIZE": "2G"},
        timeout=1200,
    )
    root = os.path.join(out, "root.img")
    assert res.stdout.strip().splitlines()[-1] == f"{root} {out}/state.img {out}/vmlinuz"
    # owners and modes as the image has them, written without privilege
    stat = _debugfs(root, "stat /usr/bin/newuidmap")
    assert re.search(r"Mode:\s+04755", stat) and re.search(r"User:\s+0\s+Group:\s+0", stat), stat
    listing = _debugfs(root, "ls -l /var/home")
    assert re.search(r"40755 \(2\)\s+1000\s+1000 .* build", listing), listing
    assert "vmlinuz" in _debugfs(root, "ls /usr/lib/modules/6.1-rbuild")
    assert "Type: symlink" in _debugfs(root, "stat /sbin/init")
    assert "build:100000:65536" in _debugfs(root, "cat /etc/subuid")
    assert "rbuild" in _debugfs(root, "ls /usr/lib/rbuild/bin")
    with open(os.path.join(out, "vmlinuz"), "rb") as f, open(kernel, "rb") as k:
        assert f.read() == k.read()
