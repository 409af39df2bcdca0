"""RUN --network and build --network (issue 18): none is a network namespace of its own with only lo up.

buildah 1.28 is no oracle here: it refuses `RUN --network` ("RUN only supports the --mount flag") and,
with chroot isolation, any build --network but host; its other isolation needs crun with cgroups this
machine's hybrid hierarchy refuses. So these are expected-result tests after BuildKit's reference
(frontend/dockerfile/docs/reference.md, "RUN --network": none = "no network access", host = "the host's
network environment", default = "the default network", which for rootless BuildKit is the host's).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from conftest import Runner

# tries 127.0.0.1:PORT and prints whether it got there
PROBE = "if echo hello | nc -w 2 127.0.0.1 {port}; then echo RESULT=reached; else echo RESULT=unreachable; fi"


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on the host's 127.0.0.1 (rbuild's own network namespace); what each client sent."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while chunk := conn.recv(1024):
                    data += chunk
                got.append(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], got
    finally:
        stop.set()
        t.join()
        srv.close()


def probed(runner: Runner, ctx: str, *flags: str, cache: bool = False) -> str:
    """What the build's RUN probes printed (RESULT=...), from its output."""
    res = runner.run("build", *(() if cache else ("--no-cache",)), *flags, ctx)
    return " ".join(ln.strip() for ln in res.stderr.splitlines() if ln.startswith("RESULT="))


@pytest.mark.parametrize("user", ["rb", "rb_single"])
def test_run_network_none_and_host(
    request: pytest.FixtureRequest, user: str, busybox: str, listener: tuple[int, list[bytes]]
) -> None:
    runner: Runner = request.getfixturevalue(user)
    port, got = listener
    probe = PROBE.format(port=port)
    ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\nRUN --network=none {probe}\n"})
    assert probed(runner, ctx) == "RESULT=unreachable"
    assert got == []
    ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\nRUN --network=host {probe}\n"})
    assert probed(runner, ctx) == "RESULT=reached"
    assert got == [b"hello\n"]
    # the default is the host's (as buildah's chroot isolation and rootless BuildKit)
    ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\nRUN {probe}\n"})
    assert probed(runner, ctx) == "RESULT=reached"
    assert got == [b"hello\n", b"hello\n"]
    # build --network=none makes it the default; a RUN's own --network=host still wins
    ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\nRUN {probe}\nRUN --network=host {probe}\n"})
    assert probed(runner, ctx, "--network=none") == "RESULT=unreachable RESULT=reached"
    assert len(got) == 3


LOOPBACK = (
    # the listener's stdin is a fifo nobody writes: busybox nc ends at EOF on stdin, which /dev/null gives
    # at once, sometimes before the client's data arrived (an empty /tmp/got under load)
    "mkfifo /tmp/in; nc -l -p 4321 < /tmp/in > /tmp/got & exec 3>/tmp/in; "
    "for i in 1 2 3 4 5 6 7 8 9 10; do echo ping | nc -w 2 127.0.0.1 4321 && break; sleep 0.2; done; wait; "
    "exec 3>&-; "
    "echo RESULT=lo-$(cat /tmp/got); "
    "echo RESULT=ifaces-$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,)"
)


@pytest.mark.parametrize("user", ["rb", "rb_single"])
def test_network_none_has_loopback_up_and_nothing_else(request: pytest.FixtureRequest, user: str, busybox: str) -> None:
    runner: Runner = request.getfixturevalue(user)
    ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\nRUN --network=none {LOOPBACK}\n"})
    assert probed(runner, ctx) == "RESULT=lo-ping RESULT=ifaces-lo,"
    ctx = runner.context({"Containerfile": f"FROM oci:{busybox}\nRUN {LOOPBACK}\n"})
    assert probed(runner, ctx, "--network=none") == "RESULT=lo-ping RESULT=ifaces-lo,"


def test_network_mode_changes_the_cache_key(rb: Runner, busybox: str) -> None:
    """The same RUN on another network is another step (BuildKit: the ExecOp's network mode is in its digest)."""
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo RESULT=ran\n"})
    assert probed(rb, ctx, cache=True) == "RESULT=ran"
    assert probed(rb, ctx, "--network=none", cache=True) == "RESULT=ran"
    assert probed(rb, ctx, "--network=none", cache=True) == ""
    assert probed(rb, ctx, cache=True) == ""


@pytest.mark.parametrize(
    ("flag", "cause"),
    [
        ("--network=private", "--network=private: rbuild has no user-mode network stack"),
        ("--network=bridge", "--network=bridge: unknown network mode"),
    ],
)
def test_bad_network_flag_is_one_error(rb: Runner, busybox: str, flag: str, cause: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN true\n"})
    res = rb.run("build", flag, ctx, check=False)
    assert res.returncode == 125
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith(f"Error: {cause}")


def test_bad_run_network_names_file_and_line(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n\nRUN --network=bridge true\n"})
    res = rb.run("build", ctx, check=False)
    assert res.returncode == 125
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Containerfile:3" in lines[0] and "bridge" in lines[0], res.stderr
