"""Independent stages built at once (`--jobs`, issue 15), as the unprivileged users.

Overlap is proved by files, never by a clock: the two stages' RUNs share a cache mount, each marks its
start there and waits (up to a bound) for the other's mark; a stage records whether the other had started
while it ran, or had finished before it began. Built one by one, the first stage never sees the second
start and the second sees the first's end.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import pathlib
import signal
import subprocess
import time
import uuid
from typing import Any

import pytest
from conftest import Runner, default_signals
from test_events_schema import validate_lines

# each RUN: "after" if the other stage had ended before it began, "overlap" if it saw the other start
# while it ran (waiting at most 10 s for that), "alone" if not
HANDSHAKE = (
    "RUN --mount=type=cache,id={token},target=/c "
    "if [ -e /c/{other}-end ]; then r=after; else r=alone; fi; touch /c/{me}-start; i=0; "
    'while [ "$r" = alone ] && [ $i -lt 100 ]; do [ -e /c/{other}-start ] && r=overlap; sleep 0.1; i=$((i+1)); done; '
    "echo {me}-says-$r; echo $r > /result; touch /c/{me}-end\n"
)


def two_stages(busybox: str, token: str | None = None) -> str:
    token = token or uuid.uuid4().hex
    return (
        f"FROM oci:{busybox} AS a\n"
        + HANDSHAKE.format(token=token, me="a", other="b")
        + f"FROM oci:{busybox} AS b\n"
        + HANDSHAKE.format(token=token, me="b", other="a")
        + f"FROM oci:{busybox}\n"
        "COPY --from=a /result /a\n"
        "COPY --from=b /result /b\n"
    )


def results(runner: Runner, ctx: str, *extra: str) -> tuple[dict[str, str], subprocess.CompletedProcess]:
    """Build ctx, export the image's root filesystem; what /a and /b say, and the build's process."""
    out = runner.mkdir()
    res = runner.run("build", "--no-cache", "--progress=plain", "-o", f"type=local,dest={out}", *extra, ctx)
    return {name: pathlib.Path(out, name).read_text().strip() for name in ("a", "b")}, res


@pytest.fixture(params=["sub", "single"])
def runner(request: Any, rb: Runner, rb_single: Runner) -> Runner:
    return rb if request.param == "sub" else rb_single


def test_independent_stages_overlap(runner: Runner, busybox: str) -> None:
    ctx = runner.context({"Containerfile": two_stages(busybox)})
    got, res = results(runner, ctx, "--jobs", "2")
    assert got == {"a": "overlap", "b": "overlap"}, res.stderr


def test_jobs_1_builds_one_stage_after_the_other(runner: Runner, busybox: str) -> None:
    ctx = runner.context({"Containerfile": two_stages(busybox)})
    got, res = results(runner, ctx, "--jobs", "1")
    assert got == {"a": "alone", "b": "after"}, res.stderr
    assert "[1/3] a-says" not in res.stderr and "a-says-alone" in res.stderr  # output as it always was


def test_output_of_stages_at_once_is_attributed(runner: Runner, busybox: str) -> None:
    ctx = runner.context({"Containerfile": two_stages(busybox)})
    got, res = results(runner, ctx, "--jobs", "2")
    assert got == {"a": "overlap", "b": "overlap"}
    lines = res.stderr.splitlines()
    assert "[1/3] a-says-overlap" in lines and "[2/3] b-says-overlap" in lines, res.stderr
    said = [ln for ln in lines if ln.endswith(("-says-overlap", "-says-alone", "-says-after"))]
    assert sorted(said) == ["[1/3] a-says-overlap", "[2/3] b-says-overlap"], res.stderr
    # every step's lines say their stage: the layer lines too
    assert len([ln for ln in lines if ln.startswith(("[1/3] --> ", "[2/3] --> "))]) >= 2, res.stderr


def test_json_events_carry_the_stage(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": two_stages(busybox)})
    res = rb.run("build", "--no-cache", "--jobs", "2", "--progress=json", ctx)
    events = validate_lines(res.stderr)  # every line an event of the schema
    steps = [e for e in events if e["type"] == "step"]
    assert steps and all(e["parallel"] for e in steps)
    said = {e["stage"]: base64.b64decode(e["data"]).decode() for e in events if e["type"] == "output"}
    assert "a-says-overlap" in said[1] and "b-says-overlap" in said[2]
    assert {e["stage"] for e in events if e["type"] == "step-done"} == {1, 2, 3}


def test_image_is_the_same_as_built_one_by_one(runner: Runner, busybox: str) -> None:
    """The same layers, config and id whichever the order the stages ran in (no cache: both really run)."""
    cf = (
        f"FROM oci:{busybox} AS a\nRUN sleep 1; echo a > /a; mkdir /d; echo x > /d/x\n"
        f"FROM oci:{busybox} AS b\nRUN echo b > /b\nCOPY --chmod=600 Containerfile /cf\n"
        f"FROM oci:{busybox}\nCOPY --from=b /b /cf /\nCOPY --from=a /a /d /\nRUN cat /a /b /x\n"
    )
    ctx = runner.context({"Containerfile": cf})
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    one = runner.run("build", "-q", "--no-cache", "--jobs", "1", ctx, env=env).stdout.strip()
    two = runner.run("build", "-q", "--no-cache", "--jobs", "2", ctx, env=env).stdout.strip()
    assert one == two and one.startswith("sha256:")


def test_stages_at_once_copy_context_directories_as_one_by_one(runner: Runner, busybox: str) -> None:
    """Two stages COPY context directories at once (each laid out while hashed, then renamed into its upper):
    the same image as one by one, every file where its own COPY put it."""
    files = {f"{d}/sub/f{i}": f"{d}{i}\n" for d in ("one", "two") for i in range(200)}
    cf = (
        f"FROM oci:{busybox} AS a\nCOPY one/ /one/\n"
        f"FROM oci:{busybox} AS b\nCOPY two/ /two/\n"
        f"FROM oci:{busybox}\nCOPY --from=a /one /one\nCOPY --from=b /two /two\n"
        "RUN cat /one/sub/f7 /two/sub/f199 && ls /one/sub | wc -l && ls /two/sub | wc -l\n"
    )
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    ids = []
    for jobs in ("1", "2"):
        ctx = runner.context({"Containerfile": cf, **files})  # a fresh context: no digests known, both lay out
        res = runner.run("build", "--no-cache", "--progress", "plain", "--jobs", jobs, ctx, env=env)
        lines = [ln.split("] ", 1)[-1] if ln.startswith("[") else ln for ln in res.stderr.splitlines()]
        assert "one7\ntwo199\n200\n200" in "\n".join(lines), res.stderr
        ids.append(res.stdout.strip().splitlines()[-1])
    assert ids[0] == ids[1] and ids[0].startswith("sha256:"), ids


def test_copy_driver_builds_stages_at_once(rb: Runner, busybox: str) -> None:
    """The copy driver keeps parent trees between steps: stages at once share that pool, and their images are
    still those of one stage after the other."""
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": two_stages(busybox)})
    out = rb.mkdir()
    res = rb.run(
        "--storage-driver", "copy", "build", "--jobs", "2", "-o", f"type=local,dest={out}", ctx, root=root, check=False
    )
    assert res.returncode == 0, res.stderr
    assert {n: pathlib.Path(out, n).read_text().strip() for n in ("a", "b")} == {"a": "overlap", "b": "overlap"}
    cf = (
        f"FROM oci:{busybox} AS a\nRUN echo a > /a && rm /bin/ls\nRUN echo a2 >> /a\n"
        f"FROM oci:{busybox} AS b\nRUN echo b > /b && rm /bin/ls\nRUN echo b2 >> /b\n"
        f"FROM oci:{busybox}\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nRUN rm /bin/ls\n"
    )
    ctx = rb.context({"Containerfile": cf})
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    ids = [
        rb.run(
            "--storage-driver", "copy", "build", "-q", "--no-cache", "--jobs", j, ctx, root=root, env=env
        ).stdout.strip()
        for j in ("1", "2")
    ]
    assert ids[0] == ids[1] and ids[0].startswith("sha256:")


def test_stages_at_once_pull_the_same_base_once_into_one_store(runner: Runner, busybox: str, registry: str) -> None:
    """Two stages FROM one registry image not in the store: both threads pull and import it; the store ends
    with one complete image (`rbuild check` finds nothing to repair)."""
    base = f"{registry}/parallel/busybox:{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{busybox}:latest", f"docker://{base}"],
        check=True,
        capture_output=True,
    )
    root = runner.fresh_root()
    cf = (
        f"FROM {base} AS a\nRUN echo a > /a\nFROM {base} AS b\nRUN echo b > /b\n"
        f"FROM {base}\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nRUN cat /a /b\n"
    )
    ctx = runner.context({"Containerfile": cf})
    res = runner.run("build", "--jobs", "2", "--tls-verify=false", ctx, root=root, check=False)
    assert res.returncode == 0, res.stderr
    check = runner.run("check", root=root, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    images = runner.run("images", "--format", "json", root=root).stdout
    assert len([i for i in json.loads(images) if base.split("/", 1)[1].split(":")[0] in json.dumps(i)]) == 1


def test_a_stage_no_dependency_names_is_waited_for(rb: Runner, busybox: str) -> None:
    """RUN --mount=from=a whose options hold a variable names its stage only when the step runs (the planner
    cannot parse it): built with another stage at once, it waits for `a` as one-by-one order would have it."""
    cf = (
        f"FROM oci:{busybox} AS a\nRUN sleep 2; echo from-a > /a\n"
        f"FROM oci:{busybox} AS b\nARG RO=true\nRUN --mount=type=bind,from=a,target=/m,readonly=$RO cat /m/a > /got\n"
        f"FROM oci:{busybox}\nCOPY --from=b /got /got\nCOPY --from=a /a /a\n"
    )
    ctx = rb.context({"Containerfile": cf})
    out = rb.mkdir()
    rb.run("build", "--no-cache", "--jobs", "2", "-o", f"type=local,dest={out}", ctx)
    assert pathlib.Path(out, "got").read_text() == "from-a\n"


def test_fuse_driver_builds_stages_at_once(rb: Runner, busybox: str, dev_fuse: None) -> None:
    """The FUSE helper of each step is started from its stage's thread (it dies with that thread's exit:
    PR_SET_PDEATHSIG), lives for the step and is gone after the build."""
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": two_stages(busybox)})
    out = rb.mkdir()
    res = rb.run(
        "--storage-driver", "fuse", "build", "--jobs", "2", "-o", f"type=local,dest={out}", ctx, root=root, check=False
    )
    assert res.returncode == 0, res.stderr
    assert {n: pathlib.Path(out, n).read_text().strip() for n in ("a", "b")} == {"a": "overlap", "b": "overlap"}
    assert _no_processes(rb)


def test_a_failing_stage_stops_the_others_with_one_error(runner: Runner, busybox: str) -> None:
    root = runner.fresh_root()
    token = uuid.uuid4().hex
    cf = (
        f"FROM oci:{busybox} AS slow\n"
        f"RUN --mount=type=cache,id={token},target=/c touch /c/slow-started; sleep 600; touch /c/slow-finished\n"
        f"FROM oci:{busybox} AS bad\n"
        f"RUN --mount=type=cache,id={token},target=/c "
        "i=0; while [ ! -e /c/slow-started ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 3\n"
        f"FROM oci:{busybox}\nCOPY --from=slow /etc/passwd /1\nCOPY --from=bad /etc/passwd /2\n"
    )
    ctx = runner.context({"Containerfile": cf})
    # the bound only catches a build that waits for the slow stage's sleep instead of ending it
    res = runner.run("build", "--jobs", "2", ctx, root=root, check=False, timeout=120)
    assert res.returncode == 3, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and ":4: RUN:" in errors[0] and "exit code: 3" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "Cancelled" not in res.stderr
    assert _no_processes(runner)
    assert os.listdir(os.path.join(root, "tmp")) == []  # every stage unwound its staging (and its mounts)
    mounts = os.path.join(root, "cache-mounts")
    (cache,) = [d for d in os.listdir(mounts) if os.path.isdir(os.path.join(mounts, d))]
    assert sorted(os.listdir(os.path.join(mounts, cache))) == ["slow-started"]  # its RUN was ended


def test_ctrl_c_ends_stages_running_at_once(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    cf = (
        f"FROM oci:{busybox} AS a\nRUN echo started-a; sleep 600\n"
        f"FROM oci:{busybox} AS b\nRUN echo started-b; sleep 600\n"
        f"FROM oci:{busybox}\nCOPY --from=a /etc/passwd /1\nCOPY --from=b /etc/passwd /2\n"
    )
    ctx = rb.context({"Containerfile": cf})
    proc = subprocess.Popen(
        rb._prefix() + [rb.bin, "build", "--jobs", "2", "--progress=plain", ctx],
        env=rb._env({"RBUILD_ROOT": root}),
        cwd=rb.base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=default_signals,
    )
    try:
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        seen, deadline = b"", time.monotonic() + 60
        while not (b"started-a" in seen and b"started-b" in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += proc.stderr.read() or b""
        assert b"started-a" in seen and b"started-b" in seen, seen
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        proc.wait(60)
    finally:
        if proc.returncode is None:  # the test failed: still end what it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert _no_processes(rb)
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_bad_jobs_value_is_one_error_line(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n"})
    res = rb.run("build", "--jobs", "0", ctx, check=False)
    assert res.returncode == 125
    assert res.stderr.strip().splitlines()[-1].startswith("Error:") and "--jobs" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.unit
def test_no_python_fork_in_the_threaded_builder() -> None:
    """Stages run in threads: whatever a build does after they start may not os.fork() (a fork of a threaded
    process may hold a lock forever); the sandbox and the FUSE helper are new programs (subprocess)."""
    pkg = pathlib.Path(__file__).resolve().parent.parent / "rootless"
    found = []
    for sub in ("build", "rootfs", "sandbox", "store", "layer", "blob", "oci", "registry"):
        for path in sorted((pkg / sub).glob("*.py")):
            if path.name == "runinit.py":  # a program of its own, single-threaded
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("fork", "forkpty", "register_at_fork"):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []


@pytest.mark.unit
def test_schedule_overlap_and_order() -> None:
    from rootless.build.planner import plan
    from rootless.build.schedule import can_overlap
    from rootless.events import NullReporter

    def p(text: str) -> Any:
        return plan(text.encode(), "Containerfile", "/", {}, None, NullReporter())

    assert not can_overlap(p("FROM scratch AS a\nFROM a AS b\nFROM b\n"))  # a chain
    assert can_overlap(p("FROM scratch AS a\nFROM scratch AS b\nFROM a\nCOPY --from=b / /\n"))
    assert not can_overlap(p("FROM scratch AS a\nFROM scratch AS b\nFROM a\n"))  # b is not built


def _no_processes(rb: Runner) -> bool:
    deadline = time.monotonic() + 15
    while rb.processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _screen(master: int) -> str:
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end is closed: all read
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    return screen.decode()


@pytest.mark.unit
def test_tty_view_keeps_one_running_step_per_stage() -> None:
    """Two stages' steps run at once: each event goes to its own stage's step, each step ends with its time."""
    from rootless.cli.tty import TtyReporter
    from rootless.events import Output, StepDone, StepStarted

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        r = TtyReporter(tty, color=False)
        r.emit(StepStarted(1, 3, 2, 2, "RUN a", "Containerfile", 2, True))
        r.emit(StepStarted(2, 3, 2, 2, "RUN b", "Containerfile", 4, True))
        r.emit(Output(b"from-b\n", stage=2))
        r.emit(Output(b"from-a\n", stage=1))
        r.emit(StepDone("b" * 64, None, 2.0, False, stage=2))
        r.failed()  # stage 1's step is the one left: its own output, not stage 2's
    text = _screen(master)
    assert "✔ [2/3] 2/2 RUN b  2.0s" in text
    failed = text[text.index("FAILED [1/3] 2/2 RUN a") :]
    assert "from-a" in failed and "from-b" not in failed


@pytest.mark.unit
def test_plain_lines_of_stages_at_once_are_tagged_line_by_line() -> None:
    """Chunks of two RUNs' output interleave mid-line: each line still begins with its stage."""
    import io

    from rootless.cli.report import PlainReporter
    from rootless.events import Output, StepDone, StepStarted

    class Stream(io.TextIOWrapper):
        def isatty(self) -> bool:
            return False

    raw = io.BytesIO()
    stream = Stream(raw, encoding="utf-8", write_through=True)
    r = PlainReporter(stream)
    r.emit(StepStarted(1, 3, 2, 2, "RUN a", "Containerfile", 2, True))
    r.emit(StepStarted(2, 3, 2, 2, "RUN b", "Containerfile", 4, True))
    r.emit(Output(b"a1\na2-start", stage=1))
    r.emit(Output(b"b1\n", stage=2))
    r.emit(Output(b"-end\n", stage=1))
    r.emit(StepDone("c" * 64, None, 1.0, False, stage=2))
    stream.flush()
    assert raw.getvalue().decode().splitlines() == [
        "[1/3] STEP 2/2: RUN a",
        "[2/3] STEP 2/2: RUN b",
        "[1/3] a1",
        "[1/3] a2-start",
        "[2/3] b1",
        "[1/3] -end",
        "[2/3] --> cccccccccccc",
    ]


