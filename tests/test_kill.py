"""A build killed with SIGKILL at any moment (pull, unpack, RUN, COPY, commit, push) leaves no process, no
mount and no temporary file behind, a store that `rbuild check` passes, and the next build works.

The rbuild process tree: rbuild (the host user) -> its user-namespace child (the build) -> per RUN an
intermediate process -> pid 1 of the RUN's pid namespace (the RUN command). Each kill point is hit
one of three ways: SIGKILL to rbuild alone (its children must notice and end, cleaning up), to the
namespace child alone (rbuild must report and end), or to the whole tree at once (a crash: nothing
cleans up, and the store must still be consistent). Kill times are random over a build's duration;
with CI=true the seed is fixed (RBUILD_KILL_SEED overrides it), and a failure names its seed and point.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import time
import urllib.parse

from conftest import Runner, busybox_layer, default_signals, end_session

TEMP_PREFIXES = (".tmp-", ".partial-", ".lock-")  # temporary files in the store (rootless.store.store's)


def _seed() -> int:
    if os.environ.get("RBUILD_KILL_SEED"):
        return int(os.environ["RBUILD_KILL_SEED"])
    return 20240917 if os.environ.get("CI") else random.randrange(1 << 30)


# -------------------------------------------------------------------------------------------------------
# base images: busybox plus a small layer of their own, so that every build pulls and unpacks one


def _unique_layer(rng: random.Random, n: int) -> bytes:
    """A layer of its own for base n, written by rbuild's deterministic tar writer (so that `check` can
    verify it by writing its directory again; busybox's layer takes the slower path of unpacking again)."""
    import io
    import shutil
    import tempfile

    from rootless.layer import layers

    top = tempfile.mkdtemp(prefix="rbtest-kill-")
    try:
        d = os.path.join(top, "opt", f"base{n}")
        os.makedirs(d)
        for i in range(60):
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                f.write(rng.randbytes(rng.randrange(16, 4096)))
        with open(os.path.join(d, "blob"), "wb") as f:
            f.write(rng.randbytes(2 << 20))
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                os.utime(os.path.join(dirpath, name), (1700000000, 1700000000))
        os.utime(top, (1700000000, 1700000000))
        out = io.BytesIO()
        layers.write_tar(top, out)
        return out.getvalue()
    finally:
        shutil.rmtree(top)


def _image(layers: list[bytes], n: int) -> tuple[dict[str, bytes], bytes]:
    """(blobs by digest, manifest) of an OCI image with these uncompressed layers."""
    blobs: dict[str, bytes] = {}
    descs, diff_ids = [], []
    for raw in layers:
        blob = gzip.compress(raw, compresslevel=1, mtime=0)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        blobs[digest] = blob
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Labels": {"base": str(n)}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    blobs[cdigest] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": len(config)},
            "layers": descs,
        }
    ).encode()
    return blobs, manifest


def _push(registry: str, repo: str, blobs: dict[str, bytes], manifest: bytes) -> None:
    """A plain upload over the distribution API (anonymous loopback registry)."""
    conn = http.client.HTTPConnection(registry, timeout=30)
    try:
        for digest, data in blobs.items():
            conn.request("HEAD", f"/v2/{repo}/blobs/{digest}")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                continue
            conn.request("POST", f"/v2/{repo}/blobs/uploads/")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 202, resp.status
            loc = urllib.parse.urlsplit(resp.getheader("Location") or "")
            query = (loc.query + "&" if loc.query else "") + "digest=" + urllib.parse.quote(digest)
            conn.request("PUT", f"{loc.path}?{query}", body=data, headers={"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 201, resp.status
        conn.request(
            "PUT",
            f"/v2/{repo}/manifests/1",
            body=manifest,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201, resp.status
    finally:
        conn.close()


def _layout(path: str, blobs: dict[str, bytes], manifest: bytes) -> None:
    os.makedirs(os.path.join(path, "blobs", "sha256"))
    for digest, data in {**blobs, "sha256:" + hashlib.sha256(manifest).hexdigest(): manifest}.items():
        with open(os.path.join(path, "blobs", "sha256", digest[7:]), "wb") as f:
            f.write(data)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    for dirpath, _, files in os.walk(path):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _bases(rb: Runner, registry: str, count: int, rng: random.Random, tag: str) -> list[str]:
    """`count` distinct base images, alternately in the registry and in OCI layouts; their references."""
    bb = busybox_layer()
    refs = []
    for n in range(count):
        blobs, manifest = _image([bb, _unique_layer(rng, n)], n)
        if n % 2 == 0:
            _push(registry, f"kill-{tag}/base{n}", blobs, manifest)
            refs.append(f"{registry}/kill-{tag}/base{n}:1")
        else:
            path = os.path.join(rb.mkdir(), "layout")
            _layout(path, blobs, manifest)
            refs.append(f"oci:{path}")
    return refs


# -------------------------------------------------------------------------------------------------------
# what a killed build may not leave behind


def _mounts_under(paths: list[str]) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4] for ln in f]
    return [p for p in points if any(p == q or p.startswith(q + "/") for q in paths)]


def _leftovers(root: str, runtime: str) -> list[str]:
    """Temporary files and directories in the store and the runtime directory."""
    found = [os.path.join(root, "tmp", n) for n in os.listdir(os.path.join(root, "tmp"))]
    for d in (
        root,
        os.path.join(root, "blobs"),
        os.path.join(root, "blobs", "sha256"),
        os.path.join(root, "chains"),
        os.path.join(root, "cache"),
    ):
        found += [os.path.join(d, n) for n in os.listdir(d) if n.startswith(TEMP_PREFIXES)]
    layers = set(os.listdir(os.path.join(root, "chains")))
    found += [os.path.join(root, "chains", n) for n in layers if not n.endswith(".json") and n + ".json" not in layers]
    mine = os.path.join(runtime, hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16])
    if os.path.isdir(mine):  # this store's mount points (Store.runtime_path)
        found += [os.path.join(mine, n) for n in os.listdir(mine)]
    return found


