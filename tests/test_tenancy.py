"""Several users on one build host: private stores, runtime dirs, cache mounts and secrets; per-user limits."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import Runner

from rootless.env import limits
from rootless.errors import RbuildError


@pytest.mark.unit
def test_sizes_and_limits(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    assert limits.parse_size("20G", "x") == 20 << 30
    assert limits.parse_size("512MiB", "x") == 512 << 20
    assert limits.parse_size("1000", "x") == 1000
    for bad in ("", "G", "-1G", "lots"):
        with pytest.raises(RbuildError):
            limits.parse_size(bad, "x")
    conf = os.path.join(str(tmp_path), "rbuild.toml")
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    with open(conf, "w") as f:
        f.write(f'[limits]\nstore_size = "20G"\nconcurrent_builds = 4\n[limits.users.{me}]\nstore_size = "5G"\n')
    monkeypatch.setenv("RBUILD_CONFIG", conf)
    monkeypatch.delenv("RBUILD_STORE_SIZE", raising=False)
    monkeypatch.delenv("RBUILD_CONCURRENT_BUILDS", raising=False)
    assert limits.load() == limits.Limits(5 << 30, 4)
    monkeypatch.setenv("RBUILD_STORE_SIZE", "50G")  # the environment can only lower the administrator's limits
    monkeypatch.setenv("RBUILD_CONCURRENT_BUILDS", "1")
    assert limits.load() == limits.Limits(5 << 30, 1)
    with open(conf, "w") as f:
        f.write("[limits]\nconcurrent_builds = 0\n")
    with pytest.raises(RbuildError, match="concurrent_builds"):
        limits.load()


def test_users_cannot_reach_each_others_builds(rb: Runner, rb_single: Runner, busybox: str) -> None:
    secret = rb.write(os.path.join(rb.mkdir(), "token"), "s3cret-value\n", mode=0o600)
    ctx = rb.context(
        {
            "Containerfile": f"FROM oci:{busybox}\n"
            "RUN --mount=type=cache,target=/cache --mount=type=secret,id=tok "
            "echo kept > /cache/data && cat /run/secrets/tok > /dev/null\n"
        }
    )
    root = rb.fresh_root()
    rb.run("build", "-q", "--secret", f"id=tok,src={secret}", ctx, root=root)
    mounts = os.path.join(root, "cache-mounts")
    assert os.listdir(mounts)  # the cache mount lives in the store
    runtime = f"/tmp/rbuild-{rb.uid}"
    for path in (root, mounts, runtime, secret):
        res = rb_single.sh(f"ls -la {path} || cat {path}", check=False)
        assert res.returncode != 0 and "Permission denied" in res.stderr, (path, res.stdout)
    other = rb_single.run("images", root=root, check=False)
    assert other.returncode != 0 and other.stderr.startswith("Error: ")
    assert "Traceback" not in other.stderr


def test_store_limit_prunes_what_no_named_image_needs(rb: Runner, busybox: str, tmp_path: object) -> None:
    conf = os.path.join(rb.mkdir(), "rbuild.toml")
    rb.write(conf, '[limits]\nstore_size = "1K"\n')
    env = {"RBUILD_CONFIG": conf}
    root = rb.fresh_root()
    unnamed = rb.build(rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo one > /one\n"}), root=root)
    multi = rb.context(
        {
            "Containerfile": f"FROM oci:{busybox} AS tool\n"
            "RUN head -c 100000 /dev/urandom > /big && echo tmp > /scratch\n"
            f"FROM oci:{busybox}\nCOPY --from=tool /big /big\n"
        }
    )
    res = rb.run("build", "-t", "app", multi, root=root, env=env)
    notes = res.stderr
    assert "over its limit" in notes
    assert f"removed unnamed image {unnamed}" in notes
    assert "still over its limit: named images fill it" in notes  # app itself is kept
    images = rb.run("images", "--format", "json", root=root).stdout
    assert unnamed.removeprefix("sha256:")[:12] not in images and "localhost/app" in images
    assert rb.run("check", root=root).returncode == 0
    # the builder stage's layer went with the cache: the next build runs that stage again
    again = rb.run("build", "-t", "app", multi, root=root)
    assert "Using cache" not in again.stderr.split("STEP 3/")[0]


def test_prune_and_df(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    rb.build(rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo x > /x\n"}), root=root)
    df = rb.run("df", root=root).stdout
    assert "images             2" in df and "build cache" in df and "total" in df
    out = rb.run("prune", root=root).stdout
    assert "removed unnamed image" in out and "freed" in out
    assert rb.run("check", root=root).returncode == 0


def test_concurrent_builds_wait_for_a_slot(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    rb.build(rb.context({"Containerfile": f"FROM oci:{busybox}\n"}), root=root)  # the store exists
    env = {"RBUILD_CONCURRENT_BUILDS": "1"}
    slow = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN sleep 3 && echo slow > /slow\n"})
    fast = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo fast > /fast\n"})
    e = rb._env(env)
    e["RBUILD_ROOT"] = root
    first = subprocess.Popen(
        rb._prefix() + [rb.bin, "build", "-q", slow], env=e, cwd=rb.base, stderr=subprocess.PIPE, text=True
    )
    try:
        import time

        deadline = time.monotonic() + 60
        while not any("sleep" in p for p in rb.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)  # the first build holds the slot once its RUN runs
        second = rb.run("build", "-q", fast, root=root, env=env)
        assert "waiting for one of the 1 concurrent builds" in second.stderr
    finally:
        assert first.wait(timeout=120) == 0
        assert first.stderr is not None
        first.stderr.close()
