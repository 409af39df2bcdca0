"""Events from the environment code: a single-uid RUN's warnings, the newuidmap fallback, registry cache
hits and the store limit's notes reach the reporter, so `--progress=json` keeps every stderr line JSON."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import pytest
from conftest import IS_ROOT, Runner


def json_events(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line of a --progress=json build is one event (json.loads fails on a plain line)."""
    return [json.loads(line) for line in stderr.splitlines()]


def warnings_of(stderr: str) -> list[str]:
    return [e["text"] for e in json_events(stderr) if e["type"] == "warning"]


def test_single_uid_run_warning_is_an_event(rb_single: Runner, busybox: str) -> None:
    ctx = rb_single.context({"Containerfile": f"FROM oci:{busybox}\nRUN su -s /bin/sh nobody -c 'touch /tmp/u'\n"})
    res = rb_single.run("build", "--progress=json", "--no-cache", ctx)
    warned = warnings_of(res.stderr)
    assert any(w.startswith("WARNING: ") and "Containerfile:2: RUN: su switched to uid 65534" in w for w in warned)
    assert any("single-uid user namespace" in w for w in warned)  # the degraded mapping, said once up front


@pytest.mark.skipif(not IS_ROOT, reason="recreating a no_new_privs container needs root")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the launcher's seccomp filter is written for x86_64")
def test_newuidmap_fallback_is_a_warning_event(rb: Runner, busybox: str) -> None:
    """The parent's notice that the setuid helpers failed (userns.run_inside's warn), not a stray line."""
    from test_no_userns import RUNC_MASKS, launch

    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo ran > /ran\n"})
    store = os.path.join(rb.mkdir(), "store")
    cfg = {"mountns": True, "mask": RUNC_MASKS, "no_new_privs": True}
    res = launch(rb.base, cfg, ["build", "--progress=json", ctx], rb, {"RBUILD_ROOT": store})
    warned = [w for w in warnings_of(res.stderr) if "newgidmap failed" in w]
    assert len(warned) == 1 and "single-uid user namespace" in warned[0], res.stderr


def test_registry_cache_hits_are_events(rb: Runner, busybox: str, registry: str) -> None:
    files = {"Containerfile": f"FROM oci:{busybox}\nCOPY a.txt /a.txt\nRUN echo ran-once > /r\nENV X=1\n", "a.txt": "a"}
    cache = f"{registry}/cache/events:1"
    rb.run("build", "--tls-verify=false", "--cache-to", cache, rb.context(files), root=rb.fresh_root())
    args = ["build", "--progress=json", "--tls-verify=false", "--cache-from", cache, rb.context(files)]
    res = rb.run(*args, root=rb.fresh_root())
    events = json_events(res.stderr)
    hits = [e for e in events if e["type"] == "cache-hit"]
    assert [h["source"] for h in hits] == ["registry"] * 3, res.stderr
    assert not [e for e in events if e["type"] == "output"]  # nothing ran
    done = [e for e in events if e["type"] == "step-done"]
    assert [d["key"] for d in done] == [h["key"] for h in hits] and all(d["cached"] for d in done)

    root = rb.fresh_root()  # a missing cache is a warning event, and the build goes on
    res = rb.run(*args[:-3], "--cache-from", f"{registry}/cache/none:1", rb.context(files), root=root)
    assert any("--cache-from" in w and "not used" in w for w in warnings_of(res.stderr))
    again = rb.run(*args, root=root)  # the local cache is asked first
    assert {e["source"] for e in json_events(again.stderr) if e["type"] == "cache-hit"} == {"local"}


def test_store_limit_notes_are_events(rb: Runner, busybox: str) -> None:
    conf = os.path.join(rb.mkdir(), "rbuild.toml")
    rb.write(conf, '[limits]\nstore_size = "1K"\n')
    root = rb.fresh_root()
    rb.build(rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo one > /one\n"}), root=root)
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo two > /two\n"})
    res = rb.run("build", "--progress=json", "-t", "app", ctx, root=root, env={"RBUILD_CONFIG": conf})
    warned = warnings_of(res.stderr)
    assert any("over its limit" in w for w in warned), res.stderr
