"""Single uid, `USER app` (issue 12): the RUN sees itself as app, and owners as a build with a range shows them.

What the RUN makes is app's (`test -O`, `find -user`, `ls -ln`), what it found stays its owner's, and
the image is the one the user with a subuid range gets.
"""

from __future__ import annotations

import pytest
from conftest import Runner
from ocitree import flatten, load
from test_single_uid import ADDUSER, _files

pytestmark = pytest.mark.e2e

BODY = (
    f"RUN {ADDUSER} && mkdir /shared && chmod 1777 /shared\n"
    "USER svc\n"
    "RUN cd /shared && touch m && mkdir d && touch d/f && mkfifo p "
    "&& (test -O m && echo O-mine || echo O-not) > owner.txt "
    "&& (test -O /etc/passwd && echo O-mine || echo O-not) >> owner.txt "
    "&& (test -G d && echo G-mine || echo G-not) >> owner.txt "
    "&& find /shared -user svc -group svc ! -name '*.txt' | sort > found.txt "
    "&& find /etc -maxdepth 1 -user svc > notfound.txt "
    "&& ls -ln d | awk 'NR>1 {print $3, $4}' > ls.txt\n"
    "USER root\n"
    "RUN find /shared -user 2000 ! -name '*.txt' | sort > /found-later.txt "
    "&& stat -c '%u:%g' /shared/m > /stat-later.txt\n"
)


def test_user_app_sees_owners_as_with_a_range(rb: Runner, rb_single: Runner, busybox: str) -> None:
    images = []
    for runner in (rb, rb_single):
        ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\n{BODY}"})
        runner.build(ctx, "-t", "su-userapp", "--no-cache")
        out = runner.mkdir()
        runner.run("push", "su-userapp", f"oci:{out}/l")
        images.append(load(f"{out}/l"))
    files = _files(images[1])
    assert files["shared/owner.txt"] == b"O-mine\nO-not\nG-mine\n", files["shared/owner.txt"]
    assert files["shared/found.txt"] == b"/shared/d\n/shared/d/f\n/shared/m\n/shared/p\n", files["shared/found.txt"]
    assert files["shared/notfound.txt"] == b"" and files["shared/ls.txt"] == b"2000 2000\n"
    assert files["found-later.txt"] == files["shared/found.txt"] and files["stat-later.txt"] == b"2000:2000\n"
    want, got = flatten(images[0].layers), flatten(images[1].layers)
    assert (got["/shared/p"].uid, got["/shared/d/f"].gid) == (2000, 2000)
    diff = {p: (str(want.get(p)), str(got.get(p))) for p in want.keys() | got.keys() if want.get(p) != got.get(p)}
    assert not diff, diff


def test_symlink_and_fifo_owners_shown_to_stat(rb: Runner, rb_single: Runner, busybox: str) -> None:
    """Their records are in the parent directory: stat shows them, in the same RUN and in a later one."""
    body = (
        "RUN mkdir /s && ln -s x /s/l && mkfifo /s/f && chown -h 5:6 /s/l && chown 7:8 /s/f "
        "&& ls -ln /s | awk 'NR>1 {print $3, $4, $9}' > /same.txt\n"
        "RUN ls -ln /s | awk 'NR>1 {print $3, $4, $9}' > /later.txt\n"
    )
    images = []
    for runner in (rb, rb_single):
        ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\n{body}"})
        runner.build(ctx, "-t", "su-links", "--no-cache")
        out = runner.mkdir()
        runner.run("push", "su-links", f"oci:{out}/l")
        images.append(load(f"{out}/l"))
    files = _files(images[1])
    assert files["same.txt"] == files["later.txt"] == b"7 8 f\n5 6 l\n", files
    want, got = flatten(images[0].layers), flatten(images[1].layers)
    diff = {p: (str(want.get(p)), str(got.get(p))) for p in want.keys() | got.keys() if want.get(p) != got.get(p)}
    assert not diff, diff
