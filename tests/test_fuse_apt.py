"""A Debian build with apt-get on the FUSE rung (issue 13) gives the image the overlay driver gives.

apt stats the temporary files it has unlinked; through rbuild-fuse-overlay that fstat failed with ENOENT
("Unable to determine file size for fd 6"), so no apt-get install ran on the FUSE rung. The packages are
tests/test_single_uid_debian.py's: a system group, a setgid and a setuid binary, directories owned by them.
Files whose content records the time of the build are compared by type, mode and owner only.
"""

from __future__ import annotations

import pytest
from conftest import Runner
from ocitree import Entry, flatten, load
from test_differential_fuse import dev_fuse  # noqa: F401 (the fixture)

pytestmark = pytest.mark.e2e

# written with the time of the build or the download in them
TIMED = ("/var/log/", "/var/cache/", "/var/lib/apt/lists/", "/var/lib/dpkg/status-old")
BODY = "RUN apt-get update -q && apt-get install -y -q --no-install-recommends cron sudo\n"


def _meta(e: Entry | None) -> str:
    return "-" if e is None else f"{e.type} {e.mode:04o} {e.uid}:{e.gid} {e.link}"


def test_apt_get_install_on_fuse_same_as_overlay(rb: Runner, debian_layout: str, dev_fuse: None) -> None:  # noqa: F811
    trees = {}
    for driver in ("overlay", "fuse"):
        root = rb.fresh_root()
        ctx = rb.context({"Containerfile": f"FROM oci:{debian_layout}\n{BODY}"})
        res = rb.run("build", "--storage-driver", driver, "-t", "fuse-apt", ctx, root=root)
        assert "GPG error" not in res.stderr, res.stderr
        out = rb.mkdir()
        rb.run("push", "fuse-apt", f"oci:{out}/l", root=root)
        trees[driver] = flatten(load(f"{out}/l").layers)
    want, got = trees["overlay"], trees["fuse"]
    assert want["/usr/bin/crontab"].mode == 0o2755 and want["/usr/bin/sudo"].mode == 0o4755
    diff = {}
    for p in want.keys() | got.keys():
        w, g = want.get(p), got.get(p)
        if not (_meta(w) == _meta(g) if p.startswith(TIMED) else w == g):
            diff[p] = (str(w), str(g))
    assert not diff, diff
