"""Hostile images, registries and layouts, through the `rbuild` command as an unprivileged user.

* Manifests, indexes and configs with wrong types are refused on import (registry pull, `oci:`,
  `oci-archive:`, FROM) with one error naming the document and the field; nothing reaches the store, so
  `rbuild images` keeps working.
* A FIFO (or symlink, in an archive) where a layout, archive or build context has a file is refused
  instead of blocking forever (each run has a hang guard that kills its process group).
* `--creds` goes only to registries the command line names, never to a host a Containerfile picks.
* `--compression-level` 0-9 for gzip (4-9 through zlib), deterministic, and decompressing to the diff_id.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Runner
from registry_helpers import RegistryServer, docker_registry, serve

from rootless.oci.platform import host_platform

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback")


# -- helpers ---------------------------------------------------------------------------------------------


def run_guarded(
    rb: Runner, *args: str, root: str, cwd: str | None = None, timeout: float = 60, input: bytes | None = None
) -> subprocess.CompletedProcess:
    """rbuild in its own session; on a hang, the whole group is killed and the test fails."""
    argv = rb._prefix() + [rb.bin, *args]
    proc = subprocess.Popen(
        argv,
        cwd=cwd or rb.base,
        env=rb._env({"RBUILD_ROOT": root}),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"rbuild {' '.join(args)} hung (killed after {timeout}s)")
    return subprocess.CompletedProcess(
        argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


def one_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 125 with exactly one `Error:` line holding every needle, and no exception names."""
    assert res.returncode == 125, (res.returncode, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    assert not EXCEPTION_NAME.search(res.stderr), res.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def images_still_work(rb: Runner, root: str) -> None:
    for args in (["images"], ["images", "--format", "json"]):
        res = rb.run(*args, root=root, check=False)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def tiny_layer() -> tuple[bytes, str]:
    """A gzip layer with one file, and its diff_id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("hello")
        data = b"hello from a hostile image\n"
        info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
        tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def base_config(diff_id: str) -> dict[str, Any]:
    return {
        "created": "2024-01-01T00:00:00Z",
        "architecture": host_platform().architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "A=1", "B=2"], "Cmd": ["sh"], "Labels": {"a": "b"}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "test"}],
    }


DELETE = object()


def mutation(path: tuple[Any, ...], value: Any) -> Callable[[Any], None]:
    """Set (or, for DELETE, remove) the field at `path` of a document."""

    def apply(doc: Any) -> None:
        for key in path[:-1]:
            doc = doc[key]
        if value is DELETE:
            del doc[path[-1]]
        else:
            doc[path[-1]] = value

    return apply


def write_layout(
    path: str,
    *,
    config: Callable[[Any], None] | None = None,
    manifest: Callable[[Any], None] | None = None,
    index: Callable[[Any], None] | None = None,
    nested: Callable[[Any], None] | None = None,
    raw_index: bytes | None = None,
) -> dict[str, str]:
    """A one-layer OCI layout whose documents the callbacks may spoil; `nested` puts an index between
    index.json and the manifest. Returns the digests of what it wrote ("config", "manifest", "index")."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data: bytes) -> str:
        with open(os.path.join(blobs, sha(data)[7:]), "wb") as f:
            f.write(data)
        return sha(data)

    layer, diff_id = tiny_layer()
    cfg = base_config(diff_id)
    if config:
        config(cfg)
    cbytes = json.dumps(cfg).encode()
    man: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(cbytes), "size": len(cbytes)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": put(layer), "size": len(layer)}],
    }
    if manifest:
        manifest(man)
    mbytes = json.dumps(man).encode()
    out = {"config": sha(cbytes), "manifest": put(mbytes)}
    top: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": out["manifest"], "size": len(mbytes)}
    if nested is not None:
        inner = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{**top, "platform": {"architecture": host_platform().architecture, "os": "linux"}}],
        }
        nested(inner)
        ibytes = json.dumps(inner).encode()
        out["index"] = put(ibytes)
        top = {"mediaType": OCI_INDEX, "digest": out["index"], "size": len(ibytes)}
    idx: dict[str, Any] = {"schemaVersion": 2, "manifests": [{**top, "annotations": {REF_NAME: "latest"}}]}
    if index:
        index(idx)
    with open(os.path.join(path, "index.json"), "wb") as f:
        f.write(raw_index if raw_index is not None else json.dumps(idx).encode())
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return out


