"""The hostile layer corpus (tests/hostile/corpus.py): every attack refused or contained, canary untouched.

Run twice: layer by layer through `layers.unpack` as the unprivileged test users inside their user
namespaces (checks what a contained layer left in its dir), and end to end as images used by
`FROM oci:DIR` in `rbuild build`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from typing import Any

import pytest
from conftest import write_oci_layout
from hostile.corpus import Case, cases
from hostile.userns import in_userns

UNPACK_ALL = r"""
import json, os, sys
from rootless.layer import layers
from rootless.layer.ownership import Ownership
out = {}
for case in json.load(open(sys.argv[1])):
    dirs, err = [], None
    os.environ.update(case["env"])
    for i, path in enumerate(case["layers"]):
        dest = os.path.join(case["work"], f"l{i}")
        os.mkdir(dest)
        try:
            with open(path, "rb") as f:
                layers.unpack(f, dest, lowers=dirs[::-1], ownership=Ownership.for_mapping(os.environ["SINGLE"] == "1"))
        except layers.LayerError as e:
            err = str(e)
            break
        dirs.append(dest)
    for k in case["env"]:
        del os.environ[k]
    out[case["name"]] = {"error": err, "top": dirs[-1] if dirs else None}
json.dump(out, open(sys.argv[2], "w"))
"""


def snapshot(root: str) -> list[tuple[Any, ...]]:
    """Everything an escape could change in the canary: names, types, modes, owners, mtimes, contents."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            body = ""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            xattrs = sorted(os.listxattr(p, follow_symlinks=False))
            out.append(
                (
                    os.path.relpath(p, root),
                    st.st_mode,
                    st.st_uid,
                    st.st_gid,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_nlink,
                    body,
                    xattrs,
                )
            )
    return sorted(out)


def make_canary(runner: Any) -> str:
    path = runner.mkdir("canary")
    os.makedirs(os.path.join(path, "sub"), exist_ok=True)
    with open(os.path.join(path, "secret"), "w") as f:
        f.write("the canary\n")
    with open(os.path.join(path, "sub", "file"), "w") as f:
        f.write("deeper\n")
    runner.own(path)
    return path


def check(top: str, rel: str, what: str) -> None:
    p = os.path.join(top, rel)
    st = os.lstat(p)
    names = os.listxattr(p, follow_symlinks=False)
    ok = {
        "symlink": stat.S_ISLNK(st.st_mode),
        "file": stat.S_ISREG(st.st_mode) and not [n for n in names if n.startswith("user.rbuild.")],
        "fifo": stat.S_ISFIFO(st.st_mode),
        "no-overlay-xattrs": not [n for n in names if ".overlay." in n],
        "no-rbuild-xattrs": not [n for n in names if n.startswith("user.rbuild.")],
        "device-record": stat.S_ISREG(st.st_mode) and "user.rbuild.dev" in names,
    }[what]
    assert ok, f"{rel}: expected {what}"


@pytest.mark.parametrize("who", ["sub", "single"])
def test_corpus_unpacked_by_unprivileged_users(who: str, request: pytest.FixtureRequest) -> None:
    runner = request.getfixturevalue("rb" if who == "sub" else "rb_single")
    canary = make_canary(runner)
    before = snapshot(canary)
    corpus = cases(canary)
    assert len(corpus) >= 30 and len({c.name for c in corpus}) == len(corpus)
    base = runner.mkdir()
    spec = []
    for c in corpus:
        work = os.path.join(base, c.name)
        os.mkdir(work)
        paths = []
        for i, data in enumerate(c.layers):
            paths.append(os.path.join(work, f"layer{i}.tar"))
            with open(paths[-1], "wb") as f:
                f.write(data)
        spec.append({"name": c.name, "work": work, "layers": paths, "env": c.env})
    with open(os.path.join(base, "spec.json"), "w") as f:
        json.dump(spec, f)
    runner.own(base)
    in_userns(
        runner, UNPACK_ALL, os.path.join(base, "spec.json"), os.path.join(base, "out.json"), single=who == "single"
    )
    with open(os.path.join(base, "out.json")) as f:
        results = json.load(f)
    for c in corpus:
        got = results[c.name]
        if c.refused:
            assert got["error"] and re.search(c.refused, got["error"]), f"{c.name}: {got['error']!r}"
            assert "\n" not in got["error"]
        else:
            assert got["error"] is None, f"{c.name}: {got['error']}"
            for rel, what in c.check.items():
                check(got["top"], rel, what)
    assert snapshot(canary) == before


def _case_ids() -> list[str]:
    return [c.name for c in cases("/canary")]


@pytest.fixture(scope="module")
def e2e_canary(rb: Any) -> tuple[str, list[tuple[Any, ...]], dict[str, Case]]:
    canary = make_canary(rb)
    return canary, snapshot(canary), {c.name: c for c in cases(canary)}


@pytest.mark.parametrize("name", _case_ids())
def test_corpus_as_from_image(
    name: str, rb: Any, e2e_canary: tuple[str, list[tuple[Any, ...]], dict[str, Case]]
) -> None:
    canary, before, by_name = e2e_canary
    c = by_name[name]
    layout = rb.mkdir()
    write_oci_layout(layout, c.layers)
    ctx = rb.context({"Containerfile": f"FROM oci:{layout}\nLABEL hostile={name}\n"})
    rb.own(layout)
    res = rb.run("build", "-q", ctx, check=False, env=c.env)
    if c.refused:
        assert res.returncode != 0, f"{name} was accepted"
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and re.search(c.refused, errors[0]), res.stderr
        assert "Traceback" not in res.stderr
    else:
        assert res.returncode == 0, res.stderr
    assert snapshot(canary) == before
