"""rbuild-notify (csrc/notify/), the C front of the single-uid RUN supervisor (issue 12).

It receives a single-uid RUN's seccomp notifications, answers get*id (while no process switched ids) and
stat of entries without a record itself, and forwards the rest to the Python supervisor
(rootless/sandbox/notify.py). Built here with ASan and UBSan and named by RBUILD_NOTIFY_HELPER, it must
give the RUN the answers the Python supervisor alone gives (RBUILD_NOTIFY_HELPER=none), including after a
process switched ids (su: every get*id is Python's from then on) and after a chown (stat looks at
records). `rbuild doctor` says which answers.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
from conftest import Runner

pytestmark = pytest.mark.e2e

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")
SANITIZE = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"

# a chown (a record: stat must look from then on), a symlink's owner (forwarded: its parent's record),
# a switch of ids (su: the get*id after it are forwarded), and stat, ls -ln and find over all of it
BODY = (
    "RUN echo 'svc:x:2000:2000::/:/bin/sh' >> /etc/passwd && echo 'svc:x:2000:' >> /etc/group "
    "&& mkdir /x && touch /x/f /x/g && chown 42:43 /x/f && ln -s f /x/l && chown -h 5:6 /x/l "
    "&& (stat -c '%n %u:%g' /x/f /x/g /x/l /bin; ls -ln /x | awk '{print $3, $4, $9}'; find /x -user 42; "
    "id -u; su -s /bin/sh svc -c 'id -u; id -g'; id -u) "
    "| sed 's/^/OUT /'\n"
)


@pytest.fixture(scope="module")
def work() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="rbuild-notify-test-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def asan_notify(work: str) -> str:
    out = os.path.join(work, "rbuild-notify")
    res = subprocess.run(
        ["make", "-s", "-B", "-C", CSRC, "notify", f"NOTIFY_OUT={out}", f"EXTRA_CFLAGS={SANITIZE}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    os.chmod(out, 0o755)
    return out


def _build(rb: Runner, busybox: str, helper: str, logdir: str) -> tuple[list[str], str]:
    """The RUN's OUT lines and the supervisor's debug line of a --no-cache build of BODY."""
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n{BODY}"})
    env = {
        "RBUILD_NOTIFY_HELPER": helper,
        "ASAN_OPTIONS": f"log_path={logdir}/asan:detect_leaks=1:abort_on_error=0",
        "UBSAN_OPTIONS": f"log_path={logdir}/ubsan:print_stacktrace=1:halt_on_error=1",
    }
    res = rb.run("build", "--no-cache", "--progress", "plain", "--log-level", "debug", ctx, env=env)
    out = [ln[4:] for ln in res.stderr.splitlines() if ln.startswith("OUT ")]
    sup = [ln for ln in res.stderr.splitlines() if "RUN supervisor:" in ln]
    assert len(sup) == 1, res.stderr
    return out, sup[0]


def test_front_answers_as_the_python_supervisor(rb_single: Runner, busybox: str, asan_notify: str) -> None:
    logdir = rb_single.mkdir()
    os.chmod(logdir, 0o777)
    front, front_log = _build(rb_single, busybox, asan_notify, logdir)
    alone, alone_log = _build(rb_single, busybox, "none", logdir)
    assert front == alone
    assert front[:4] == ["/x/f 42:43", "/x/g 0:0", "/x/l 5:6", "/bin 0:0"], front
    assert "42 43 f" in front and "0 0 g" in front and "5 6 l" in front and "/x/f" in front
    assert front[-4:] == ["0", "2000", "2000", "0"], front  # id -u; su's id -u, id -g; id -u after su
    # the C front answered calls (the record-free stats, getuid before su), and Python the rest
    assert "rbuild-notify: " in front_log and "Python: " in front_log and "chown" in front_log, front_log
    assert "rbuild-notify" not in alone_log and "Python: " in alone_log, alone_log
    reports = {p: open(p, errors="replace").read() for p in glob.glob(os.path.join(logdir, "*"))}
    assert not reports, "sanitizer reports:\n" + "\n".join(f"{p}:\n{t}" for p, t in reports.items())


def test_missing_front_falls_back_to_python(rb_single: Runner, busybox: str, work: str) -> None:
    missing = os.path.join(work, "no-such-rbuild-notify")
    logdir = rb_single.mkdir()
    out, log = _build(rb_single, busybox, missing, logdir)
    assert out[0] == "/x/f 42:43" and out[-4:] == ["0", "2000", "2000", "0"], out
    assert "rbuild-notify" not in log and "Python: " in log, log
    res = rb_single.run("doctor", "--json", env={"RBUILD_NOTIFY_HELPER": missing})
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert "rbuild-notify not built" in checks["notify_helper"]["detail"], checks["notify_helper"]


def test_doctor_names_the_front(rb_single: Runner, asan_notify: str) -> None:
    res = rb_single.run("doctor", "--json", env={"RBUILD_NOTIFY_HELPER": asan_notify})
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["notify_helper"]["ok"] and asan_notify in checks["notify_helper"]["detail"]


def test_lowers_record_scan_is_kept_with_the_layer(rb_single: Runner, busybox: str) -> None:
    # each RUN used to scan every lower layer for records (0.2 s for 50,000 files): now once per layer
    root = rb_single.mkdir()
    ctx = rb_single.context({"Containerfile": f"FROM oci:{busybox}\nRUN mkdir /d && touch /d/a\nRUN true\n"})
    rb_single.build(ctx, "--no-cache", root=root)
    metas = [json.load(open(p)) for p in glob.glob(os.path.join(root, "chains", "*.json"))]
    # busybox's layer holds one (/home/app is 1000's): the layers above it need no look (bottom first)
    assert [m.get("records") for m in metas if "records" in m] == [True], metas