def tar_dir(src: str, dest: str) -> str:
    with tarfile.open(dest, "w") as tf:
        for name in sorted(os.listdir(src)):
            tf.add(os.path.join(src, name), name)
    return dest


@pytest.fixture(scope="module")
def root(rb: Runner) -> str:
    """One store for this module: a hostile image that got in would not spoil other tests' stores."""
    return rb.fresh_root()


# -- documents with wrong types ----------------------------------------------------------------------------

# (document, path, value, what the error says); "document" is the one the callback spoils
CASES: list[tuple[str, tuple[Any, ...], Any, str]] = [
    ("config", ("created",), 1700000000, ".created is not a string"),
    ("config", ("created",), "yesterday", ".created is not an RFC 3339 date-time"),
    ("config", ("config", "Env"), ["PATH=/bin", "A=1", 3], ".config.Env[2] is not a string"),
    ("config", ("config",), ["Env"], ".config is not an object"),
    ("config", ("config", "Cmd"), "sh", ".config.Cmd is not an array"),
    ("config", ("config", "Entrypoint"), [["sh"]], ".config.Entrypoint[0] is not a string"),
    ("config", ("config", "Labels"), {"a": 1}, '.config.Labels["a"] is not a string'),
    ("config", ("config", "ExposedPorts"), ["80/tcp"], ".config.ExposedPorts is not an object"),
    ("config", ("config", "Volumes"), {"/data": True}, '.config.Volumes["/data"] is not an object'),
    ("config", ("config", "User"), 0, ".config.User is not a string"),
    ("config", ("config", "Env"), ["A=\ud800"], ".config.Env[0] is not valid Unicode"),
    ("config", ("history",), [5], ".history[0] is not an object"),
    ("config", ("history", 0, "empty_layer"), "no", ".history[0].empty_layer is not true or false"),
    ("config", ("rootfs", "type"), "tarball", ".rootfs.type is 'tarball', not \"layers\""),
    ("config", ("rootfs",), None, ".rootfs is not an object"),
    ("config", ("rootfs", "diff_ids"), "sha256:x", ".rootfs.diff_ids is not an array"),
    ("config", ("rootfs", "diff_ids", 0), "sha256:../../etc", ".rootfs.diff_ids[0] is not a digest"),
    ("config", ("architecture",), DELETE, ".architecture is missing"),
    ("config", ("os",), 7, ".os is not a string"),
    ("manifest", ("layers",), 5, ".layers is not an array"),
    ("manifest", ("layers",), DELETE, ".layers is missing"),
    ("manifest", ("layers", 0), "sha256:abc", ".layers[0] is not an object"),
    ("manifest", ("layers", 0, "digest"), DELETE, ".layers[0].digest is missing"),
    ("manifest", ("layers", 0, "size"), -1, ".layers[0].size is not a non-negative integer"),
    ("manifest", ("layers", 0, "size"), "12", ".layers[0].size is not a non-negative integer"),
    ("manifest", ("layers", 0, "mediaType"), 1, ".layers[0].mediaType is not a string"),
    ("manifest", ("layers", 0, "urls"), "http://x", ".layers[0].urls is not an array"),
    ("manifest", ("layers", 0, "annotations"), {"k": ["v"]}, '.layers[0].annotations["k"] is not a string'),
    ("manifest", ("config",), DELETE, ".config is missing"),
    ("manifest", ("config",), [], ".config is not an object"),
    ("manifest", ("config", "mediaType"), DELETE, ".config.mediaType is missing"),
    ("manifest", ("config", "digest"), "sha256:../../../etc/passwd", ".config.digest is not a digest"),
    ("manifest", ("schemaVersion",), "2", ".schemaVersion is not 2"),
    ("manifest", ("annotations",), [], ".annotations is not an object"),
    ("manifest", ("mediaType",), "text/plain", ".mediaType 'text/plain' is not an image manifest type"),
    ("index.json", ("manifests",), 5, ".manifests is not an array"),
    ("index.json", ("manifests", 0), "sha256:abc", ".manifests[0] is not an object"),
    ("index.json", ("manifests", 0, "digest"), DELETE, ".manifests[0].digest is missing"),
    ("index.json", ("manifests", 0, "size"), None, ".manifests[0].size is not a non-negative integer"),
    ("index.json", ("manifests", 0, "annotations"), "latest", ".manifests[0].annotations is not an object"),
    ("index.json", ("schemaVersion",), DELETE, ".schemaVersion is missing"),
    ("index", ("manifests",), {}, ".manifests is not an array"),
    ("index", ("manifests", 0, "platform"), "linux/amd64", ".manifests[0].platform is not an object"),
    ("index", ("manifests", 0, "platform", "architecture"), 64, ".manifests[0].platform.architecture is not a string"),
]


