"""The live terminal view (`--progress=tty`, `auto` on a terminal), driven in a real terminal: tmux runs
rbuild as the `rb` user in a 120x40 pane, and the test reads the screen with capture-pane."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from conftest import Runner

from rootless.cli.tty import TtyReporter
from rootless.events import BuildDone, CacheHit, Output, StepDone, StepStarted, Transfer

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (scripts/setup.sh)")


class Tmux:
    """A private tmux server (its own socket), one session a command."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.n = 0

    def start(self, rb: Runner, *args: str, root: str) -> str:
        """rbuild ARGS as rb in a fresh 120x40 terminal; the pane stays after it ends (EXIT=<status>)."""
        self.n += 1
        name = f"s{self.n}"
        env = rb._env({"RBUILD_ROOT": root, "TERM": "xterm-256color"})
        argv = [*rb._prefix(), "env", "-i", *(f"{k}={v}" for k, v in env.items()), rb.bin, *args]
        script = f"cd {shlex.quote(rb.base)}; {shlex.join(argv)}; echo EXIT=$?; sleep 600"
        subprocess.run(
            ["tmux", "-S", self.sock, "new-session", "-d", "-x", "120", "-y", "40", "-s", name, "sh", "-c", script],
            check=True,
        )
        return name

    def screen(self, name: str) -> str:
        return subprocess.run(
            ["tmux", "-S", self.sock, "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=True
        ).stdout

    def wait(self, name: str, text: str, timeout: float = 240) -> str:
        """The screen once it shows text (polled; a failure shows the last screen)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen(name)
            if text in shown or time.monotonic() > deadline:
                assert text in shown, f"{text!r} never showed; the screen:\n{shown}"
                return shown
            time.sleep(0.05)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    work = tempfile.mkdtemp(prefix="rbtest-tmux-")
    t = Tmux(os.path.join(work, "sock"))
    try:
        yield t
    finally:
        subprocess.run(["tmux", "-S", t.sock, "kill-server"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def _push_base(busybox: str, registry: str) -> str:
    base = f"{registry}/tty/busybox:1"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{busybox}:latest", f"docker://{base}"],
        check=True,
        capture_output=True,
    )
    return base


def test_tty_view_steps_pane_transfers_summary_and_cache(rb: Runner, busybox: str, registry: str, tmux: Tmux) -> None:
    base = _push_base(busybox, registry)
    root = rb.fresh_root()
    ctx = rb.context(
        {
            "Containerfile": f"FROM {base} AS build\n"
            "RUN for i in $(seq 1 12); do echo out-line-$i; done; echo pane-ready; echo x > /made; sleep 4\n"
            f"FROM {base}\n"
            "COPY --from=build /made /copied\n"
        }
    )
    s = tmux.start(rb, "build", "--progress=auto", "--tls-verify=false", "-t", "tty-test", ctx, root=root)

    # mid-build: the running step, its elapsed time and the last lines of its output in the pane
    mid = tmux.wait(s, "│ pane-ready")
    running = next(line for line in mid.splitlines() if line.startswith("▶"))
    assert "[1/2] 2/2 RUN for i in" in running and running.rstrip().endswith("s")
    pane = [line.split("│ ", 1)[1].strip() for line in mid.splitlines() if "│ " in line]
    assert pane == [f"out-line-{i}" for i in range(8, 13)] + ["pane-ready"]  # the last 6 lines only

    final = tmux.wait(s, "EXIT=")
    assert "EXIT=0" in final, final
    lines = final.splitlines()
    assert "stage 1/2" in lines and "stage 2/2" in lines
    assert any(line.startswith("  pulled sha256:") and "done in" in line and "/s)" in line for line in lines)
    run_line = next(line for line in lines if line.startswith("✔ [1/2] 2/2 RUN for i in"))
    assert run_line.rstrip().endswith("s") and "CACHED" not in run_line
    assert any(line.startswith("✔ [2/2] 2/2 COPY --from=build") for line in lines)
    assert not any("│" in line or line.startswith("▶") for line in lines)  # the live block is gone
    summary = next(line for line in lines if line.startswith("Built "))
    assert "2 run, 0 cached" in summary and "transferred" in summary and "slowest" in summary
    image_id = next(line for line in lines if line.startswith("sha256:"))
    print(mid, final, sep="\n")  # pytest -s shows the frames

    again = tmux.start(rb, "build", "--progress=tty", "--tls-verify=false", "-t", "tty-test", ctx, root=root)
    final = tmux.wait(again, "EXIT=")
    assert "EXIT=0" in final, final
    lines = final.splitlines()
    assert any(line.startswith("✔ [1/2] 2/2 RUN for i in") and line.rstrip().endswith("CACHED") for line in lines)
    assert any(line.startswith("✔ [2/2] 2/2 COPY --from=build") and "CACHED" in line for line in lines)
    assert "out-line-12" not in final  # a cached RUN shows no output
    assert "0 run, 2 cached" in next(line for line in lines if line.startswith("Built "))
    assert image_id in lines
    print(final)  # pytest -s shows a frame


def test_tty_view_failed_run_shows_its_whole_output(rb: Runner, busybox: str, tmux: Tmux) -> None:
    ctx = rb.context(
        {"Containerfile": f"FROM oci:{busybox}\nRUN for i in $(seq 1 9); do echo fail-out-$i; done; exit 3\n"}
    )
    s = tmux.start(rb, "build", "--progress=tty", ctx, root=rb.fresh_root())
    final = tmux.wait(s, "EXIT=")
    assert "EXIT=125" in final or "EXIT=3" in final, final
    lines = final.splitlines()
    assert any(line.startswith("FAILED 2/2 RUN for i in") for line in lines)
    assert [line.strip() for line in lines if line.strip().startswith("fail-out-")] == [
        f"fail-out-{i}" for i in range(1, 10)
    ]  # all of it, not only the pane's last lines
    error = final[final.index("Error: ") :].replace("\n", "")  # the line may wrap at 120 columns
    assert "exit code: 3" in error


def test_auto_is_plain_without_a_terminal_and_the_view_is_not_imported(rb: Runner, busybox: str) -> None:
    """A cached build off a terminal draws nothing live and never imports the view (start-up stays light)."""
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo hi > /f\n"})
    rb.build(ctx, root=root)
    for flags in ([], ["-q"], ["--progress=plain"], ["--progress=json"]):
        res = rb.run("build", *flags, ctx, root=root, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert "rootless.cli.tty" not in res.stderr and "rootless.cli.report" in res.stderr
        assert "\x1b[" not in res.stderr
    plain = rb.run("build", ctx, root=root).stderr
    assert "STEP 2/2: RUN echo hi > /f" in plain and "--> Using cache" in plain


def test_tty_reporter_lines_without_color() -> None:
    """The finished lines as a terminal keeps them (a pty; colour off), one event at a time."""
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        r = TtyReporter(tty, color=False)
        r.emit(StepStarted(1, 1, 1, 2, "FROM x", "Containerfile", 1))
        r.emit(Transfer("pull", "sha256:" + "a" * 64, 512, 1024))
        r.emit(Transfer("pull", "sha256:" + "a" * 64, 1024, 1024, "done"))
        r.emit(StepStarted(1, 1, 2, 2, "RUN true", "Containerfile", 2))
        r.emit(Output(b"\x1b[31mred\x1b[0m\n50%\r100%\n"))
        r.emit(CacheHit("k" * 64))
        r.emit(StepDone("k" * 64, None, 0.0, True))
        r.emit(BuildDone("sha256:" + "f" * 64, 1.5))
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
    text = screen.decode()
    assert "  pulled sha256:aaaaaaaaaaaa 1.0KiB done in" in text
    assert "✔ 1/2 FROM x" in text and "✔ 2/2 RUN true  CACHED" in text
    assert "│ 100%" in text and "red" in text and "\x1b[31m" not in text  # the pane drops escapes and \r
    assert "Built ffffffffffff in 1.5s: 0 run, 1 cached; 1.0KiB transferred" in text
