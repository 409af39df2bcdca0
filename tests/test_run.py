"""`rbuild run`, as the unprivileged users: the image's config applied, exit statuses, volumes, input, a real pty."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest
from conftest import default_signals, end_session

CF = """FROM oci:{busybox}
ENV GREETING=hello
RUN mkdir -p /work && chown 1000:1000 /work
WORKDIR /work
USER app
CMD ["sh", "-c", "echo from-cmd $GREETING; id -u; pwd"]
"""


@pytest.fixture(scope="module")
def image(rb, busybox: str) -> str:
    rb.build(rb.context({"Containerfile": CF.format(busybox=busybox)}), "-t", "runme:1")
    return "runme:1"


def test_cmd_env_workdir_user_from_the_image(rb, image: str) -> None:
    res = rb.run("run", "--rm", image)
    assert res.stdout == "from-cmd hello\n1000\n/work\n"


def test_command_and_overrides(rb, image: str) -> None:
    res = rb.run(
        "run",
        "-e",
        "GREETING=bye",
        "-e",
        "EXTRA",
        "--user",
        "0:50",
        "-w",
        "/made/here",
        image,
        "sh",
        "-c",
        "echo $GREETING $EXTRA; id -u; id -g; pwd",
        env={"EXTRA": "passed"},
    )
    assert res.stdout == "bye passed\n0\n50\n/made/here\n"
    assert rb.run("run", "--name", "box1", image, "hostname").stdout == "box1\n"
    ent = rb.run("run", "--entrypoint", "echo", image, "a", "b").stdout
    assert ent == "a b\n"


def test_entrypoint_gets_the_arguments(rb, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f'FROM oci:{busybox}\nENTRYPOINT ["echo", "entry"]\nCMD ["default"]\n'})
    rb.build(ctx, "-t", "entry:1")
    assert rb.run("run", "entry:1").stdout == "entry default\n"
    assert rb.run("run", "entry:1", "given").stdout == "entry given\n"


def test_exit_status_and_errors(rb, image: str) -> None:
    assert rb.run("run", image, "sh", "-c", "exit 7", check=False).returncode == 7
    res = rb.run("run", image, "nosuchprogram", check=False)
    assert res.returncode == 127
    assert res.stderr.strip() == "Error: cannot run nosuchprogram: No such file or directory"
    res = rb.run("run", "--pull=never", "nosuchimage:1", "true", check=False)
    assert (res.returncode, res.stderr.strip()) == (125, "Error: nosuchimage:1: image not known (and --pull=never)")
    res = rb.run("run", "-v", "named:/data", image, "true", check=False)
    assert res.returncode == 125 and "named volumes are not supported" in res.stderr


def test_pulls_what_the_store_lacks(rb, image: str, busybox: str, registry: str) -> None:
    """As docker run: an image not in the store is pulled first (an OCI layout, a registry)."""
    assert rb.run("run", f"oci:{busybox}", "echo", "layout", root=rb.fresh_root()).stdout == "layout\n"
    rb.run("push", "--tls-verify=false", image, f"docker://{registry}/runme:1")
    other = rb.fresh_root()
    res = rb.run("run", "--tls-verify=false", f"{registry}/runme:1", root=other)
    assert res.stdout == "from-cmd hello\n1000\n/work\n"
    assert rb.run("images", "-q", root=other).stdout.strip() != ""  # kept under its name, as docker run does
    assert rb.run("run", "--pull=never", f"{registry}/runme:1", "true", root=other).returncode == 0


@pytest.mark.parametrize("driver", ["overlay", "copy"])
def test_changes_are_thrown_away(rb, image: str, driver: str) -> None:
    flags = ["--storage-driver", driver]
    out = rb.run("run", *flags, "--user", "0", image, "sh", "-c", "echo x > /left-behind; cat /left-behind").stdout
    assert out == "x\n"
    res = rb.run("run", *flags, image, "ls", "/left-behind", check=False)
    assert res.returncode != 0
    assert not [d for d in os.listdir(os.path.join(rb.root, "tmp")) if d.startswith("run-")]


def test_volumes(rb, image: str) -> None:
    d = rb.mkdir()
    rb.write(os.path.join(d, "in.txt"), "from the host\n")
    res = rb.run("run", "--user", "0", "-v", f"{d}:/data", image, "sh", "-c", "cat /data/in.txt; echo out > /data/out")
    assert res.stdout == "from the host\n"
    assert open(os.path.join(d, "out")).read() == "out\n"
    assert os.stat(os.path.join(d, "out")).st_uid == rb.uid  # root in the container is the user
    ro = rb.run("run", "--user", "0", "-v", f"{d}:/data:ro", image, "sh", "-c", "echo x > /data/no", check=False)
    assert ro.returncode != 0 and not os.path.exists(os.path.join(d, "no"))


def test_standard_input(rb, image: str) -> None:
    assert rb.run("run", "-i", image, "cat", input="piped in\n").stdout == "piped in\n"
    assert rb.run("run", image, "cat", input="not passed\n").stdout == ""  # without -i: /dev/null


def test_single_uid_run(rb_single, busybox: str) -> None:
    r = rb_single
    r.build(r.context({"Containerfile": CF.format(busybox=busybox)}), "-t", "runme:single")
    assert r.run("run", "runme:single").stdout == "from-cmd hello\n1000\n/work\n"
    assert r.run("run", "runme:single", "sh", "-c", "exit 4", check=False).returncode == 4


def _read_until(fd: int, want: bytes, timeout: float = 30) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.parametrize("who", ["rb", "rb_single"])
def test_interactive_terminal(who: str, request: pytest.FixtureRequest, busybox: str) -> None:
    """A real pty as rbuild's terminal: the command gets one of its own (tty answers), the exit status passes."""
    r = request.getfixturevalue(who)
    r.build(r.context({"Containerfile": CF.format(busybox=busybox)}), "-t", "runme:tty")
    master, slave = os.openpty()
    proc = subprocess.Popen(
        r._prefix() + [r.bin, "run", "-it", "runme:tty", "sh"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=r._env(None),
        cwd=r.base,
        start_new_session=True,
    )
    os.close(slave)
    try:
        out = _read_until(master, b"$ ")  # busybox sh's prompt for a non-root user
        os.write(master, b"tty; stty size; echo h''i; exit 3\n")
        out += _read_until(master, b"exit 3\r\n", 10)
        out += _read_until(master, b"\n\n", 5)  # whatever the command still prints
        assert proc.wait(30) == 3
        text = out.decode(errors="replace")
        assert "/dev/pts/0" in text
        assert "\r\nhi\r\n" in text
    finally:
        os.close(master)
        end_session(proc)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing(rb, image: str, sig: int) -> None:
    """Ctrl-C (to the process group, as a terminal sends it) or SIGTERM: no process, mount or tree is left."""
    proc = subprocess.Popen(
        rb._prefix() + [rb.bin, "run", image, "sh", "-c", "echo started; sleep 60"],
        env=rb._env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=default_signals,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        assert proc.wait(30) != 0
    finally:
        end_session(proc)
    deadline = time.monotonic() + 15
    while rb.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rb.processes() == []
    assert not [d for d in os.listdir(os.path.join(rb.root, "tmp")) if d.startswith("run-")]