def _layout_for(path: str, case: tuple[str, tuple[Any, ...], Any, str]) -> str:
    """The layout for a case; returns how the error names the spoilt document."""
    doc, field, value, _ = case
    spoil = mutation(field, value)
    if doc == "index":
        return f"index {write_layout(path, nested=spoil)['index']}"
    digests = write_layout(path, **{{"index.json": "index"}.get(doc, doc): spoil})
    return "index.json" if doc == "index.json" else f"{doc} {digests[doc]}"


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}:{c[3]}" for c in CASES])
def test_layout_with_wrong_types_is_refused(rb: Runner, root: str, case: tuple[str, tuple[Any, ...], Any, str]) -> None:
    layout = rb.mkdir() + "/layout"
    named = _layout_for(layout, case)
    rb.own(os.path.dirname(layout))
    one_error(run_guarded(rb, "pull", f"oci:{layout}", root=root), f"oci:{layout}: {named}: {case[3]}")
    images_still_work(rb, root)


ARCHIVE_CASES = [
    c
    for c in CASES
    if c[3]
    in (
        ".config.Env[2] is not a string",
        ".layers is not an array",
        ".manifests is not an array",
        ".created is not a string",
    )
]


@pytest.mark.parametrize("case", ARCHIVE_CASES, ids=[f"{c[0]}:{c[3]}" for c in ARCHIVE_CASES])
def test_oci_archive_with_wrong_types_is_refused(
    rb: Runner, root: str, case: tuple[str, tuple[Any, ...], Any, str]
) -> None:
    d = rb.mkdir()
    named = _layout_for(d + "/layout", case)
    archive = tar_dir(d + "/layout", d + "/image.tar")
    rb.own(d)
    one_error(
        run_guarded(rb, "pull", f"oci-archive:{archive}", root=root), f"oci-archive:{archive}: {named}: {case[3]}"
    )
    images_still_work(rb, root)


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"[1, 2]", "index.json: not a JSON object"),
        (b'{"schemaVersion": 2, "manifests": [', "index.json: not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "index.json: not valid JSON"),
    ],
)
def test_layout_index_that_is_not_an_object(rb: Runner, root: str, raw: bytes, message: str) -> None:
    layout = rb.mkdir() + "/layout"
    write_layout(layout, raw_index=raw)
    rb.own(os.path.dirname(layout))
    one_error(run_guarded(rb, "pull", f"oci:{layout}", root=root), message)


def test_from_a_layout_with_a_bad_config_names_the_line_and_the_field(rb: Runner, root: str) -> None:
    layout = rb.mkdir() + "/layout"
    digests = write_layout(layout, config=mutation(("config", "Env"), ["PATH=/bin", "A=1", {"B": 2}]))
    ctx = rb.context({"Containerfile": f"FROM oci:{layout}\nRUN true\n"})
    one_error(
        run_guarded(rb, "build", ctx, root=root),
        "Containerfile:1",
        f"config {digests['config']}: .config.Env[2] is not a string",
    )
    images_still_work(rb, root)


