"""Build events (rootless/events.py) and the command line's reporters: `--progress=json` as the `rb` user,
the plain text view, transfer progress."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from typing import Any

from conftest import Runner

from rootless.cli.report import JsonReporter, PlainReporter
from rootless.events import (
    BuildDone,
    CacheHit,
    Event,
    Notice,
    Output,
    StepDone,
    StepStarted,
    Transfer,
    Warn,
)
from rootless.registry.progress import Progress


def json_events(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line of a --progress=json build is one event."""
    return [json.loads(line) for line in stderr.splitlines()]


def output_of(events: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "output")


def test_json_events_pull_step_output_and_cache_hit(rb: Runner, busybox: str, registry: str) -> None:
    base = f"{registry}/events/busybox:1"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{busybox}:latest", f"docker://{base}"],
        check=True,
        capture_output=True,
    )
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": f"FROM {base}\nRUN echo hello-events > /dev/stderr; echo x > /made\n"})

    first = rb.run("build", "--progress=json", ctx, root=root)
    image_id = first.stdout.strip()
    events = json_events(first.stderr)
    types = [e["type"] for e in events]
    steps = [e for e in events if e["type"] == "step"]
    assert [(s["index"], s["steps"], s["text"], s["line"]) for s in steps] == [
        (1, 2, f"FROM {base}", 1),
        (2, 2, "RUN echo hello-events > /dev/stderr; echo x > /made", 2),
    ]
    assert all(s["file"].endswith("Containerfile") and (s["stage"], s["stages"]) == (1, 1) for s in steps)
    transfers = [e for e in events if e["type"] == "transfer"]
    assert transfers and all(t["action"] == "pull" for t in transfers)
    settled = {t["digest"]: t for t in transfers if t["state"]}
    assert settled and all(t["state"] == "done" and t["done"] == t["total"] > 0 for t in settled.values())
    assert types.index("transfer") < types.index("step", 1)  # the pull belongs to FROM
    assert next(e["text"] for e in events if e["type"] == "notice") == f"Pulled {base}"
    assert output_of(events) == b"hello-events\n"
    run_step = types.index("step", 1)
    assert types.index("output") > run_step
    done = [e for e in events if e["type"] == "step-done"]
    assert len(done) == 1 and not done[0]["cached"] and done[0]["layer"].startswith("sha256:")
    assert types[-1] == "build-done" and events[-1]["image_id"] == image_id

    again = rb.run("build", "--progress=json", ctx, root=root)
    assert again.stdout.strip() == image_id
    events = json_events(again.stderr)
    assert [e["type"] for e in events] == ["step", "step", "cache-hit", "step-done", "build-done"]
    hit, step_done = events[2], events[3]
    assert step_done["cached"] and step_done["key"] == hit["key"] == done[0]["key"]
    assert step_done["layer"] is None


def test_json_output_streams_in_chunks(rb: Runner, busybox: str) -> None:
    """A RUN's output reaches the reporter as it is written, not once the RUN is over."""
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo first; sleep 1; echo second >&2\n"})
    res = rb.run("build", "--no-cache", "--progress=json", ctx)
    chunks = [base64.b64decode(e["data"]) for e in json_events(res.stderr) if e["type"] == "output"]
    assert b"".join(chunks) == b"first\nsecond\n"
    assert len(chunks) >= 2 and b"second" not in chunks[0]


def test_plain_and_quiet_stay_as_they_were(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo plain-out\n"})
    root = rb.fresh_root()
    plain = rb.run("build", "--progress=plain", ctx, root=root)
    assert "STEP 2/2: RUN echo plain-out" in plain.stderr and "plain-out\n" in plain.stderr
    assert plain.stderr.splitlines()[-1].startswith("--> built in ")
    cached = rb.run("build", ctx, root=root)
    assert "--> Using cache " in cached.stderr and cached.stdout == plain.stdout
    quiet = rb.run("build", "--progress=quiet", ctx, root=root)
    assert quiet.stderr == "" and quiet.stdout == plain.stdout
    both = rb.run("build", "-q", "--progress=json", ctx, root=root, check=False)
    assert both.returncode == 125 and both.stderr == "Error: -q and --progress=json contradict each other\n"


def test_quiet_shows_a_failed_runs_output(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo why-it-failed; exit 3\n"})
    res = rb.run("build", "-q", ctx, check=False)
    assert res.returncode != 0 and "why-it-failed\n" in res.stderr and "STEP" not in res.stderr


# -- the reporters and transfer progress, without a build -----------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    @property
    def output_fd(self) -> int | None:
        return None

    def emit(self, event: Event) -> None:
        self.events.append(event)


def test_progress_emits_transfers_throttled() -> None:
    rec = Recorder()
    prog = Progress(rec, "push")
    digest = "sha256:" + "a" * 64
    prog.start(digest, 300)
    for _ in range(100):
        prog.advance(digest, 1)  # well within INTERVAL: at most the first goes out
    prog.reset(digest, 0)
    prog.advance(digest, 300)
    prog.finish(digest, "done")
    got = [(e.done, e.state) for e in rec.events if isinstance(e, Transfer)]
    assert got[0] == (0, "") and got[-1] == (300, "done")
    assert len(got) <= 5
    assert all(isinstance(e, Transfer) and e.action == "push" and e.total == 300 for e in rec.events)


def test_plain_lines() -> None:
    out = io.StringIO()
    r = PlainReporter(out)
    r.emit(StepStarted(2, 3, 1, 4, "FROM scratch", "Containerfile", 7))
    r.emit(CacheHit("c" * 64))
    r.emit(StepDone("c" * 64, None, 0.1, True))
    r.emit(StepDone("d" * 64, "sha256:" + "e" * 64, 0.1, False))
    r.emit(Notice("Pulled x"))
    r.emit(Warn("[Warning] w"))
    r.emit(Transfer("pull", "sha256:" + "f" * 64, 1, 2))  # not a terminal: no transfer lines
    r.emit(BuildDone("sha256:" + "0" * 64, 1.5))
    assert out.getvalue() == (
        f"[2/3] STEP 1/4: FROM scratch\n--> Using cache {'c' * 12}\n--> {'d' * 12}\nPulled x\n[Warning] w\n"
        "--> built in 1.50s\n"
    )
    quiet = io.StringIO()
    q = PlainReporter(quiet, quiet=True)
    for e in (StepStarted(1, 1, 1, 1, "FROM scratch", "f", 1), Notice("n"), Warn("w"), BuildDone("x", 1.0)):
        q.emit(e)
    assert quiet.getvalue() == "w\n"


def test_plain_transfers_live_on_a_terminal() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        r = PlainReporter(tty)
        r.emit(Transfer("pull", "sha256:" + "b" * 64, 1024, 2048))
        r.emit(Transfer("push", "sha256:" + "c" * 64, 0, 10, "mounted"))
    screen = os.read(master, 4096).decode()
    os.close(master)
    assert "Copying blob sha256:bbbbbbbbbbbb 1.0KiB / 2.0KiB" in screen
    assert "Pushing blob sha256:cccccccccccc mounted" in screen


def test_json_lines() -> None:
    out = io.StringIO()
    r = JsonReporter(out)
    r.emit(Output(b"\xffbin"))
    r.emit(Transfer("pull", "sha256:" + "a" * 64, 5, 9))
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["type"] == "output" and base64.b64decode(first["data"]) == b"\xffbin"
    assert {k: second[k] for k in ("type", "action", "done", "total", "state")} == {
        "type": "transfer",
        "action": "pull",
        "done": 5,
        "total": 9,
        "state": "",
    }
    assert r.output_fd is None
