"""--progress=json events against their published JSON Schema (rootless/cli/events.schema.json, shipped in
the package; docs/events.md): every event real builds, pulls and pushes emit, as the `rb` user, validates."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
from importlib import resources
from typing import Any

import jsonschema
import pytest
from conftest import Runner

from rootless.cli.report import _TYPES, JsonReporter
from rootless.events import BuildDone, CacheHit, Notice, Output, StepDone, StepStarted, Transfer, Warn


def schema() -> dict[str, Any]:
    text = resources.files("rootless.cli").joinpath("events.schema.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


def validate_lines(stderr: str) -> list[dict[str, Any]]:
    validator = jsonschema.Draft202012Validator(schema())
    events = [json.loads(line) for line in stderr.splitlines()]
    for e in events:
        errors = list(validator.iter_errors(e))
        assert not errors, f"{e} does not match the schema: {[err.message for err in errors]}"
    return events


KEY = "a" * 64
SAMPLES = [
    StepStarted(1, 2, 3, 4, "RUN x", "Containerfile", 5),
    CacheHit(KEY, "registry"),
    Output(b"\xff\x00bytes"),
    Transfer("push", "sha256:" + "b" * 64, 1, 2, "mounted"),
    Warn("w"),
    Notice("n"),
    StepDone(KEY, "sha256:" + "c" * 64, 0.5, False),
    StepDone(KEY, None, 0.0, True),
    BuildDone("sha256:" + "d" * 64, 1.0),
]


def test_every_event_type_and_field_is_in_the_schema() -> None:
    """A field added to an event without the schema fails here (the schema forbids unknown fields)."""
    assert {type(s) for s in SAMPLES} == set(_TYPES)
    buf = io.StringIO()
    r = JsonReporter(buf)
    for s in SAMPLES:
        r.emit(s)
    events = validate_lines(buf.getvalue())
    for s, e in zip(SAMPLES, events, strict=True):
        assert set(e) == {"type", "time"} | {f.name for f in dataclasses.fields(s)}


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "step", "time": 1.0, "stage": 1, "stages": 1, "index": 1, "steps": 1, "text": "x", "file": "f"},
        {"type": "step-done", "time": 1.0, "key": KEY, "layer": None, "seconds": 0.1, "cached": "yes"},
        {"type": "sneeze", "time": 1.0},
        {"type": "notice", "time": 1.0, "text": "x", "extra": 1},
    ],
)
def test_the_schema_rejects_what_rbuild_never_writes(bad: dict[str, Any]) -> None:
    assert list(jsonschema.Draft202012Validator(schema()).iter_errors(bad))


def test_events_of_real_builds_pull_and_push_validate(rb: Runner, busybox: str, registry: str) -> None:
    base = f"{registry}/schema/busybox:1"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{busybox}:latest", f"docker://{base}"],
        check=True,
        capture_output=True,
    )
    root = rb.fresh_root()
    ctx = rb.context(
        {
            "Containerfile": f"FROM {base} AS build\nARG UNUSED_NOT\nRUN printf 'out\\377\\n'; echo x > /made\n"
            f"FROM {base}\nCOPY --from=build /made /made\nENV A=1\n"
        }
    )
    tag = f"{registry}/schema/out:1"
    argv = ["build", "--progress=json", "--tls-verify=false", "--build-arg", "NOPE=1", "-t", tag, "--push", ctx]
    seen: set[str] = set()
    for _ in range(2):  # the second build hits the cache and pushes blobs that exist
        events = validate_lines(rb.run(*argv, root=root).stderr)
        seen |= {e["type"] for e in events}
        seen |= {f"{e['action']}:{e['state']}" for e in events if e["type"] == "transfer" and e["state"]}
    again = rb.run("push", "--progress=json", "--tls-verify=false", tag, f"{registry}/schema/copy:1", root=root)
    events = validate_lines(again.stderr)
    seen |= {f"{e['action']}:{e['state']}" for e in events if e["type"] == "transfer" and e["state"]}
    assert events[-1]["type"] == "notice" and events[-1]["text"].startswith("Pushed ")
    pulled = rb.run("pull", "--progress=json", "--tls-verify=false", f"{registry}/schema/copy:1", root=rb.fresh_root())
    assert {e["type"] for e in validate_lines(pulled.stderr)} == {"transfer"}
    assert seen >= {"step", "cache-hit", "output", "transfer", "warning", "notice", "step-done", "build-done"}
    assert {"pull:done", "push:done", "push:skipped: already exists", "push:mounted"} <= seen
