"""Registries through the `rbuild` command, run as an unprivileged user: login/logout, FROM and push
with credentials, --push, --digestfile, --format, --platform, --pull policies, and pulls that fail
half-way leaving the store clean."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner
from registry_helpers import Fault, RegistryServer, docker_registry, fault_proxy, isolate, make_image

from rootless.oci.reference import parse_reference
from rootless.registry.api import Registry, RegistryOptions

PASSWORD = "cli-s3cret-pw"


@pytest.fixture(scope="module")
def private() -> Iterator[RegistryServer]:
    with docker_registry(htpasswd={"alice": PASSWORD}) as srv:
        yield srv


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    return isolate(monkeypatch, str(tmp_path))  # for the API calls the test itself makes


def skopeo(*args: str) -> str:
    return subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True, text=True).stdout


def seed_busybox(busybox: str, dest: str, creds: str | None = None) -> None:
    extra = [f"--dest-creds={creds}"] if creds else []
    skopeo("copy", "--dest-tls-verify=false", *extra, f"oci:{busybox}:latest", f"docker://{dest}")


def auth_file(rb: Runner) -> Path:
    return Path(rb.home, ".config", "containers", "auth.json")


def test_login_build_push_logout(rb: Runner, busybox: str, private: RegistryServer) -> None:
    host = private.host
    seed_busybox(busybox, f"{host}/base/busybox:1", f"alice:{PASSWORD}")
    root = rb.fresh_root()
    try:
        bad = rb.run("login", "-u", "alice", "--password-stdin", host, input="wrong-pw\n", check=False)
        assert bad.returncode != 0 and "authentication failed (401)" in bad.stderr
        assert "wrong-pw" not in bad.stderr + bad.stdout
        assert not auth_file(rb).exists()

        ok = rb.run("login", "-u", "alice", "--password-stdin", host, input=PASSWORD + "\n")
        assert ok.stdout.strip() == "Login Succeeded!" and PASSWORD not in ok.stdout + ok.stderr
        st = os.stat(auth_file(rb))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (rb.uid, 0o600)
        assert list(json.loads(auth_file(rb).read_text())["auths"]) == [host]

        ctx = rb.context({"Containerfile": f"FROM {host}/base/busybox:1\nRUN echo built > /built\n"})
        image = rb.build(ctx, "-t", f"{host}/app/pushed:1", "--push", root=root)
        assert image.startswith("sha256:")
        digest_file = os.path.join(rb.mkdir(), "digest")
        res = rb.run(
            "push",
            "--format",
            "docker",
            "--digestfile",
            digest_file,
            f"{host}/app/pushed:1",
            f"{host}/app/docker:1",
            root=root,
        )
        assert PASSWORD not in res.stdout + res.stderr
        raw = skopeo(
            "inspect", "--tls-verify=false", f"--creds=alice:{PASSWORD}", "--raw", f"docker://{host}/app/docker:1"
        ).encode()
        assert json.loads(raw)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert Path(digest_file).read_text() == "sha256:" + hashlib.sha256(raw).hexdigest()
        config = json.loads(
            skopeo(
                "inspect",
                "--tls-verify=false",
                f"--creds=alice:{PASSWORD}",
                "--config",
                f"docker://{host}/app/pushed:1",
            )
        )
        assert config["rootfs"]["diff_ids"]

        # Credentials are never written into an image or the store.
        needles = [PASSWORD.encode(), f"alice:{PASSWORD}".encode()]
        import base64

        needles.append(base64.b64encode(f"alice:{PASSWORD}".encode()))
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    data = Path(path).read_bytes()
                    assert not any(n in data for n in needles), path

        out = rb.run("logout", host)
        assert host in out.stdout
        assert json.loads(auth_file(rb).read_text())["auths"] == {}
        denied = rb.run("pull", f"{host}/app/pushed:1", root=rb.fresh_root(), check=False)
        assert denied.returncode != 0
        assert f"{host}/app/pushed:1: authentication required (401); run rbuild login {host}" in denied.stderr
        again = rb.run("logout", host, check=False)
        assert again.returncode != 0 and f"not logged into {host}" in again.stderr
    finally:
        auth_file(rb).unlink(missing_ok=True)


def test_push_of_a_local_name_needs_a_destination(rb: Runner) -> None:
    res = rb.run("push", "localhost/app:1", check=False)
    assert res.returncode != 0 and "destination" in res.stderr


def test_pull_platform(rb: Runner, registry: str) -> None:
    images = {"amd64": make_image([2_000], arch="amd64"), "arm64": make_image([2_000], arch="arm64", variant="v8")}
    client = Registry(RegistryOptions())
    entries = []
    for arch, img in images.items():
        client.push(
            parse_reference(f"{registry}/cli/multi@{img.digest}"),
            img.manifest,
            img.media_type,
            img.config,
            img.config_bytes,
            img.openers(),
        )
        entries.append(
            {
                "mediaType": img.media_type,
                "digest": img.digest,
                "size": len(img.manifest),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    ).encode()
    img = images["amd64"]
    client.push(
        parse_reference(f"{registry}/cli/multi:1"),
        index,
        "application/vnd.oci.image.index.v1+json",
        img.config,
        img.config_bytes,
        [],
    )
    root = rb.fresh_root()
    for platform, arch in (("linux/arm64", "arm64"), ("linux/amd64", "amd64")):
        image_id = rb.run("pull", "--platform", platform, f"{registry}/cli/multi:1", root=root).stdout.strip()
        doc = json.loads(rb.run("inspect", image_id, root=root).stdout)[0]
        assert doc["Architecture"] == arch
    missing = rb.run("pull", "--platform", "linux/s390x", f"{registry}/cli/multi:1", root=root, check=False)
    assert missing.returncode != 0 and "no image for platform linux/s390x" in missing.stderr


def test_pull_policies(rb: Runner, busybox: str, registry: str) -> None:
    seed_busybox(busybox, f"{registry}/cli/policy:1")
    with fault_proxy(registry) as proxy:
        root = rb.fresh_root()
        ctx = rb.context({"Containerfile": f"FROM {proxy.host}/cli/policy:1\n"})
        never = rb.run("build", "-q", "--pull=never", ctx, root=root, check=False)
        assert never.returncode != 0 and proxy.requests() == []
        rb.build(ctx, root=root)  # missing: pulled once
        assert len(proxy.requests("GET", "/manifests/")) == 1
        rb.build(ctx, root=root)  # present: no registry traffic
        assert len(proxy.requests("GET", "/manifests/")) == 1
        rb.run("build", "-q", "--pull", ctx, root=root)  # bare --pull is always, and leaves CONTEXT alone
        assert len(proxy.requests("GET", "/manifests/")) == 2
        rb.build(ctx, "--pull=always", root=root)
        assert len(proxy.requests("GET", "/manifests/")) == 3


def _assert_store_clean(root: str) -> None:
    """Every file under the store's blobs/ is a whole blob named by its digest: nothing partial."""
    blobs = os.path.join(root, "blobs")
    for dirpath, _, files in os.walk(blobs):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, blobs)
            assert rel.startswith("sha256/"), rel
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == name, rel


def test_build_pull_through_faults(rb: Runner, busybox: str, registry: str) -> None:
    seed_busybox(busybox, f"{registry}/cli/faulty:1")
    with fault_proxy(registry) as proxy:
        ctx = rb.context({"Containerfile": f"FROM {proxy.host}/cli/faulty:1\nRUN test -x /bin/sh\n"})
        proxy.add(Fault("drop", path="/blobs/sha256:"))
        proxy.add(Fault("status", path="/manifests/", status=503))
        root = rb.fresh_root()
        assert rb.build(ctx, root=root).startswith("sha256:")
        assert all(f.hits == 1 for f in proxy.faults)
        _assert_store_clean(root)
        proxy.add(Fault("flip", path="/blobs/sha256:", times=None))
        root = rb.fresh_root()
        failed = rb.run("build", ctx, root=root, check=False)
        assert failed.returncode != 0
        assert f"pulling {proxy.host}/cli/faulty:1" in failed.stderr and "failed verification" in failed.stderr
        assert "Traceback" not in failed.stderr
        _assert_store_clean(root)