def _namespace_child(pid: int) -> int | None:
    """rbuild's child in the user namespace (not a newuidmap/newgidmap it may be running), if any yet."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
    except OSError:
        return None
    for kid in kids:
        try:
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() not in ("newuidmap", "newgidmap"):
                    return kid
        except OSError:
            continue
    return None


def _kill(proc: subprocess.Popen, how: str) -> None:
    if how == "tree":
        os.killpg(proc.pid, signal.SIGKILL)  # the session the test started: rbuild and all it made
        return
    target = _namespace_child(proc.pid) if how == "worker" else None
    try:
        os.kill(target or proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _build_argv(rb: Runner, ctx: str, registry: str, n: int, tag: str) -> list[str]:
    return rb._prefix() + [rb.bin, "build", "--no-cache", "-t", f"{registry}/kill-{tag}/out{n}:1", "--push", ctx]


def _context(rb: Runner, base: str, n: int, rng: random.Random) -> str:
    user = "USER 0" if not rb.has_range else "USER app"
    return rb.context(
        {
            "Containerfile": f"FROM {base}\nRUN for i in $(seq 1 150); do echo $i > /n$i; done; "
            f"dd if=/dev/urandom of=/big bs=64k count=16 2>/dev/null\nCOPY data /data\n"
            f"RUN rm /n1\n{user}\nRUN cat /data/* /opt/base{n}/f1 > /tmp/cat\n",
            "data/a": "a" * 5000,
            "data/b": rng.randbytes(100000),
        }
    )


def _kill_run(rb: Runner, registry: str, points: int, tag: str) -> None:
    seed = _seed()
    rng = random.Random(seed)
    root = rb.fresh_root()
    runtime = f"/tmp/rbuild-{rb.uid}"
    bases = _bases(rb, registry, points + 2, rng, tag)
    env = rb._env({"RBUILD_ROOT": root})

    # two whole builds first: the first pulls busybox, the second times a build like those to be killed
    for n in (0, 1):
        started = time.monotonic()
        res = subprocess.run(
            _build_argv(rb, _context(rb, bases[n], n, rng), registry, n, tag),
            env=env,
            cwd=rb.base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        duration = time.monotonic() - started
        assert res.returncode == 0, res.stderr
    hows = ["parent", "tree", "worker"]
    for i in range(points):
        n = i + 2
        at = rng.uniform(0.0, duration)
        how = hows[i % 3]
        where = f"seed {seed}, point {i}: {how} killed at {at:.2f}s of {duration:.2f}s"
        ctx = _context(rb, bases[n], n, rng)
        proc = subprocess.Popen(
            _build_argv(rb, ctx, registry, n, tag),
            env=env,
            cwd=rb.base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=default_signals,
        )
        try:
            time.sleep(at)
            _kill(proc, how)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{where}: rbuild did not end") from None
        finally:
            end_session(proc)
        where += f" (its last words: {(err or b'').decode(errors='replace').strip().splitlines()[-1:]})"
        deadline = time.monotonic() + 15
        while rb.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rb.processes() == [], where
        assert _mounts_under([root, runtime]) == [], where
        res = rb.run("check", root=root, check=False)
        assert res.returncode == 0, f"{where}: check failed:\n{res.stdout}{res.stderr}\nbuild said: {err!r}"
        assert _leftovers(root, runtime) == [], where
        res = subprocess.run(
            _build_argv(rb, ctx, registry, n, tag),
            env=env,
            cwd=rb.base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, f"{where}: the next build failed:\n{res.stderr}"
        assert _leftovers(root, runtime) == [], where
    res = rb.run("check", root=root, check=False)
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr


def test_sigkill_at_random_points(rb: Runner, registry: str) -> None:
    _kill_run(rb, registry, 18, "sub")


def test_sigkill_at_random_points_single_uid(rb_single: Runner, registry: str) -> None:
    _kill_run(rb_single, registry, 6, "single")