def test_docker_style_nulls_and_unknown_fields_are_accepted(rb: Runner, busybox: str, root: str) -> None:
    """Docker's Go types write empty lists and maps as null, and the spec says to ignore unknown fields."""
    layout = rb.mkdir() + "/layout"

    def docker_config(cfg: dict[str, Any]) -> None:
        cfg["config"].update(
            {
                "Entrypoint": None,
                "Volumes": None,
                "OnBuild": None,
                "Labels": None,
                "Healthcheck": {"Test": ["NONE"]},
                "Hostname": "",
                "AttachStdin": False,
            }
        )
        cfg.update({"container_config": {"Cmd": None}, "docker_version": "24.0.0", "x-unknown": [1, {"a": None}]})

    write_layout(
        layout,
        config=docker_config,
        manifest=lambda m: m.update({"x-extra": {"any": ["thing"]}, "annotations": {"k": "v"}}),
        index=lambda i: i.update({"x-extra": 1}),
    )
    rb.own(os.path.dirname(layout))
    image = run_guarded(rb, "pull", f"oci:{layout}", root=root)
    assert image.returncode == 0, image.stderr
    ctx = rb.context({"Containerfile": f"FROM oci:{layout}\nLABEL x=y\nENV C=3\n"})
    built = run_guarded(rb, "build", "-q", ctx, root=root)
    assert built.returncode == 0, built.stderr
    doc = json.loads(rb.run("inspect", built.stdout.strip(), root=root).stdout)[0]
    assert doc["Config"]["Labels"] == {"x": "y"} and "C=3" in doc["Config"]["Env"]
    images_still_work(rb, root)


# -- through a real registry -------------------------------------------------------------------------------


def _request(
    host: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def push_raw(
    host: str, repo: str, tag: str, blobs: list[bytes], manifest: bytes, media_type: str = OCI_MANIFEST
) -> None:
    """Blobs and a manifest exactly as given, past any client-side checks."""
    for data in blobs:
        status, headers, _ = _request(host, "POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, status
        location = headers["Location"]
        location = location.split(host, 1)[-1] if "://" in location else location
        sep = "&" if "?" in location else "?"
        status, _, body = _request(
            host, "PUT", f"{location}{sep}digest={sha(data)}", data, {"Content-Type": "application/octet-stream"}
        )
        assert status == 201, (status, body)
    status, _, body = _request(host, "PUT", f"/v2/{repo}/manifests/{tag}", manifest, {"Content-Type": media_type})
    assert status == 201, (status, body)


# what docker-registry itself accepts (it refuses the other manifests: the layout tests cover those)
REGISTRY_CASES: list[tuple[str, tuple[Any, ...], Any, str]] = [
    ("config", ("created",), 1700000000, ".created is not a string"),
    ("config", ("config", "Env"), ["PATH=/bin", "A=1", 3], ".config.Env[2] is not a string"),
    ("config", ("config",), ["Env"], ".config is not an object"),
    ("config", ("rootfs", "diff_ids", 0), "sha256:../../etc", ".rootfs.diff_ids[0] is not a digest"),
    ("manifest", ("layers",), DELETE, ".layers is missing"),
    ("manifest", ("layers", 0, "size"), -1, ".layers[0].size is not a non-negative integer"),
    ("manifest", ("config", "mediaType"), DELETE, ".config.mediaType is missing"),
]


@pytest.mark.parametrize("case", REGISTRY_CASES, ids=[f"{c[0]}:{c[3]}" for c in REGISTRY_CASES])
def test_registry_image_with_wrong_types_is_refused(
    rb: Runner, registry: str, root: str, case: tuple[str, tuple[Any, ...], Any, str]
) -> None:
    doc, field, value, message = case
    layer, diff_id = tiny_layer()
    cfg = base_config(diff_id)
    if doc == "config":
        mutation(field, value)(cfg)
    cbytes = json.dumps(cfg).encode()
    man: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha(cbytes), "size": len(cbytes)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha(layer), "size": len(layer)}],
    }
    if doc == "manifest":
        mutation(field, value)(man)
    mbytes = json.dumps(man).encode()
    repo = "hostile/" + re.sub(r"[^a-z0-9]+", "-", message.lower()).strip("-")
    push_raw(registry, repo, "1", [layer, cbytes], mbytes)
    named = f"config {sha(cbytes)}" if doc == "config" else f"manifest {sha(mbytes)}"
    one_error(run_guarded(rb, "pull", f"{registry}/{repo}:1", root=root), f"{registry}/{repo}:1: {named}: {message}")
    images_still_work(rb, root)


