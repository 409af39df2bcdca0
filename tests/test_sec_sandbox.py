"""A hostile RUN against the sandbox: the caller's terminal, process group, file descriptors, keyring,
and the system calls docker's seccomp profile refuses. Every build runs as an unprivileged test user.

Busybox has no ioctl or keyctl applet, so a tiny static C program (compiled here with the host's gcc)
is copied into the build context and makes those calls from inside the RUN.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator

import pytest
from conftest import Runner, busybox_layer, write_oci_layout

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/keyctl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *what, long r) {
    if (r < 0) printf("%s: %s\n", what, strerrorname_np(errno));
    else printf("%s: ok\n", what);
}

/* pushes a command line into a terminal's input; the text is never printed (the test looks for it) */
static void tiocsti(const char *what, int fd) {
    const char payload[] = {'e', 'c', 'h', 'o', ' ', 'Z', 'Q', 'X', 'J', 'K', '\n', 0};
    long r = 0;
    for (const char *p = payload; *p && r == 0; p++) r = ioctl(fd, TIOCSTI, p);
    report(what, r);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc > 1 && !strcmp(argv[1], "tty")) {
        int fd = open("/dev/tty", O_RDWR);
        report("open /dev/tty", fd);
        if (fd >= 0) tiocsti("tiocsti /dev/tty", fd);
        for (int i = 0; i < 3; i++) {
            char what[32];
            snprintf(what, sizeof what, "tiocsti fd %d", i);
            tiocsti(what, i);
        }
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "key")) {
        long id = syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, "user", "rbuild-test", 0);
        report("search", id);
        if (id >= 0) {
            char buf[256] = {0};
            long n = syscall(SYS_keyctl, KEYCTL_READ, id, buf, sizeof buf - 1);
            report("read", n);
            if (n > 0) printf("content: %s\n", buf);
        }
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "sys")) {
        report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0));
        report("add_key", syscall(SYS_add_key, "user", "probe", "x", 1, KEY_SPEC_PROCESS_KEYRING));
        report("unshare newuser", syscall(SYS_unshare, CLONE_NEWUSER));
        long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (pid == 0) syscall(SYS_exit, 0);
        if (pid > 0) waitpid(pid, NULL, 0);
        report("clone newuser", pid);
        report("clone3", syscall(SYS_clone3, NULL, 0));
        report("personality query", syscall(SYS_personality, 0xffffffffUL));
        report("personality linux32", syscall(SYS_personality, 0x0008UL));
        report("personality no-randomize", syscall(SYS_personality, 0x0040000UL));
        syscall(SYS_personality, 0UL);
        pid = fork();  /* plain process creation still works */
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid(pid, NULL, 0);
        report("fork", pid);
        return 0;
    }
    return 2;
}
"""

USERS = ["rb", "rb_single"]


