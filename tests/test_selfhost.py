"""rbuild's own image: the repository's Containerfile builds with rbuild (as an unprivileged user, from a
Debian base made here with debootstrap), and the image it makes builds images (with RUN) as its user `build`."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator

import pytest
from conftest import Runner, write_oci_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRROR = "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def debian_layout() -> Iterator[str]:
    """Debian bookworm minbase as an OCI layout (the Debian mirror is reachable in CI; nothing else is)."""
    work = tempfile.mkdtemp(prefix="rbtest-debian-", dir="/var/tmp")
    os.chmod(work, 0o755)
    try:
        rootfs = os.path.join(work, "rootfs")
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", rootfs, MIRROR], capture_output=True, text=True
        )
        if res.returncode != 0:
            pytest.skip(f"debootstrap from {MIRROR} failed (no Debian mirror?): {res.stderr.strip()[-300:]}")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(os.listdir(rootfs)):
                tf.add(os.path.join(rootfs, name), arcname=name)
        shutil.rmtree(rootfs)
        layout = os.path.join(work, "layout")
        write_oci_layout(layout, [buf.getvalue()], compress=False)
        subprocess.run(["chmod", "-R", "a+rX", layout], check=True)
        yield layout
    finally:
        shutil.rmtree(work, ignore_errors=True)


# a container of the image, made by hand: its root by pivot_root (a chroot would forbid user namespaces),
# a fresh /proc, the host's /dev, a private /tmp; then the image's own setpriv drops to its user `build`
INSIDE = """set -e
R=$1
mount --make-rprivate /
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
cd "$R"
mkdir -p .old
pivot_root . .old
cd /
umount -l /.old
rmdir /.old
exec env -i PATH=/opt/rbuild/bin:/usr/sbin:/usr/bin:/sbin:/bin RBUILD_ROOT=/var/lib/rbuild HOME=/home/build \
    setpriv --reuid=1000 --regid=1000 --init-groups sh -c 'cd /home/build && rbuild build -q -t inner app'
"""


def _ca_secret(rb: Runner) -> list[str]:
    """This machine reaches PyPI through a proxy whose CA only the host trusts: the Containerfile's hook."""
    found = [p for p in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt") if p and os.path.isfile(p)]
    if not found:
        return []
    bundle = found[0]
    copy = os.path.join(rb.mkdir(), "ca-bundle.crt")
    shutil.copy(bundle, copy)
    rb.own(copy)
    return ["--secret", f"id=ca-bundle,src={copy}"]


def _context(rb: Runner) -> str:
    ctx = rb.mkdir()
    for name in ("Containerfile", "pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(os.path.join(REPO, name), ctx)
    for name in ("rootless", "csrc"):
        shutil.copytree(
            os.path.join(REPO, name),
            os.path.join(ctx, name),
            ignore=shutil.ignore_patterns("__pycache__", "*.o", "libexec"),
        )
    rb.own(ctx)
    return ctx


def test_own_image_builds_and_builds_images(rb: Runner, busybox: str, debian_layout: str) -> None:
    root = rb.fresh_root()
    res = rb.run(
        "build",
        "-q",
        "--build-arg",
        f"BASE=oci:{debian_layout}",
        *_ca_secret(rb),
        "-t",
        "rbuild-self",
        _context(rb),
        root=root,
        timeout=1500,
    )
    image = res.stdout.strip().splitlines()[-1]
    config = rb.run("inspect", image, root=root).stdout
    assert '"User": "build"' in config and '"RBUILD_ROOT=/var/lib/rbuild"' in config

    out = rb.mkdir()
    rb.run("push", "rbuild-self", f"oci:{out}/layout:self", root=root)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        rootfs = os.path.join(tmp, "rootfs")
        subprocess.run(["umoci", "raw", "unpack", "--image", f"{out}/layout:self", rootfs], check=True)
        helper = os.path.join(rootfs, "opt/rbuild/lib/python3.11/site-packages/rootless/libexec/rbuild-fuse-overlay")
        assert os.access(helper, os.X_OK)
        assert os.stat(os.path.join(rootfs, "usr/bin/newuidmap")).st_mode & 0o4000  # setuid kept
        # a build inside the image, as its user `build` with its own subuid range: busybox base, a RUN
        shutil.copytree(busybox, os.path.join(rootfs, "home/build/busybox"))
        ctx = os.path.join(rootfs, "home/build/app")
        os.makedirs(ctx)
        with open(os.path.join(ctx, "Containerfile"), "w") as f:
            f.write("FROM oci:/home/build/busybox\nRUN echo built-inside > /inside && chown 7:7 /inside\n")
        subprocess.run(["chown", "-R", "1000:1000", os.path.join(rootfs, "home/build")], check=True)
        inner = subprocess.run(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", INSIDE, "inside", rootfs],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert inner.returncode == 0, inner.stderr
        assert inner.stdout.strip().startswith("sha256:")
