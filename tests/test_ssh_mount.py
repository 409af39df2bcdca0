"""RUN --mount=type=ssh with --ssh (issue 18): a real ssh-agent, started here, reached from inside RUN.

BuildKit's behaviour (client/llb/exec.go, AddSSHSocket; frontend/dockerfile/docs/reference.md "RUN
--mount=type=ssh"): the agent's socket at /run/buildkit/ssh_agent.N unless a target is given,
SSH_AUTH_SOCK naming it, id `default` unless given, a missing id an error only with required=true.
The RUN runs the host's own ssh-add (copied with its libraries, started through its dynamic loader:
busybox has no ssh client). buildah 1.28 has --ssh too: the differential test compares the images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from conftest import Runner
from ocitree import diff_configs, diff_trees, drop_empty_stubs, flatten, load
from test_differential import Buildah, _buildah_config, _buildah_tree, _config, _tree, buildah_session

SSH_ADD = "/usr/bin/ssh-add"
# ssh-add from /tools, with its libraries: the loader runs it (the image has no /lib)
RUN_SSH_ADD = "/tools/ld.so --library-path /tools/lib /tools/ssh-add"


def tools_context(runner: Runner, containerfile: str) -> str:
    """A context with the Containerfile and tools/: ssh-add, its loader and libraries."""
    if shutil.which("ssh-agent") is None or not os.path.exists(SSH_ADD):
        pytest.fail("openssh-client is not installed (scripts/setup.sh installs it)")
    ctx = runner.context({"Containerfile": containerfile})
    tools = os.path.join(ctx, "tools")
    os.makedirs(os.path.join(tools, "lib"))
    shutil.copy(SSH_ADD, os.path.join(tools, "ssh-add"))
    out = subprocess.run(["ldd", SSH_ADD], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/lib64/ld-linux"):
            shutil.copy(path, os.path.join(tools, "ld.so"))
        elif path.startswith("/"):
            shutil.copy(path, os.path.join(tools, "lib", os.path.basename(path)))
    runner.own(ctx)
    return ctx


@pytest.fixture
def agent(rb: Runner, rb_single: Runner) -> Iterator[tuple[str, str, str]]:
    """A key pair and an ssh-agent holding it, for rb and rb_single (socket readable by both users' groups).

    Returns (socket, key file, the key's fingerprint line as ssh-add -l prints it)."""
    d = rb.mkdir()
    os.chmod(d, 0o755)
    key = os.path.join(d, "id_test")
    rb.sh(f"ssh-keygen -q -t ed25519 -N '' -C rbuild-test-key -f {key}")
    fp = rb.sh(f"ssh-keygen -l -f {key}").stdout.strip()
    procs = []
    socks = {}
    for runner in (rb, rb_single):
        sock = os.path.join(runner.mkdir(), "agent.sock")
        p = subprocess.Popen(
            [*runner._prefix(), "ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(p)
        socks[runner.name] = sock
    try:
        for runner in (rb, rb_single):
            sock = socks[runner.name]
            for _ in range(500):
                if os.path.exists(sock):
                    break
                subprocess.run(["sleep", "0.01"], check=True)
            own_key = os.path.join(runner.mkdir(), "id")
            shutil.copy(key, own_key)
            os.chown(own_key, runner.uid, runner.gid)
            os.chmod(own_key, 0o600)
            runner.sh(f"ssh-add -q {own_key}", env={"SSH_AUTH_SOCK": sock})
        yield socks[rb.name], key, fp, socks[rb_single.name]  # type: ignore[misc]
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def results(runner: Runner, ctx: str, *flags: str, env: dict[str, str] | None = None) -> list[str]:
    res = runner.run("build", "--no-cache", *flags, ctx, env=env)
    return [ln.strip() for ln in res.stderr.splitlines() if ln.startswith("RESULT")]


@pytest.mark.parametrize("user", ["rb", "rb_single"])
def test_ssh_agent_forwarded(request: pytest.FixtureRequest, user: str, busybox: str, agent: tuple[str, ...]) -> None:
    runner: Runner = request.getfixturevalue(user)
    sock = agent[0] if user == "rb" else agent[3]
    fp = agent[2]
    cf = (
        f"FROM oci:{busybox}\nCOPY tools /tools\n"
        f'RUN --mount=type=ssh echo "RESULT $SSH_AUTH_SOCK" && {RUN_SSH_ADD} -l | sed "s/^/RESULT /"\n'
        "RUN --mount=type=ssh,id=other,target=/agent.sock SSH_AUTH_SOCK=/agent.sock "
        f'{RUN_SSH_ADD} -l | sed "s/^/RESULT /"\n'
        "RUN test ! -e /run/buildkit/ssh_agent.0 && test ! -e /agent.sock && "
        'echo "RESULT gone:${SSH_AUTH_SOCK:-unset}"\n'
    )
    ctx = tools_context(runner, cf)
    got = results(runner, ctx, "--ssh", "default", "--ssh", f"other={sock}", env={"SSH_AUTH_SOCK": sock})
    assert got == ["RESULT /run/buildkit/ssh_agent.0", f"RESULT {fp}", f"RESULT {fp}", "RESULT gone:unset"]


def test_ssh_key_file_gets_an_agent(rb: Runner, busybox: str, agent: tuple[str, ...]) -> None:
    """--ssh ID=KEYFILE: rbuild starts an agent holding the key for the build and ends it afterwards."""
    key = os.path.join(rb.mkdir(), "id")
    shutil.copy(agent[1], key)
    os.chown(key, rb.uid, rb.gid)
    os.chmod(key, 0o600)
    cf = (
        f'FROM oci:{busybox}\nCOPY tools /tools\nRUN --mount=type=ssh,id=deploy {RUN_SSH_ADD} -l | sed "s/^/RESULT /"\n'
    )
    ctx = tools_context(rb, cf)
    assert results(rb, ctx, "--ssh", f"deploy={key}") == [f"RESULT {agent[2]}"]
    assert not [p for p in rb.processes() if "ssh-agent" in p and "rbuild-ssh-" in p]


def test_ssh_missing_and_required(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN --mount=type=ssh echo RESULT ran\n"})
    assert results(rb, ctx) == ["RESULT ran"]  # not required: the RUN goes on without it
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n\nRUN --mount=type=ssh,required=true true\n"})
    res = rb.run("build", "-q", ctx, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 125 and len(lines) == 1, res.stderr
    assert "Containerfile:3" in lines[0] and "no SSH agent default was given" in lines[0]
    res = rb.run("build", "--ssh", "default", ctx, check=False, env={"SSH_AUTH_SOCK": None})  # type: ignore[dict-item]
    assert res.returncode == 125 and res.stderr.startswith("Error: --ssh default: SSH_AUTH_SOCK is not set")
    res = rb.run("build", "--ssh", "k=/nonexistent/key", ctx, check=False)
    assert (
        res.returncode == 125
        and res.stderr.strip() == "Error: --ssh k=/nonexistent/key: /nonexistent/key: No such file or directory"
    )


# ---------------------------------------------------------------------------------------------------------
# against buildah 1.28


@pytest.fixture(scope="module")
def buildah(rb: Runner) -> Iterator[Buildah]:
    with buildah_session(rb, "buildah-ssh") as b:
        yield b


def test_differential_ssh_mount(rb: Runner, busybox: str, buildah: Buildah, agent: tuple[str, ...]) -> None:
    base = buildah.import_layout(busybox, "localhost/ssh-base")
    cf = (
        "FROM {base}\nCOPY tools /tools\n"
        f'RUN --mount=type=ssh echo "$SSH_AUTH_SOCK" > /sock && {RUN_SSH_ADD} -l > /keys\n'
        "RUN rm -rf /tools\n"
    )
    ctx = tools_context(rb, cf.format(base=f"oci:{busybox}"))
    bfile = ctx + ".buildah"
    with open(bfile, "w") as f:
        f.write(cf.format(base=base))
    buildah.build(ctx, "localhost/ssh-diff", "-f", bfile, "--ssh", f"default={agent[0]}")
    out = rb.mkdir()
    buildah.push("localhost/ssh-diff", f"oci:{out}/b:latest")
    bimg = load(f"{out}/b", "latest")
    rb.build(ctx, "-t", "localhost/ssh-diff", "--ssh", f"default={agent[0]}")
    rb.run("push", "localhost/ssh-diff", f"oci:{out}/r:latest")
    rimg = load(f"{out}/r", "latest")
    assert diff_configs(_buildah_config(bimg, "oci"), _config(rimg, "oci")) == []
    rtree = _tree(rimg)
    # buildah leaves the mount point's parents (/run/buildkit, /run) in the image; BuildKit removes the
    # stubs it made for a RUN's mounts (executor/stubs.go, MountStubsCleaner), as rbuild does
    btree = drop_empty_stubs(_buildah_tree(bimg, rtree), ("/run/buildkit", "/run"))
    assert diff_trees(btree, rtree) == []
    assert rtree["/keys"].size > 0 and "/run/buildkit/ssh_agent.0" not in flatten(rimg.layers)