@pytest.fixture(scope="session")
def probe() -> Iterator[bytes]:
    """The probe program, statically linked (no libc needed in the image)."""
    d = tempfile.mkdtemp(prefix="rbtest-probe-")
    try:
        with open(os.path.join(d, "probe.c"), "w") as f:
            f.write(PROBE_C)
        res = subprocess.run(
            ["gcc", "-static", "-O2", "-o", os.path.join(d, "probe"), os.path.join(d, "probe.c")],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            pytest.fail(f"cannot compile the static probe (scripts/setup.sh installs gcc and libc6-dev):\n{res.stderr}")
        with open(os.path.join(d, "probe"), "rb") as f:
            yield f.read()
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def cf(busybox: str, body: str) -> str:
    return f"FROM oci:{busybox}\n{body}"


def probe_context(runner: Runner, busybox: str, body: str, probe: bytes) -> str:
    ctx = runner.context({"Containerfile": cf(busybox, "COPY probe /probe\n" + body)})
    runner.write(os.path.join(ctx, "probe"), probe, 0o755)
    return ctx


def results(text: str) -> dict[str, str]:
    """The probe's 'what: result' lines."""
    return dict(m.groups() for m in re.finditer(r"^([a-z0-9 /_-]+): (\S+)$", text, re.M))


# -------------------------------------------------------------------------------------------------------
# 1: the user's terminal


def _controlling_tty() -> None:
    """In the child: a session of its own whose controlling terminal is the pty on fd 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _read_all(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 0)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: no slave end open any more
            break
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.parametrize("user", USERS)
def test_run_cannot_reach_the_callers_terminal(
    request: pytest.FixtureRequest, user: str, busybox: str, probe: bytes
) -> None:
    runner: Runner = request.getfixturevalue(user)
    body = (
        "RUN read -r pid comm state ppid pgrp sid tty rest < /proc/self/stat; "
        'echo "stat pid=$pid sid=$sid tty=$tty"; [ -t 1 ] || [ -t 2 ]; echo "output-tty-$?"; '
        "/probe tty\n"
    )
    ctx = probe_context(runner, busybox, body, probe)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        runner._prefix() + [runner.bin, "build", "--no-cache", ctx],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=runner._env(None),
        cwd=runner.base,
        preexec_fn=_controlling_tty,
    )
    out = b""
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 65536)
        out += _read_all(master)
        os.set_blocking(slave, False)
        try:
            queued = os.read(slave, 4096)  # what the terminal holds as typed input for the user's shell
        except BlockingIOError:
            queued = b""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)
    text = out.decode(errors="replace").replace("\r\n", "\n")
    assert proc.returncode == 0, text
    assert b"ZQXJK" not in out and b"ZQXJK" not in queued, (text, queued)
    assert "stat pid=1 sid=1 tty=0" in text, text  # a session of its own, no controlling terminal
    assert "output-tty-1" in text, text  # the RUN writes into a pipe rbuild copies to the terminal
    got = results(text)
    assert got["open /dev/tty"] == "ENXIO", text
    for fd in range(3):
        assert got[f"tiocsti fd {fd}"] == "ENOTTY", text


# -------------------------------------------------------------------------------------------------------
# 4: the caller's process group


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("user", USERS)
def test_run_cannot_signal_the_callers_process_group(request: pytest.FixtureRequest, user: str, busybox: str) -> None:
    runner: Runner = request.getfixturevalue(user)
    ctx = runner.context({"Containerfile": cf(busybox, "RUN kill -KILL 0; kill -9 -1; echo survived\n")})
    pidfile = os.path.join(runner.mkdir(), "sibling")
    # rbuild runs in a process group of its own (the test's is not risked) next to a sibling process
    wrapper = f'sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}; exec "$@"'
    argv = runner._prefix() + ["/bin/sh", "-c", wrapper, "sh", runner.bin, "build", "--no-cache", ctx]
    proc = subprocess.Popen(
        argv,
        env=runner._env(None),
        cwd=runner.base,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sibling = 0
    try:
        _, err = proc.communicate(timeout=120)
        with open(pidfile) as f:
            sibling = int(f.read())
        assert os.getpgid(sibling) == proc.pid  # it was in rbuild's process group
        assert proc.returncode == 0, err
        assert "survived" in err
        assert _alive(sibling)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if sibling:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sibling, signal.SIGKILL)


# -------------------------------------------------------------------------------------------------------
# 5: inherited file descriptors


@pytest.mark.parametrize("user", USERS)
def test_run_gets_only_fds_0_to_2(request: pytest.FixtureRequest, user: str, busybox: str) -> None:
    runner: Runner = request.getfixturevalue(user)
    host_dir = runner.mkdir()
    runner.write(os.path.join(host_dir, "secret.txt"), "host-secret-xyzzy\n", 0o600)
    fd = os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        run = (
            f"RUN echo fds-begin; ls /proc/$$/fd; echo fds-end; cat /proc/$$/fd/{fd}/secret.txt || true; "
            f"cat /proc/self/fd/{fd}/secret.txt || true\n"
        )
        ctx = runner.context({"Containerfile": cf(busybox, run)})
        res = subprocess.run(
            runner._prefix() + [runner.bin, "build", "--no-cache", ctx],
            env=runner._env(None),
            cwd=runner.base,
            capture_output=True,
            text=True,
            timeout=120,
            pass_fds=(fd,),
            check=False,
        )
    finally:
        os.close(fd)
    assert res.returncode == 0, res.stderr
    listing = re.search(r"^fds-begin\n(.*?)^fds-end$", res.stderr, re.M | re.S)
    assert listing is not None, res.stderr
    assert listing.group(1).split() == ["0", "1", "2"], res.stderr
    assert "host-secret-xyzzy" not in res.stderr


# -------------------------------------------------------------------------------------------------------
# 6: the caller's session keyring

KEYRING_WRAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
seccomp = ctypes.CDLL("libseccomp.so.2")  # its tables know each architecture's numbers
def call(name, *args):
    r = libc.syscall(ctypes.c_long(seccomp.seccomp_syscall_resolve_name(name.encode())), *args)
    if r < 0:
        raise OSError(ctypes.get_errno(), name)
    return r
call("keyctl", ctypes.c_long(1), None)  # KEYCTL_JOIN_SESSION_KEYRING: a session keyring of this user's own
secret = b"key-s3cret-value"
call("add_key", b"user", b"rbuild-test", secret, ctypes.c_size_t(len(secret)), ctypes.c_long(-3))  # @s
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize("user", USERS)
def test_run_cannot_read_the_callers_session_keyring(
    request: pytest.FixtureRequest, user: str, busybox: str, probe: bytes
) -> None:
    runner: Runner = request.getfixturevalue(user)
    ctx = probe_context(runner, busybox, "RUN /probe key\n", probe)
    python = os.path.join(os.path.dirname(runner.bin), "python")
    # the wrapper itself proves the key is there: keyctl search finds it outside rbuild
    check = runner._prefix() + [python, "-c", KEYRING_WRAPPER, "/bin/sh", "-c", "cat /proc/keys"]
    res = subprocess.run(check, env=runner._env(None), cwd=runner.base, capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "rbuild-test" in res.stdout, res.stdout + res.stderr
    argv = runner._prefix() + [python, "-c", KEYRING_WRAPPER, runner.bin, "build", "--no-cache", ctx]
    res = subprocess.run(
        argv, env=runner._env(None), cwd=runner.base, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "key-s3cret-value" not in res.stderr
    assert results(res.stderr)["search"] in ("EPERM", "ENOKEY"), res.stderr


# -------------------------------------------------------------------------------------------------------
# seccomp


@pytest.mark.parametrize("user", USERS)
def test_seccomp_refuses_what_dockers_profile_refuses(
    request: pytest.FixtureRequest, user: str, busybox: str, probe: bytes
) -> None:
    runner: Runner = request.getfixturevalue(user)
    ctx = probe_context(
        runner,
        busybox,
        'RUN /probe sys; unshare -U true; echo "unshare-status-$?"; grep Seccomp: /proc/self/status\n',
        probe,
    )
    res = runner.run("build", "--no-cache", ctx, check=False)
    assert res.returncode == 0, res.stderr
    got = results(res.stderr)
    assert got["keyctl"] == "EPERM" and got["add_key"] == "EPERM", res.stderr
    assert got["unshare newuser"] == "EPERM" and got["clone newuser"] == "EPERM", res.stderr
    assert got["clone3"] == "ENOSYS", res.stderr  # libc falls back to clone, whose flags the filter sees
    assert got["personality no-randomize"] == "EPERM", res.stderr
    assert got["personality query"] == "ok" and got["personality linux32"] == "ok", res.stderr
    assert got["fork"] == "ok", res.stderr
    assert "unshare-status-1" in res.stderr, res.stderr
    assert re.search(r"^Seccomp:\s+2$", res.stderr, re.M), res.stderr


# -------------------------------------------------------------------------------------------------------
# supplementary groups


def test_run_gets_the_images_supplementary_groups(rb: Runner, busybox: str) -> None:
    # conftest's /etc/group: staff:x:50:app; docker and buildah add the primary group to the list
    body = (
        "RUN echo 'wheel:x:10:root' >> /etc/group\n"
        'RUN echo "root-$(grep Groups: /proc/self/status)"\n'
        'USER app\nRUN echo "app-$(grep Groups: /proc/self/status)"\n'
        'USER app:staff\nRUN echo "explicit-$(grep Groups: /proc/self/status)"\n'
    )
    res = rb.run("build", "--no-cache", rb.context({"Containerfile": cf(busybox, body)}), check=False)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^root-Groups:\s+0 10\s*$", res.stderr, re.M), res.stderr
    assert re.search(r"^app-Groups:\s+50 1000\s*$", res.stderr, re.M), res.stderr
    assert re.search(r"^explicit-Groups:\s+50\s*$", res.stderr, re.M), res.stderr


def test_single_uid_build_with_group_members_runs(rb_single: Runner, busybox: str) -> None:
    # only gid 0 exists and setgroups is denied in a single-id namespace: the groups are left out
    body = "RUN echo 'wheel:x:10:root' >> /etc/group\nRUN echo ran-as-member\n"
    res = rb_single.run("build", "--no-cache", rb_single.context({"Containerfile": cf(busybox, body)}), check=False)
    assert res.returncode == 0, res.stderr
    assert "ran-as-member" in res.stderr


# -------------------------------------------------------------------------------------------------------
# exit status


@pytest.mark.parametrize(
    "body,status",
    [
        ("RUN exit 127\n", 127),
        ("RUN no-such-command-here\n", 127),
        ("RUN exit 200\n", 200),
        ("RUN sh -c 'kill -9 $$'; exit $?\n", 137),
    ],
)
def test_run_status_passes_through(rb: Runner, busybox: str, body: str, status: int) -> None:
    res = rb.run("build", "--no-cache", rb.context({"Containerfile": cf(busybox, body)}), check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert res.returncode == status, res.stderr
    assert len(errors) == 1 and "Containerfile:2" in errors[0] and f"exit code: {status}" in errors[0], res.stderr
    assert "Traceback" not in res.stderr


# -------------------------------------------------------------------------------------------------------
# the sandbox as data (issue 10)


def test_debug_log_lists_the_sandbox_operations(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, "RUN --mount=type=tmpfs,target=/scratch echo ran\n")})
    res = rb.run("--log-level", "debug", "build", "--no-cache", ctx, check=False)
    assert res.returncode == 0, res.stderr
    ops = [ln.removeprefix("RUN sandbox: ") for ln in res.stderr.splitlines() if ln.startswith("RUN sandbox: ")]
    assert ops[0] == "setsid" and ops[-1].startswith("exec ['/bin/sh', '-c', 'echo ran']"), ops
    names = [op.split()[0] for op in ops]
    for name in ("keyring", "proc", "pivot-root", "capabilities", "no-new-privs", "ids", "close-fds", "seccomp"):
        assert name in names, (name, ops)
    assert names.index("pivot-root") < names.index("close-fds") < names.index("seccomp") < len(names) - 1
    assert any(op.startswith("mount tmpfs tmpfs on ") and op.split()[4].endswith("/scratch") for op in ops), ops
    assert "ran" in res.stderr.splitlines()
    quiet = rb.run("build", "--no-cache", ctx)
    assert "RUN sandbox:" not in quiet.stderr


def test_run_starts_with_default_signal_dispositions(rb: Runner, busybox: str) -> None:
    # Python ignores SIGPIPE and SIGXFSZ, a shell's background job SIGINT and SIGQUIT, and ignored signals
    # survive exec: the RUN starts with none ignored (the exec form: busybox's shell ignores SIGQUIT itself)
    ctx = rb.context({"Containerfile": cf(busybox, 'RUN ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]\n')})
    res = rb.run("build", "--no-cache", ctx, check=False)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^SigIgn:\s+0{16}$", res.stderr, re.M), res.stderr
    assert re.search(r"^SigBlk:\s+0{16}$", res.stderr, re.M), res.stderr


def test_masks_hold_against_image_symlinks_under_proc_and_sys(rb: Runner) -> None:
    # the image ships /sys/firmware and /proc/keys as links to /etc: the masks must land on what the fresh
    # /proc and the /sys bind put there, not follow the image's links (and hide /etc)
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("sys", "proc"):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for name in ("sys/firmware", "proc/keys"):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc"
            tf.addfile(ti)
    layout = rb.mkdir() + "/linked"
    write_oci_layout(layout, [busybox_layer(), buf.getvalue()])
    rb.own(os.path.dirname(layout))
    run = 'RUN test -s /etc/passwd && test -z "$(ls -A /sys/firmware)" && test ! -s /proc/keys && echo masks-in-place\n'
    res = rb.run("build", "--no-cache", rb.context({"Containerfile": f"FROM oci:{layout}\n{run}"}), check=False)
    assert res.returncode == 0, res.stderr
    assert "masks-in-place" in res.stderr.splitlines()