def test_docker_schema2_image_with_wrong_types_is_refused(rb: Runner, registry: str, root: str) -> None:
    layer, diff_id = tiny_layer()
    cfg = base_config(diff_id)
    cfg["config"]["Cmd"] = "sh -c true"
    cbytes = json.dumps(cfg).encode()
    docker_manifest = "application/vnd.docker.distribution.manifest.v2+json"
    man = {
        "schemaVersion": 2,
        "mediaType": docker_manifest,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": sha(cbytes),
            "size": len(cbytes),
        },
        "layers": [
            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha(layer), "size": len(layer)}
        ],
    }
    push_raw(registry, "hostile/docker", "1", [layer, cbytes], json.dumps(man).encode(), docker_manifest)
    one_error(
        run_guarded(rb, "pull", f"{registry}/hostile/docker:1", root=root),
        f"{registry}/hostile/docker:1: config {sha(cbytes)}: .config.Cmd is not an array",
    )
    images_still_work(rb, root)


# -- FIFOs and symlinks where files belong -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["index.json", "manifest", "config", "layer"])
def test_fifo_in_a_layout_is_refused_not_waited_on(rb: Runner, which: str) -> None:
    root = rb.fresh_root()  # the layer must not be in the store already
    layout = rb.mkdir() + "/layout"
    digests = write_layout(layout)
    if which == "index.json":
        target = os.path.join(layout, "index.json")
    else:
        if which == "layer":
            man = json.load(open(os.path.join(layout, "blobs", "sha256", digests["manifest"][7:])))
            digests["layer"] = man["layers"][0]["digest"]
        target = os.path.join(layout, "blobs", "sha256", digests[which][7:])
    os.unlink(target)
    os.mkfifo(target)
    rb.own(os.path.dirname(layout))
    one_error(
        run_guarded(rb, "pull", f"oci:{layout}", root=root),
        f"{os.path.relpath(target, layout)} is a FIFO, not a regular file",
    )


def test_fifo_oci_layout_file_is_never_opened(rb: Runner, root: str) -> None:
    layout = rb.mkdir() + "/layout"
    write_layout(layout)
    os.unlink(os.path.join(layout, "oci-layout"))
    os.mkfifo(os.path.join(layout, "oci-layout"))
    rb.own(os.path.dirname(layout))
    res = run_guarded(rb, "pull", f"oci:{layout}", root=root)
    assert res.returncode == 0, res.stderr


def _archive_with(d: str, member: tarfile.TarInfo) -> str:
    """An OCI archive whose index.json is replaced by `member`."""
    write_layout(d + "/layout")
    path = d + "/image.tar"
    with tarfile.open(path, "w") as tf:
        for name in sorted(os.listdir(d + "/layout")):
            if name != "index.json":
                tf.add(os.path.join(d, "layout", name), name)
        tf.addfile(member)
    return path


