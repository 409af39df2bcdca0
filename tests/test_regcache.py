"""The registry cache: --cache-to pushes a build's steps, --cache-from lets another user's empty store reuse them."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import Runner

from rootless.build.regcache import CacheSpec, parse_spec
from rootless.errors import RbuildError

CONTAINERFILE = """\
FROM oci:{busybox}
ARG FLAVOUR=plain
COPY app.txt /app/app.txt
RUN echo "ran-$((6*7))" && head -c 16 /dev/urandom | od -An -tx1 > /app/random && chown 1234:5678 /app/random
RUN mkdir /gone && touch /gone/x && rm -rf /gone /bin/true
ENV WHO=cache
"""


@pytest.mark.unit
def test_parse_spec() -> None:
    assert parse_spec("h:5000/c:1", "--cache-to") == CacheSpec("h:5000/c:1", "max")
    assert parse_spec("type=registry,ref=h/c:1,mode=min", "--cache-to") == CacheSpec("h/c:1", "min")
    for bad in ("type=local,dest=/x", "type=registry", "type=registry,ref=h/c,mode=all", "type=registry,ref=h/c,x=1"):
        with pytest.raises(RbuildError):
            parse_spec(bad, "--cache-to")


def _skopeo_manifest(ref: str) -> dict:
    raw = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"], check=True, capture_output=True
    ).stdout
    return json.loads(raw)


def test_cache_round_trip_between_users_and_stores(rb: Runner, rb_single: Runner, busybox: str, registry: str) -> None:
    files = {"Containerfile": CONTAINERFILE.format(busybox=busybox), "app.txt": "hello\n"}
    cache = f"{registry}/cache/app:buildcache"
    first = rb.run("build", "--tls-verify=false", "--cache-to", cache, rb.context(files), root=rb.fresh_root())
    assert "ran-42" in first.stdout + first.stderr
    image = first.stdout.strip().splitlines()[-1]
    manifest = _skopeo_manifest(cache)
    assert manifest["config"]["mediaType"] == "application/vnd.rbuild.cache.config.v1+json"
    assert len(manifest["layers"]) == 4  # the base layer (a fresh store needs it too), COPY, two RUNs

    # another user, no subuid range, an empty store: every step comes from the registry, nothing runs
    second = rb_single.run(
        "build",
        "--tls-verify=false",
        "--cache-from",
        f"type=registry,ref={cache}",
        rb_single.context(files),
        root=rb_single.fresh_root(),
    )
    out = second.stdout + second.stderr
    assert "ran-42" not in out
    assert out.count("from the registry cache") == 4  # COPY, RUN, RUN, ENV (ARG makes no step)
    assert second.stdout.strip().splitlines()[-1] == image

    # a change to one source: the steps after it run (as the user with a range: a single-uid RUN cannot
    # chown yet), those before still come from the cache
    files["app.txt"] = "changed\n"
    third = rb.run("build", "--tls-verify=false", "--cache-from", cache, rb.context(files), root=rb.fresh_root())
    assert "ran-42" in third.stdout + third.stderr
    assert third.stdout.strip().splitlines()[-1] != image


def test_missing_cache_is_a_warning_and_bad_spec_an_error(rb: Runner, busybox: str, registry: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN true\n"})
    res = rb.run("build", "--tls-verify=false", "--cache-from", f"{registry}/cache/none:1", ctx, root=rb.fresh_root())
    assert "--cache-from" in res.stderr and "not used" in res.stderr
    bad = rb.run("build", "--cache-to", "type=local,dest=/tmp/x", ctx, check=False)
    assert bad.returncode == 125
    assert bad.stderr.strip().splitlines() == [
        "Error: --cache-to type=local,dest=/tmp/x: only type=registry is supported"
    ]
