"""Single uid on Debian (issue 12): apt-get install gives the image a user with a subuid range gets.

apt drops privilege to `_apt` for its downloads and checks that the switch took (getuid, getgroups, and
that setuid(0) now fails); the packages ship a system group (cron: `crontab`), a setgid binary
(`/usr/bin/crontab`, by dpkg-statoverride in the postinst), a setuid-root one (`sudo`) and directories
owned by them; apt-key's `cp -a` as `_apt` sets an ACL on its own copy, and a refusal there fails
the signature check silently (a W: line, the old lists kept). Files whose content records the time of
the build (logs, apt's and debconf's caches) are compared by type, mode and owner only.
"""

from __future__ import annotations

import pytest
from conftest import Runner
from ocitree import Entry, flatten, load

pytestmark = pytest.mark.e2e

# written with the time of the build or the download in them
TIMED = ("/var/log/", "/var/cache/", "/var/lib/apt/lists/", "/var/lib/dpkg/status-old")


def _meta(e: Entry | None) -> str:
    return "-" if e is None else f"{e.type} {e.mode:04o} {e.uid}:{e.gid} {e.link}"


def test_apt_get_install_same_image_with_and_without_a_range(rb: Runner, rb_single: Runner, debian_layout: str) -> None:
    body = "RUN apt-get update -q && apt-get install -y -q --no-install-recommends cron sudo\n"
    images = []
    for runner in (rb, rb_single):
        ctx = runner.context({"Containerfile": f"FROM oci:{debian_layout}\n{body}"})
        res = runner.run("build", "-t", "su-apt", "--no-cache", ctx)
        assert "Could not switch" not in res.stderr and "GPG error" not in res.stderr, res.stderr
        out = runner.mkdir()
        runner.run("push", "su-apt", f"oci:{out}/l")
        images.append(load(f"{out}/l"))
    want, got = flatten(images[0].layers), flatten(images[1].layers)
    assert want["/usr/bin/crontab"].mode == 0o2755 and want["/usr/bin/sudo"].mode == 0o4755
    assert want["/var/spool/cron/crontabs"].mode == 0o1730 and want["/var/spool/cron/crontabs"].gid != 0
    diff = {}
    for p in want.keys() | got.keys():
        w, g = want.get(p), got.get(p)
        same = _meta(w) == _meta(g) if p.startswith(TIMED) else w == g
        if not same:
            diff[p] = (str(w), str(g))
    assert not diff, diff
    assert images[0].runtime_config == images[1].runtime_config