def test_oci_archive_with_a_fifo_index_is_refused(rb: Runner, root: str) -> None:
    d = rb.mkdir()
    member = tarfile.TarInfo("index.json")
    member.type = tarfile.FIFOTYPE
    archive = _archive_with(d, member)
    rb.own(d)
    one_error(
        run_guarded(rb, "pull", f"oci-archive:{archive}", root=root),
        f"oci-archive:{archive}: index.json is a FIFO, not a regular file",
    )


def test_oci_archive_member_symlinked_out_of_the_archive_is_refused(rb: Runner, root: str) -> None:
    d = rb.mkdir()
    outside = rb.write(
        os.path.join(d, "outside.json"), json.dumps({"schemaVersion": 2, "manifests": [], "secret": "do-not-read"})
    )
    member = tarfile.TarInfo("index.json")
    member.type, member.linkname = tarfile.SYMTYPE, outside
    archive = _archive_with(d, member)
    rb.own(d)
    one_error(
        run_guarded(rb, "pull", f"oci-archive:{archive}", root=root),
        f"oci-archive:{archive}: index.json is a symbolic link, not a regular file",
    )


@pytest.mark.parametrize("name", ["Containerfile", ".dockerignore", ".containerignore"])
def test_fifo_in_the_build_context_is_refused(rb: Runner, busybox: str, root: str, name: str) -> None:
    files = {"Containerfile": f"FROM oci:{busybox}\nCOPY . /ctx\n", "a": "a"}
    ctx = rb.context({k: v for k, v in files.items() if k != name})
    os.mkfifo(os.path.join(ctx, name))
    rb.own(ctx)
    one_error(run_guarded(rb, "build", "-q", ctx, root=root), f"{name} is ")


def test_containerfile_named_with_f_may_be_a_pipe(rb: Runner, busybox: str, root: str) -> None:
    """-f names what the user chose: a named pipe (process substitution where /dev/fd is missing) works."""
    d = rb.mkdir()
    fifo = os.path.join(d, "cf.pipe")
    os.mkfifo(fifo)
    rb.own(d)
    ctx = rb.context({"a": "a"})

    def feed() -> None:
        with open(fifo, "w") as f:
            f.write(f"FROM oci:{busybox}\nCOPY a /a\n")

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    res = run_guarded(rb, "build", "-q", "-f", fifo, ctx, root=root)
    writer.join(10)
    assert res.returncode == 0 and res.stdout.strip().startswith("sha256:"), res.stderr


# -- --creds goes only where the command line says -----------------------------------------------------------

PASSWORD = "sec-oci-s3cret"


@pytest.fixture(scope="module")
def private() -> Iterator[RegistryServer]:
    with docker_registry(htpasswd={"alice": PASSWORD}) as srv:
        yield srv


@contextlib.contextmanager
def recording_registry() -> Iterator[tuple[str, list[tuple[str, str, str | None]]]]:
    """A "registry" on loopback that asks every request for basic auth and records the Authorization
    header it gets: (method, path, header or None)."""
    seen: list[tuple[str, str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="recorder"')
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = do_PUT = _answer

    with serve(Handler) as server:
        yield f"127.0.0.1:{server.server_address[1]}", seen


def seed(busybox: str, dest: str) -> None:
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            f"--dest-creds=alice:{PASSWORD}",
            f"oci:{busybox}:latest",
            f"docker://{dest}",
        ],
        check=True,
        capture_output=True,
    )


def test_creds_are_not_sent_to_a_registry_the_containerfile_picks(
    rb: Runner, private: RegistryServer, root: str
) -> None:
    with recording_registry() as (evil, seen):
        ctx = rb.context({"Containerfile": f"FROM {evil}/lure/base:1\nRUN true\n"})
        res = run_guarded(
            rb, "build", "--creds", f"alice:{PASSWORD}", "-t", f"{private.host}/app/x:1", "--push", ctx, root=root
        )
        one_error(
            res,
            "Containerfile:1",
            f"authentication required (401); run rbuild login {evil}",
            "--creds goes only to the registries named on the command line",
        )
    assert seen, "the FROM registry was never contacted"
    assert [s for s in seen if s[2] is not None] == []
    assert PASSWORD not in res.stdout + res.stderr


