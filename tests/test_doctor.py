"""`rbuild doctor`: the right rung, the failing check and its exact remedy, the exit status, in each
environment tests/envsim.py recreates (real namespaces, seccomp filters, mounts; no mocks)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from conftest import IS_ROOT, Runner
from envsim import EnvSim, EnvSpec

from rootless.env.probe import Check, Probe, choose
from rootless.env.strategy import DRIVERS


def doctor(res_stdout: str) -> dict[str, Any]:
    doc = json.loads(res_stdout)
    assert set(doc) >= {"rung", "run_possible", "checks"}
    for c in doc["checks"]:
        assert set(c) == {"name", "ok", "detail", "remedy"}
        assert c["ok"] or c["remedy"] or c["name"] in ("mount", "overlay", "proc", "id_mapping", "seccomp_notify")
    return doc


def check(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in doc["checks"] if c["name"] == name]
    assert len(found) == 1, doc
    return dict(found[0])


def user_env(user: Any, rb: Runner, root: str | None = None) -> dict[str, str]:
    env = {
        "HOME": user.home,
        "USER": user.name,
        "PATH": os.path.dirname(rb.bin) + ":/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "C.UTF-8",
    }
    if root:
        env["RBUILD_ROOT"] = root
    return env


def test_doctor_user_with_range(rb: Runner) -> None:
    res = rb.run("doctor", "--json", check=False)
    assert res.returncode == 0, res.stderr
    doc = doctor(res.stdout)
    assert doc["rung"] == 1 and doc["run_possible"] is True
    for name in ("user_namespace", "overlay", "mount", "newuidmap", "newgidmap", "subuid", "subgid", "id_mapping"):
        assert check(doc, name)["ok"], check(doc, name)
    assert "65537 uids mapped" in check(doc, "id_mapping")["detail"]
    text = rb.run("doctor")  # the same, for people
    assert text.stdout.startswith("rung 1: user namespace + kernel overlay (RUN works)")
    # cached: the second answer is the first
    assert json.loads(rb.run("doctor", "--json").stdout) == doc


def test_doctor_single_uid(rb_single: Runner) -> None:
    res = rb_single.run("doctor", "--json", check=False)
    assert res.returncode == 0, res.stderr
    doc = doctor(res.stdout)
    assert doc["rung"] == 1
    sub = check(doc, "subuid")
    assert not sub["ok"] and "single-uid" in sub["detail"]
    assert f"'{rb_single.name}:" in sub["remedy"] and ":65536'" in sub["remedy"]
    assert check(doc, "id_mapping")["detail"] == "the single-uid map"


def test_doctor_storage_not_writable(rb: Runner) -> None:
    res = rb.run("doctor", "--json", root="/root/rbuild-store", check=False)
    assert res.returncode == 2, res.stderr
    doc = doctor(res.stdout)
    assert doc["rung"] == 5 and not check(doc, "storage")["ok"] and "--root" in check(doc, "storage")["remedy"]
    assert check(doc, "user_namespace")["ok"]  # tried all the same: only the store is the problem
    assert check(doc, "overlay")["detail"] == "not tried: the storage is not writable"


# (spec, as root?, rung, failing check, words of its remedy, exit status)
CASES = {
    "masked_proc": (EnvSpec(masked_proc=True), False, 1, "proc", "procMount: Unmasked", 0),
    "container_root": (
        EnvSpec(masked_proc=True, docker_caps=True, seccomp_no_userns=True),
        True,
        4,
        "user_namespace",
        "seccompProfile.type: Unconfined",
        0,
    ),
    "seccomp_no_userns": (EnvSpec(seccomp_no_userns=True), False, 5, "user_namespace", "seccomp=unconfined", 1),
    "no_new_privs": (EnvSpec(no_new_privs=True), False, 1, "newuidmap", "allowPrivilegeEscalation: true", 0),
    "userns_no_mount": (EnvSpec(userns_no_mount=True), False, 3, "mount", "mount_setattr", 0),
    "store_on_overlay": (EnvSpec(store_on_overlay=True), False, 3, "overlay", "--root DIR", 0),
    "max_userns_zero": (
        EnvSpec(max_userns_zero=True),
        False,
        5,
        "user_namespace",
        "sysctl -w user.max_user_namespaces=15000",
        1,
    ),
}


@pytest.mark.skipif(not IS_ROOT, reason="envsim builds its environments as root")
@pytest.mark.parametrize("case", sorted(CASES))
def test_doctor_in_environment(rb: Runner, case: str) -> None:
    spec, as_root, rung, failing, remedy, status = CASES[case]
    with EnvSim(spec) as env:
        if spec.store_on_overlay:
            env.own_overlay(rb)
            root = env.overlay_dir + "/store"
        else:
            root = rb.mkdir() + "/store"
        rb.run("doctor", "--json", root=root, check=False)  # the host's answer, cached: the environment must not get it
        if as_root:
            res = env.run([rb.bin, "doctor", "--json", "--root", root], env={"PATH": "/usr/bin:/bin"})
        else:
            res = env.run([rb.bin, "doctor", "--json"], user=rb, env=user_env(rb, rb, root), cwd=rb.base)
    assert res.returncode == status, res.stdout + res.stderr
    doc = doctor(res.stdout)
    assert doc["rung"] == rung, doc
    bad = check(doc, failing)
    assert not bad["ok"] and remedy in bad["remedy"], bad
    assert doc["run_possible"] is (status == 0)
    if rung > 1:
        assert doc["skipped"][0].startswith("rung 1 ") and failing in " ".join(doc["skipped"])


@pytest.mark.skipif(not IS_ROOT, reason="envsim builds its environments as root")
def test_doctor_runtime_dir_taken(rb: Runner) -> None:
    with EnvSim(EnvSpec(runtime_dir_taken=True, taken_uid=rb.uid)) as env:
        res = env.run([rb.bin, "doctor", "--json"], user=rb, env=user_env(rb, rb, rb.root), cwd=rb.base)
    assert res.returncode == 0, res.stderr
    doc = doctor(res.stdout)
    assert doc["rung"] == 1
    bad = check(doc, "runtime_dir")
    assert not bad["ok"] and "uid 65534" in bad["detail"] and f"remove /tmp/rbuild-{rb.uid}" in bad["remedy"]


@pytest.mark.skipif(not IS_ROOT, reason="envsim builds its environments as root")
def test_doctor_small_range(rb: Runner) -> None:
    with EnvSim(EnvSpec()) as env:
        user = env.make_user(subids=1000)
        res = env.run([rb.bin, "doctor", "--json"], user=user, env=user_env(user, rb), cwd=user.home)
    assert res.returncode == 0, res.stderr
    doc = doctor(res.stdout)
    assert doc["rung"] == 1
    bad = check(doc, "subuid")
    assert not bad["ok"] and "1000 ids" in bad["detail"] and f"'{user.name}:" in bad["remedy"]
    assert check(doc, "id_mapping")["ok"]  # the small range still maps


def probe_of(failing: set[str], **facts: bool) -> Probe:
    names = ("storage", "user_namespace", "mount", "overlay", "proc", "fuse", "capabilities")
    checks = tuple(Check(n, n not in failing, f"{n} {'fails' if n in failing else 'works'}") for n in names)
    args = {"real_root": False, "userns": True, "root_caps": False, "storage_writable": True, **facts}
    return Probe(checks, **args)


def test_choose_ladder() -> None:
    """choose() is a pure function of the probe: the best rung left, and why each better one was skipped."""
    assert choose(probe_of(set())) == choose(probe_of(set())) and choose(probe_of(set())).rung == 1
    c = choose(probe_of({"overlay"}))
    fuse_rung = 2 if DRIVERS["fuse"] else 3  # rung 2 only once builds have the FUSE driver
    assert (c.rung, c.run_possible) == (fuse_rung, True) and c.skipped[0] == (
        "rung 1 (user namespace + kernel overlay): overlay: overlay fails"
    )
    c = choose(probe_of({"overlay", "fuse"}))
    assert c.rung == 3 and [s.split(":")[0] for s in c.skipped] == [
        "rung 1 (user namespace + kernel overlay)",
        "rung 2 (user namespace + FUSE overlay helper)",
    ]
    assert choose(probe_of({"mount", "overlay"})).rung == 3
    c = choose(probe_of({"user_namespace"}, userns=False, root_caps=True))
    assert (c.rung, c.run_possible) == (4, True) and all("user_namespace fails" in s for s in c.skipped)
    c = choose(probe_of({"user_namespace"}, userns=False))
    assert (c.rung, c.run_possible) == (5, False) and "CAP_SYS_CHROOT" in c.skipped[-1]
    assert choose(probe_of({"storage"}, storage_writable=False)).rung == 5
    assert choose(probe_of(set(), userns=False, real_root=True)).rung == 1
    round_trip = Probe.from_json(probe_of({"proc"}).to_json())
    assert round_trip == probe_of({"proc"})