@pytest.mark.unit
def test_api_refuses_a_negative_number_of_jobs(tmp_path: pathlib.Path) -> None:
    import rootless
    from rootless.errors import RbuildError

    with pytest.raises(RbuildError, match="jobs=-1"):
        rootless.build(str(tmp_path), jobs=-1)


@pytest.mark.unit
def test_tty_view_ends_a_stage_of_from_alone() -> None:
    """A stage of FROM alone makes no StepDone: one by one, the next stage's step ends it (and gets its header);
    at once, any next step does, not the build's end."""
    from rootless.cli.tty import TtyReporter
    from rootless.events import StepStarted

    for parallel in (False, True):
        master, slave = os.openpty()
        with os.fdopen(slave, "w") as tty:
            r = TtyReporter(tty, color=False)
            r.emit(StepStarted(1, 2, 1, 1, "FROM x AS base", "Containerfile", 1, parallel))
            r.emit(StepStarted(2, 2, 1, 2, "FROM base", "Containerfile", 2, parallel))
            assert list(r._steps) == [2]
            r._stop.set()
        text = _screen(master)
        assert "✔ [1/2] 1/1 FROM x AS base" in text
        assert ("stage 2/2" in text) is not parallel


@pytest.mark.unit
def test_runinit_ends_quietly_when_the_builder_is_interrupted_before_the_plan() -> None:
    """Ctrl-C (or a stage's cancellation) between starting the sandbox and writing its plan: runinit reads
    nothing and ends without a traceback on the build's stderr (it printed `EOFError` before)."""
    import sys

    from rootless.sandbox import spec

    r, w = os.pipe()
    os.close(w)
    try:
        res = subprocess.run(
            [sys.executable, "-S", "-I", spec._RUNINIT, str(r)], pass_fds=(r,), capture_output=True, timeout=60
        )
    finally:
        os.close(r)
    assert (res.returncode, res.stderr) == (125, b"")
