"""What the kernel may cache of rbuild-fuse-overlay's tree, counted in the requests the helper serves (issue 13),
and what stat of an open file says once its name is gone.

The helper runs with libfuse's `debug` option, which logs one line per request; the tests count LOOKUPs between
steps (a lookup is answered before the syscall that caused it returns, so the counts are exact). A listing
answers with readdirplus, so stat'ing what was listed needs no lookup; names and attributes stay cached past a
second (nothing but the helper changes the layers while mounted); a name found absent stays known absent until
it is made through the mount. Changes still show at once. Runs as the unprivileged test user in
`unshare -Urm`, with test_fuse_overlay's sanitizer build of the helper and its fixture opening /dev/fuse.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from conftest import Runner
from test_fuse_overlay import asan_helper, dev_fuse, work  # noqa: F401 (fixtures)

MOUNT = """
set -e
d={d}
mkdir -p $d/l/a/b $d/u $d/w $d/m
for i in $(seq 20); do echo $i > $d/l/a/b/f$i; done
{helper} --ready-fd 3 -o lowerdir=$d/l,upperdir=$d/u,workdir=$d/w,debug $d/m 3>$d/ready 2>$d/log &
while [ ! -s $d/ready ]; do sleep 0.01; done
count() {{ echo "$1 $(grep -c 'opcode: LOOKUP' $d/log) $(grep -c 'opcode: READDIR' $d/log)" >> $d/counts; }}
count start
"""


def _run(rb: Runner, helper: str, steps: str) -> tuple[dict[str, tuple[int, int]], str]:
    """The (LOOKUP, READDIR[PLUS]) requests at each `count NAME` of steps since the previous count, and the
    script's output."""
    d = rb.mkdir()
    try:
        script = MOUNT.format(d=shlex.quote(d), helper=shlex.quote(helper)) + steps + "\numount $d/m; wait\n"
        res = subprocess.run(
            rb._prefix() + ["unshare", "-Urm", "/bin/sh", "-c", script],
            env=rb._env(None),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        with open(os.path.join(d, "counts")) as f:
            totals = [(name, int(lookups), int(readdirs)) for name, lookups, readdirs in (ln.split() for ln in f)]
    finally:
        shutil.rmtree(d)
    counts = {t[0]: (t[1] - p[1], t[2] - p[2]) for t, p in zip(totals[1:], totals, strict=False)}
    return counts, res.stdout


def test_listed_names_need_no_lookup_and_stay_cached(rb: Runner, dev_fuse: None, asan_helper: str) -> None:  # noqa: F811
    counts, out = _run(
        rb,
        asan_helper,
        """
ls -l $d/m/a/b > /dev/null; count listed
sleep 1.5
stat $d/m/a/b/f* > /dev/null; cat $d/m/a/b/f7; ls $d/m/a/b > /dev/null; count again
echo new > $d/m/a/b/f7; mv $d/m/a/b/f8 $d/m/a/b/f9; rm $d/m/a/b/f1
cat $d/m/a/b/f7 $d/m/a/b/f9; ls $d/m/a/b | wc -l
""",
    )
    # two lookups find a and a/b; the 20 files come with the listing
    assert counts["listed"][0] <= 2, counts
    # after the old 1 s timeout: nothing asked again, the listing included
    assert counts["again"] == (0, 0), counts
    # the copy-up, rename and whiteout show at once (the listing too)
    assert out.split() == ["7", "new", "8", "18"], out


def test_absent_name_stays_known_absent_until_made(rb: Runner, dev_fuse: None, asan_helper: str) -> None:  # noqa: F811
    counts, out = _run(
        rb,
        asan_helper,
        """
test ! -e $d/m/a/nope; count first
sleep 1.5
test ! -e $d/m/a/nope; test ! -e $d/m/a/nope; count again
echo made > $d/m/a/nope; cat $d/m/a/nope
""",
    )
    assert counts["first"][0] == 2, counts  # a, then a/nope
    assert counts["again"][0] == 0, counts
    assert out.split() == ["made"], out


def test_stat_of_an_open_file_after_its_name_is_gone(rb: Runner, dev_fuse: None, asan_helper: str) -> None:  # noqa: F811
    """fstat sends the kernel's GETATTR without a file handle: a removed or replaced name must still answer (apt
    stats the temporary files it unlinked, and failed with ENOENT), and /proc/self/fd/N still opens."""
    _, out = _run(
        rb,
        asan_helper,
        """
exec 5<>$d/m/new; rm $d/m/new; echo more >&5; stat -L -c '%s %h' /dev/fd/5; cat /dev/fd/5
exec 6<$d/m/a/b/f12; rm $d/m/a/b/f12; stat -L -c %s /dev/fd/6; cat /dev/fd/6
echo old > $d/m/t; exec 7<>$d/m/t; echo newer > $d/m/u; mv $d/m/u $d/m/t; echo er >&7; stat -L -c %s /dev/fd/7
exec 5<&- 6<&- 7<&-
""",
    )
    assert out.split() == ["5", "0", "more", "3", "12", "4"], out