def test_creds_go_to_the_push_registry_and_from_images_on_it(
    rb: Runner, busybox: str, private: RegistryServer, root: str
) -> None:
    seed(busybox, f"{private.host}/base/busybox:1")
    ctx = rb.context({"Containerfile": f"FROM {private.host}/base/busybox:1\nCOPY a /a\n", "a": "a"})
    res = run_guarded(
        rb, "build", "-q", "--creds", f"alice:{PASSWORD}", "-t", f"{private.host}/app/y:1", "--push", ctx, root=root
    )
    assert res.returncode == 0, res.stderr
    auth = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    status, _, _ = _request(
        private.host, "HEAD", "/v2/app/y/manifests/1", headers={"Authorization": auth, "Accept": OCI_MANIFEST}
    )
    assert status == 200
    pulled = run_guarded(rb, "pull", "--creds", f"alice:{PASSWORD}", f"{private.host}/app/y:1", root=rb.fresh_root())
    assert pulled.returncode == 0, pulled.stderr


def test_build_creds_without_a_registry_to_use_them_for_is_refused(rb: Runner, busybox: str, root: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n"})
    one_error(
        run_guarded(rb, "build", "--creds", "alice:pw", "-t", "app:1", ctx, root=root),
        "--creds goes only to the registries of -t names",
    )


def test_pull_sends_creds_to_the_registry_it_names(rb: Runner, root: str) -> None:
    with recording_registry() as (host, seen):
        res = run_guarded(rb, "pull", "--creds", f"alice:{PASSWORD}", f"{host}/named/here:1", root=root)
    one_error(res, "authentication failed (401)")
    auth = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert auth in [s[2] for s in seen]


# -- gzip levels 0-9 -----------------------------------------------------------------------------------------


def _get(host: str, path: str, accept: str = "") -> bytes:
    status, _, body = _request(host, "GET", path, headers={"Accept": accept} if accept else {})
    assert status == 200, (path, status)
    return body


def test_gzip_level_9_pushes_and_decompresses_to_the_diff_id(rb: Runner, busybox: str, registry: str) -> None:
    text = "".join(f"line {i} of a file that compresses well\n" for i in range(40_000))
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\nCOPY big.txt /big.txt\n", "big.txt": text})
    root = rb.fresh_root()
    image = rb.build(ctx, "--timestamp", "1700000000", root=root)
    layers = {}
    for level in ("9", "1"):
        rb.run("push", "-q", "--compression-level", level, image, f"docker://{registry}/gzip/levels:{level}", root=root)
        manifest = json.loads(_get(registry, f"/v2/gzip/levels/manifests/{level}", OCI_MANIFEST))
        config = json.loads(_get(registry, f"/v2/gzip/levels/blobs/{manifest['config']['digest']}"))
        desc = manifest["layers"][-1]
        blob = _get(registry, f"/v2/gzip/levels/blobs/{desc['digest']}")
        assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # the fixed header, at every level
        assert sha(gzip.decompress(blob)) == config["rootfs"]["diff_ids"][-1]
        layers[level] = desc
    assert layers["9"]["digest"] != layers["1"]["digest"] and layers["9"]["size"] < layers["1"]["size"]

    # the same build in another store gives the same level-9 blob
    other = rb.fresh_root()
    assert rb.build(ctx, "--timestamp", "1700000000", root=other) == image
    out = rb.mkdir()
    rb.run("push", "-q", "--compression-level", "9", image, f"oci:{out}/l", root=other)
    index = json.load(open(f"{out}/l/index.json"))
    manifest = json.load(open(f"{out}/l/blobs/sha256/{index['manifests'][0]['digest'][7:]}"))
    assert manifest["layers"][-1]["digest"] == layers["9"]["digest"]

    one_error(
        rb.run("push", "--compression-level", "10", image, f"oci:{out}/bad", root=root, check=False),
        "gzip level 10 out of range 0..9",
    )
