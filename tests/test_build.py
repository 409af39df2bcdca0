"""End to end: `rbuild build` and the image commands, run as unprivileged users (issue 2's contract)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from conftest import IS_ROOT, Runner, busybox_layer, default_signals, write_oci_layout

from rootless.store.store import chain_ids

ID_RE = re.compile(r"^sha256:[0-9a-f]{64}\n$")


def cf(busybox: str, body: str) -> str:
    return f"FROM oci:{busybox}\n{body}"


def store_snapshot(root: str) -> tuple[str, list[str]]:
    """What a failed command must leave untouched: the image index and an empty staging area."""
    try:
        with open(os.path.join(root, "images.json")) as f:
            images = f.read()
    except FileNotFoundError:
        images = ""
    return images, sorted(os.listdir(os.path.join(root, "tmp"))) if os.path.isdir(os.path.join(root, "tmp")) else []


def test_hello_quiet_id_everywhere(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, 'RUN echo hi > /greeting\nCMD ["cat", "/greeting"]\n')})
    iid = os.path.join(ctx, "iid")
    res = rb.run("build", "-q", "-t", "hello-q:1.0", "--iidfile", iid, ctx)
    assert ID_RE.match(res.stdout), repr(res.stdout)
    image_id = res.stdout.strip()
    with open(iid) as f:
        assert f.read().strip() == image_id
    images = json.loads(rb.run("images", "--format", "json").stdout)
    assert any(i["Id"] == image_id and "localhost/hello-q:1.0" in i["Names"] for i in images)
    for name in ("hello-q:1.0", "localhost/hello-q:1.0", image_id, image_id[7:], image_id[7:19]):
        doc = json.loads(rb.run("inspect", name).stdout)[0]
        assert doc["Id"] == image_id
        assert doc["RepoTags"] == ["localhost/hello-q:1.0"]
        assert doc["Config"]["Cmd"] == ["cat", "/greeting"]
        assert len(doc["RootFS"]["Layers"]) == 2
        assert doc["History"][-1]["created_by"].startswith("CMD")
    table = rb.run("images").stdout
    assert "localhost/hello-q" in table and image_id[7:19] in table


def test_not_quiet_prints_steps_on_stderr_and_id_last_on_stdout(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, "RUN echo out-of-run\n")})
    res = rb.run("build", "--no-cache", ctx)
    assert res.stdout.strip().splitlines()[-1].startswith("sha256:")
    assert "out-of-run" not in res.stdout
    assert "out-of-run" in res.stderr and "STEP 2/2: RUN echo out-of-run" in res.stderr


def test_run_is_root_inside_but_not_on_host(rb: Runner, busybox: str) -> None:
    assert rb.uid != 0 or not IS_ROOT
    run = 'RUN test "$(id -u)" = 0 && id -u > /uid && cat /proc/self/uid_map > /map\n'
    ctx = rb.context({"Containerfile": cf(busybox, run)})
    out = rb.mkdir()
    rb.build(ctx, "-t", "uidcheck")
    rb.run("push", "uidcheck", f"oci:{out}/layout")
    tree = flatten(f"{out}/layout")
    assert tree["uid"][1] == b"0\n"
    first = tree["map"][1].split()
    assert first[:2] == [b"0", str(rb.uid).encode()], tree["map"][1]


def flatten(layout: str) -> dict[str, tuple[str, bytes]]:
    """path -> (type, content) of an OCI layout's merged tree (enough for these tests)."""
    import gzip
    import io
    import tarfile

    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)

    def blob(d: str) -> bytes:
        with open(os.path.join(layout, "blobs", *d.split(":")), "rb") as f:
            return f.read()

    man = json.loads(blob(index["manifests"][-1]["digest"]))
    tree: dict[str, tuple[str, bytes]] = {}
    for layer in man["layers"]:
        data = blob(layer["digest"])
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:4] == b"\x28\xb5\x2f\xfd":
            import zstandard

            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf.getmembers():
                name = m.name.strip("/").removeprefix("./")
                base = os.path.basename(name)
                parent = os.path.dirname(name)
                if base == ".wh..wh..opq":
                    for k in [k for k in tree if k.startswith(parent + "/")]:
                        del tree[k]
                    continue
                if base.startswith(".wh."):
                    gone = os.path.join(parent, base[4:])
                    for k in [k for k in tree if k == gone or k.startswith(gone + "/")]:
                        del tree[k]
                    continue
                if m.isfile():
                    f = tf.extractfile(m)
                    tree[name] = ("file", f.read() if f else b"")
                elif m.issym():
                    tree[name] = ("symlink", m.linkname.encode())
                elif m.islnk():
                    tree[name] = tree.get(m.linkname.strip("/"), ("file", b""))
                else:
                    tree[name] = ("dir" if m.isdir() else "other", b"")
    return tree


def test_cached_rebuild_reuses_every_step_and_no_cache_rebuilds(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, "COPY a /a\nRUN cat /a > /b\nENV X=1\n"), "a": "data\n"})
    first = rb.build(ctx)
    res = rb.run("build", ctx)
    assert res.stdout.strip().splitlines()[-1] == first
    assert res.stderr.count("Using cache") == 3
    # touching a source without changing it keeps the cache (mtimes are not part of the key)
    os.utime(os.path.join(ctx, "a"), (1, 1))
    assert rb.build(ctx) == first
    with open(os.path.join(ctx, "a"), "w") as f:
        f.write("other\n")
    changed = rb.run("build", ctx)
    assert changed.stdout.strip() != first and "Using cache" not in changed.stderr.split("COPY a /a")[1]
    nc = rb.run("build", "--no-cache", ctx)
    assert "Using cache" not in nc.stderr


def test_tag_rmi_and_names(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, "LABEL purpose=tagging\n")})
    image_id = rb.build(ctx, "-t", "tagme:1.0")
    rb.run("tag", "tagme:1.0", "tagme:latest", "quay.io/example/tagme:2")
    doc = json.loads(rb.run("inspect", image_id[7:19]).stdout)[0]
    assert sorted(doc["RepoTags"]) == ["localhost/tagme:1.0", "localhost/tagme:latest", "quay.io/example/tagme:2"]
    rb.run("rmi", "tagme:1.0")
    doc = json.loads(rb.run("inspect", image_id).stdout)[0]
    assert "localhost/tagme:1.0" not in doc["RepoTags"]
    rb.run("rmi", "-f", image_id)
    res = rb.run("inspect", image_id, check=False)
    assert res.returncode == 125 and res.stderr.startswith("Error:")


def test_rmi_frees_layers_no_image_needs(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    a = rb.build(rb.context({"Containerfile": cf(busybox, "RUN echo a > /a\n")}), "-t", "gc-a", root=root)
    b = rb.build(rb.context({"Containerfile": cf(busybox, "RUN echo b > /b\n")}), "-t", "gc-b", root=root)
    layers_a = json.loads(rb.run("inspect", a, root=root).stdout)[0]["RootFS"]["Layers"]
    layers_b = json.loads(rb.run("inspect", b, root=root).stdout)[0]["RootFS"]["Layers"]
    assert layers_a[0] == layers_b[0] and layers_a[1] != layers_b[1]
    rb.run("rmi", "gc-a", root=root)
    present = set(os.listdir(os.path.join(root, "chains")))  # layers are stored by chain id
    chains_a, chains_b = (chain_ids(x) for x in (layers_a, layers_b))
    assert chains_a[1][7:] not in present and chains_a[1][7:] + ".json" not in present
    assert {chains_b[0][7:], chains_b[1][7:]} <= present
    out = rb.mkdir()
    rb.run("push", "gc-b", f"oci:{out}/l", root=root)
    assert flatten(f"{out}/l")["b"] == ("file", b"b\n")
    assert rb.run("inspect", "gc-a", root=root, check=False).returncode == 125


def test_concurrent_builds_share_one_store(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "RUN echo same > /same\nCOPY Containerfile /cf\n")})
    argv = rb._prefix() + [rb.bin, "build", "-q", "--no-cache", ctx]
    procs = [
        subprocess.Popen(
            argv,
            env=rb._env({"RBUILD_ROOT": root}),
            cwd=rb.base,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        ids.append(out.strip())
    out = rb.mkdir()
    for i, image_id in enumerate(ids):
        rb.run("push", image_id, f"oci:{out}/l{i}", root=root)
        assert flatten(f"{out}/l{i}")["same"] == ("file", b"same\n")
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_root_flag_before_and_after_subcommand(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "ENV A=b\n")})
    r1 = rb.run("--root", root, "build", "-q", "-t", "rootflag", ctx, env={"RBUILD_ROOT": None})  # type: ignore[dict-item]
    r2 = rb.run("images", "--root", root, "--format", "json", env={"RBUILD_ROOT": None})  # type: ignore[dict-item]
    assert r1.stdout.strip() in r2.stdout
    assert os.path.exists(os.path.join(root, "store.json"))


def test_multistage_copy_from_and_metadata(rb: Runner, busybox: str) -> None:
    text = (
        f'ARG BASE=oci:{busybox}\nFROM $BASE AS build\nARG MSG=default\nRUN mkdir /out && echo "$MSG" > /out/msg'
        " && ln -s msg /out/link\n"
        f"FROM oci:{busybox} AS unused\nRUN exit 99\n"
        f"FROM oci:{busybox}\nCOPY --from=build /out /copied/\nWORKDIR /work\nUSER app\nEXPOSE 8080 53/udp\n"
        'VOLUME /data\nENTRYPOINT ["/bin/sh"]\nLABEL a=b\nSTOPSIGNAL SIGTERM\nSHELL ["/bin/sh", "-ec"]\n'
        "HEALTHCHECK --interval=5s CMD true\nONBUILD RUN echo triggered\nRUN id -u > /tmp/whoami\n"
    )
    ctx = rb.context({"Containerfile": text})
    out = rb.mkdir()
    rb.build(ctx, "-t", "multi", "--build-arg", "MSG=hello world", "--label", "extra=1")
    doc = json.loads(rb.run("inspect", "multi").stdout)[0]
    c = doc["Config"]
    assert c["WorkingDir"] == "/work" and c["User"] == "app"
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert c["Volumes"] == {"/data": {}}
    assert c["Entrypoint"] == ["/bin/sh"] and "Cmd" not in c
    assert c["Labels"] == {"a": "b", "extra": "1"}
    assert c["StopSignal"] == "SIGTERM" and c["Shell"] == ["/bin/sh", "-ec"]
    assert c["Healthcheck"]["Test"] == ["CMD-SHELL", "true"] and c["Healthcheck"]["Interval"] == 5_000_000_000
    assert c["OnBuild"] == ["RUN echo triggered"]
    assert doc["History"][-1]["created_by"] == "RUN /bin/sh -ec id -u > /tmp/whoami # buildkit"  # SHELL applies
    rb.run("push", "multi", f"oci:{out}/l")
    tree = flatten(f"{out}/l")
    assert tree["copied/msg"] == ("file", b"hello world\n")
    assert tree["copied/link"] == ("symlink", b"msg")
    assert tree["tmp/whoami"] == ("file", b"1000\n")


def test_onbuild_triggers_run_in_child(rb: Runner, busybox: str) -> None:
    parent = rb.context({"Containerfile": cf(busybox, "ONBUILD RUN echo from-trigger > /trig\n")})
    rb.build(parent, "-t", "onbuild-parent")
    child = rb.context({"Containerfile": "FROM onbuild-parent\nRUN cat /trig\n"})
    res = rb.run("build", child)
    assert "from-trigger" in res.stderr
    doc = json.loads(rb.run("inspect", res.stdout.strip().splitlines()[-1]).stdout)[0]
    assert "OnBuild" not in doc["Config"]


def test_sandbox_view(rb: Runner, busybox: str) -> None:
    script = r"""
set -e
test "$(hostname)" = rbuild
test "$$" = 1
grep -q 'NoNewPrivs:.1' /proc/self/status
grep -q '^CapBnd:.00000000a80425fb' /proc/self/status
for d in null zero full random urandom tty; do test -c /dev/$d; done
test -d /dev/shm && test -d /dev/pts && test -L /dev/fd && test -L /dev/stdin && test -e /dev/ptmx
if echo 1 > /proc/sys/kernel/domainname 2>/dev/null; then echo writable-proc-sys; exit 1; fi
test ! -s /proc/kcore
if touch /sys/rbuild-probe 2>/dev/null; then echo writable-sys; exit 1; fi
grep -q localhost /etc/hosts && test -s /etc/resolv.conf && grep -q rbuild /etc/hostname
head -c 16 /dev/urandom | wc -c | grep -q 16
test "$BUILDARG" = yes
test "$HOME" = /root
"""
    ctx = rb.context(
        {"Containerfile": cf(busybox, "ARG BUILDARG\nCOPY probe.sh /probe.sh\nRUN sh /probe.sh\n"), "probe.sh": script}
    )
    res = rb.run("build", "--build-arg", "BUILDARG=yes", ctx, check=False)
    assert res.returncode == 0, res.stderr


def test_run_mounts(rb: Runner, busybox: str) -> None:
    text = (
        f"FROM oci:{busybox} AS stage\nRUN mkdir /out && echo from-stage > /out/f\n"
        f"FROM oci:{busybox}\n"
        "RUN --mount=type=bind,source=data,target=/src cat /src/in > /copied && ! touch /src/x 2>/dev/null\n"
        "RUN --mount=type=bind,from=stage,source=/out,target=/st,rw cat /st/f > /st-copied && touch /st/x\n"
        "RUN --mount=type=cache,target=/var/cache/app sh -c 'date +%N >> /var/cache/app/runs; "
        "wc -l < /var/cache/app/runs > /runs'\n"
        "RUN --mount=type=tmpfs,target=/scratch touch /scratch/t && test -f /scratch/t\n"
        "RUN --mount=type=secret,id=token cat /run/secrets/token | wc -c > /secret-len\n"
        'RUN --mount=type=secret,id=token,env=TOKEN test "$TOKEN" = s3cret\n'
    )
    ctx = rb.context({"Containerfile": text, "data/in": "bound\n"})
    secret = rb.write(os.path.join(rb.mkdir(), "token"), "s3cret", 0o600)
    root = rb.fresh_root()
    out = rb.mkdir()
    rb.build(ctx, "-t", "mounts", "--secret", f"id=token,src={secret}", root=root)
    rb.run("push", "mounts", f"oci:{out}/l", root=root)
    tree = flatten(f"{out}/l")
    assert tree["copied"] == ("file", b"bound\n") and tree["st-copied"] == ("file", b"from-stage\n")
    assert tree["runs"] == ("file", b"1\n") and tree["secret-len"] == ("file", b"6\n")
    for gone in ("src", "st", "scratch", "run", "var/cache/app", "var/cache/app/runs"):
        assert gone not in tree, gone  # mount points and mounted content leave no trace
    assert (
        b"s3cret"
        not in open(
            f"{out}/l/blobs/sha256/" + json.load(open(f"{out}/l/index.json"))["manifests"][0]["digest"][7:], "rb"
        ).read()
    )
    # the cache mount survives between builds; the step re-runs only when forced
    rb.build(ctx, "--no-cache", "-t", "mounts", "--secret", f"id=token,src={secret}", root=root)
    rb.run("push", "mounts", f"oci:{out}/l2", root=root)
    assert flatten(f"{out}/l2")["runs"] == ("file", b"2\n")
    res = rb.run("build", "--no-cache", ctx, root=root, check=False)
    assert res.returncode == 1  # without the secret, cat fails inside the RUN (not required by default)


def test_copy_exclude_and_parents(rb: Runner, busybox: str) -> None:
    text = cf(busybox, "COPY --exclude=*.log --exclude=skip app /app/\nCOPY --parents src/a/x.txt src/b/./y.txt /p/\n")
    ctx = rb.context(
        {
            "Containerfile": text,
            "app/keep.txt": "k",
            "app/debug.log": "l",
            "app/skip/f": "s",
            "app/sub/deep.log": "d",
            "app/sub/ok": "o",
            "src/a/x.txt": "x",
            "src/b/y.txt": "y",
        }
    )
    out = rb.mkdir()
    rb.build(ctx, "-t", "excl")
    rb.run("push", "excl", f"oci:{out}/l")
    tree = flatten(f"{out}/l")
    # patterns match as in .dockerignore: "*.log" is top-level only (BuildKit's rule)
    assert {k for k in tree if k.startswith("app/")} == {"app/keep.txt", "app/sub", "app/sub/ok", "app/sub/deep.log"}
    assert tree["p/src/a/x.txt"] == ("file", b"x") and tree["p/y.txt"] == ("file", b"y")


def test_add_url_and_local_archive(rb: Runner, busybox: str) -> None:
    import hashlib
    import http.server
    import io
    import tarfile
    import threading

    payload = b"downloaded\n"
    serve = rb.mkdir()
    with open(os.path.join(serve, "file.txt"), "wb") as f:
        f.write(payload)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=serve)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/file.txt"
        good = "sha256:" + hashlib.sha256(payload).hexdigest()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            ti = tarfile.TarInfo("inner/x")
            ti.size = 2
            tf.addfile(ti, io.BytesIO(b"x\n"))
        ctx = rb.context(
            {
                "Containerfile": cf(busybox, f"ADD --checksum={good} {url} /dl/\nADD a.tar.gz /unpacked/\n"),
                "a.tar.gz": buf.getvalue(),
            }
        )
        out = rb.mkdir()
        rb.build(ctx, "-t", "addurl")
        rb.run("push", "addurl", f"oci:{out}/l")
        tree = flatten(f"{out}/l")
        assert tree["dl/file.txt"] == ("file", payload) and tree["unpacked/inner/x"] == ("file", b"x\n")
        bad = rb.context({"Containerfile": cf(busybox, f"ADD --checksum=sha256:{'0' * 64} {url} /dl/\n")})
        _one_error(rb.run("build", bad, check=False), 125, "Containerfile:2", "checksum")
        # without --checksum the cache key is the content behind the URL: a change there is seen
        plain = rb.context({"Containerfile": cf(busybox, f"ADD {url} /f\nRUN cat /f\n")})
        first = rb.run("build", plain)
        assert "downloaded" in first.stderr
        with open(os.path.join(serve, "file.txt"), "wb") as f:
            f.write(b"changed\n")
        second = rb.run("build", plain)
        assert "changed" in second.stderr and "Using cache" not in second.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_unused_arg_keeps_the_cache_and_relative_mount_targets(rb: Runner, busybox: str) -> None:
    ctx = rb.context(
        {
            "Containerfile": cf(
                busybox,
                "ARG UNUSED\nCOPY f /f\nWORKDIR /app\n"
                "RUN --mount=type=bind,source=f,target=rel/f cat /app/rel/f > /seen\n",
            ),
            "f": "bound\n",
        }
    )
    rb.build(ctx, "--build-arg", "UNUSED=1")
    res = rb.run("build", "--build-arg", "UNUSED=2", ctx)
    # COPY and WORKDIR stay cached; the RUN sees the declared ARG in its environment, so it runs again
    assert (
        res.stderr.split("STEP 5/5")[0].count("Using cache") == 2
        and "Using cache" not in res.stderr.split("STEP 5/5")[1]
    )


def test_run_bind_of_the_context_hides_ignored_files(rb: Runner, busybox: str) -> None:
    run = (
        "RUN --mount=type=bind,target=/src sh -c 'test ! -e /src/.env && test ! -e /src/logs/a && cat /src/logs/keep'\n"
    )
    ctx = rb.context(
        {
            "Containerfile": cf(busybox, run),
            ".env": "AWS_SECRET=hunter2\n",
            "logs/a": "a",
            "logs/keep": "kept\n",
            ".dockerignore": ".env\nlogs\n!logs/keep\n",
        }
    )
    res = rb.run("build", ctx)
    assert "kept" in res.stderr and "hunter2" not in res.stderr


def test_mount_points_leave_no_trace_on_scratch(rb: Runner) -> None:
    ctx = rb.context({"Containerfile": 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "true"]\n'})
    shutil.copy("/bin/busybox", os.path.join(ctx, "busybox"))
    rb.own(ctx)
    out = rb.mkdir()
    rb.build(ctx, "-t", "scratchrun")
    doc = json.loads(rb.run("inspect", "scratchrun").stdout)[0]
    assert len(doc["RootFS"]["Layers"]) == 1  # the RUN changed nothing: no layer, as BuildKit
    assert doc["History"][-1].get("empty_layer") is True
    rb.run("push", "scratchrun", f"oci:{out}/l")
    assert sorted(flatten(f"{out}/l")) == ["bin", "bin/busybox"]


def test_hundred_layer_base_mounts(rb: Runner, busybox: str) -> None:
    import io
    import tarfile

    layers = [busybox_layer()]
    for i in range(100):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            ti = tarfile.TarInfo(f"layer{i:03d}")
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"%03d" % i))
        layers.append(buf.getvalue())
    layout = rb.mkdir() + "/many"
    write_oci_layout(layout, layers, compress=False)
    rb.own(os.path.dirname(layout))
    ctx = rb.context({"Containerfile": f"FROM oci:{layout}\nRUN cat /layer000 /layer099 > /both\n"})
    out = rb.mkdir()
    rb.build(ctx, "-t", "hundred")
    rb.run("push", "hundred", f"oci:{out}/l")
    assert flatten(f"{out}/l")["both"] == ("file", b"000099")


def test_push_formats_and_compression(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, "RUN echo x > /x\n")})
    rb.build(ctx, "-t", "pushme", "--format", "docker")
    out = rb.mkdir()
    rb.run("push", "pushme", f"oci:{out}/d")
    with open(f"{out}/d/index.json") as f:
        assert json.load(f)["manifests"][0]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    res = rb.run("push", "--format", "docker", "--compression-format", "zstd", "pushme", f"oci:{out}/z", check=False)
    assert res.returncode == 125 and "zstd" in res.stderr and not os.path.exists(f"{out}/z/index.json")
    rb.run("push", "--format", "oci", "--compression-format", "zstd", "pushme", f"oci:{out}/z:v1")
    rb.run("push", "--format", "oci", "pushme", f"oci:{out}/z:v2", "--digestfile", f"{out}/digest")
    with open(f"{out}/z/index.json") as f:
        refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in json.load(f)["manifests"]}
    assert set(refs) == {"v1", "v2"}
    with open(f"{out}/digest") as f:
        assert f.read().strip() == refs["v2"]["digest"]
    man1 = json.load(open(f"{out}/z/blobs/sha256/" + refs["v1"]["digest"][7:]))
    assert man1["layers"][-1]["mediaType"].endswith("+zstd")
    assert flatten(f"{out}/z")["x"] == ("file", b"x\n")
    # retagging v1 replaces it and keeps v2
    rb.run("push", "pushme", f"oci:{out}/z:v1")
    with open(f"{out}/z/index.json") as f:
        assert sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in json.load(f)["manifests"]) == [
            "v1",
            "v2",
        ]
    rb.run("push", "pushme", f"oci-archive:{out}/a.tar")
    rb.run("push", "pushme", f"docker-archive:{out}/d.tar")
    for spec in (f"oci:{out}/z:v2", f"oci-archive:{out}/a.tar", f"docker-archive:{out}/d.tar"):
        r = subprocess.run(["skopeo", "inspect", "--config", spec], capture_output=True, text=True, check=False)
        assert r.returncode == 0, (spec, r.stderr)
        assert (
            json.loads(r.stdout)["rootfs"]["diff_ids"]
            == json.loads(rb.run("inspect", "pushme").stdout)[0]["RootFS"]["Layers"]
        )


def test_registry_from_and_push(rb: Runner, busybox: str, registry: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{busybox}:latest", f"docker://{registry}/base/busybox:1"],
        check=True,
        capture_output=True,
    )
    ctx = rb.context({"Containerfile": f"FROM {registry}/base/busybox:1\nRUN echo pulled > /p\n"})
    image_id = rb.build(ctx, "-t", "fromreg")
    rb.run("push", "fromreg", f"docker://{registry}/built/app:1")
    r = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{registry}/built/app:1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        "sha256:"
        + __import__("hashlib")
        .sha256(
            subprocess.run(
                ["skopeo", "inspect", "--tls-verify=false", "--raw", "--config", f"docker://{registry}/built/app:1"],
                capture_output=True,
                check=True,
            ).stdout
        )
        .hexdigest()
        == image_id
    )
    assert json.loads(r.stdout)["config"]["Env"]
    pushed = rb.build(ctx, "-t", f"{registry}/built/pushed:2", "--push")
    r = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", "--config", f"docker://{registry}/built/pushed:2"],
        capture_output=True,
        check=True,
    )
    assert "sha256:" + __import__("hashlib").sha256(r.stdout).hexdigest() == pushed


def test_pull_policies(rb: Runner, busybox: str, registry: str) -> None:
    root = rb.fresh_root()
    repo = f"{registry}/policy/base:1"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{busybox}:latest", f"docker://{repo}"],
        check=True,
        capture_output=True,
    )
    ctx = rb.context({"Containerfile": f"FROM {repo}\nRUN cat /marker 2>/dev/null || echo none\n"})
    first = rb.run("build", "--no-cache", ctx, root=root)
    assert "none" in first.stderr
    # the registry's image changes; missing (default) and never keep the local one, newer and always pull
    other = rb.mkdir()
    write_oci_layout(other, [busybox_layer(), _marker_layer()])
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{other}:latest", f"docker://{repo}"],
        check=True,
        capture_output=True,
    )
    for policy, expect in (
        ("--pull=missing", "none"),
        ("--pull=never", "none"),
        ("--pull=newer", "marked"),
        ("--pull", "marked"),
    ):
        res = rb.run("build", "--no-cache", policy, ctx, root=root)
        assert expect in res.stderr, (policy, res.stderr)


def _marker_layer() -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("marker")
        ti.size = 7
        tf.addfile(ti, io.BytesIO(b"marked\n"))
    return buf.getvalue()


def test_single_uid_user_builds_with_a_notice(rb_single: Runner, busybox: str) -> None:
    ctx = rb_single.context({"Containerfile": cf(busybox, "RUN id -u > /u && touch /made\n")})
    res = rb_single.run("build", "-t", "single", ctx)
    assert "single-uid" in res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("sha256:")
    # COPY --chown to ids the single-uid namespace cannot hold is recorded and lands in the layer
    chowned = rb_single.context({"Containerfile": cf(busybox, "COPY --chown=app:staff f /f\n"), "f": "x"})
    out = rb_single.mkdir()
    rb_single.build(chowned, "-t", "single-chown")
    rb_single.run("push", "single-chown", f"oci:{out}/l")
    import gzip
    import io
    import tarfile

    with open(f"{out}/l/index.json") as f:
        mdigest = json.load(f)["manifests"][0]["digest"]
    man = json.load(open(f"{out}/l/blobs/sha256/{mdigest[7:]}"))
    top = open(f"{out}/l/blobs/sha256/{man['layers'][-1]['digest'][7:]}", "rb").read()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(top))) as tf:
        member = tf.getmember("f")
    assert (member.uid, member.gid) == (1000, 50)


# -------------------------------------------------------------------------------------------------------
# bad input: one Error: line, the documented status, the store unchanged


def _one_error(res: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert res.returncode == status, (res.returncode, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


@pytest.mark.parametrize(
    "body,status,needles",
    [
        ("FOO bar\n", 125, ["Containerfile:2", "FOO"]),
        ("COPY missing.txt /x\n", 125, ["Containerfile:2", "missing.txt"]),
        ("RUN exit 3\n", 3, ["Containerfile:2", "exit code: 3"]),
        ('RUN ["/no/such/binary"]\n', 125, ["Containerfile:2"]),
    ],
)
def test_bad_input(rb: Runner, busybox: str, body: str, status: int, needles: list[str]) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, body)})
    before = store_snapshot(rb.root)
    _one_error(rb.run("build", "-t", "broken", ctx, check=False), status, *needles)
    assert store_snapshot(rb.root) == before


def test_missing_containerfile_and_base(rb: Runner, registry: str) -> None:
    empty = rb.mkdir()
    _one_error(rb.run("build", empty, check=False), 125, "Containerfile")
    ctx = rb.context({"Containerfile": "FROM no-such-image-here:1\n"})
    _one_error(rb.run("build", ctx, "--pull=never", check=False), 125, "Containerfile:1", "no-such-image-here")
    ctx = rb.context({"Containerfile": f"FROM {registry}/nothing/here:1\n"})
    _one_error(rb.run("build", ctx, check=False), 125, "Containerfile:1")
    dead = f"127.0.0.1:{__import__('conftest').free_port()}"
    ctx = rb.context({"Containerfile": f"FROM {dead}/x/y:1\n"})
    _one_error(rb.run("build", ctx, check=False, timeout=120), 125, "Containerfile:1")


def test_store_from_another_mapping_is_refused(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "ENV A=1\n")})
    rb.build(ctx, root=root)
    meta_path = os.path.join(root, "store.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["mapping"]["uids"] = [[0, rb.uid, 1]]
    meta["mapping"]["gids"] = [[0, rb.gid, 1]]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    before = store_snapshot(root)
    _one_error(rb.run("build", ctx, root=root, check=False), 125, "different user namespace mapping")
    assert store_snapshot(root) == before


def test_containerfile_from_stdin_and_bare_build_arg(rb: Runner, busybox: str) -> None:
    ctx = rb.mkdir()
    text = cf(busybox, 'ARG FROMENV\nRUN test "$FROMENV" = set-in-env\n')
    res = rb.run("build", "-q", "-f", "-", "--build-arg", "FROMENV", ctx, input=text, env={"FROMENV": "set-in-env"})
    assert ID_RE.match(res.stdout)


def _interrupt_build(rb: Runner, ctx: str, root: str, sig: int, group: bool) -> None:
    argv = rb._prefix() + [rb.bin, "build", ctx]
    proc = subprocess.Popen(
        argv,
        env=rb._env({"RBUILD_ROOT": root}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=default_signals,
    )
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    seen = b""
    os.set_blocking(proc.stderr.fileno(), False)
    while b"started" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += proc.stderr.read() or b""
    assert b"started" in seen
    if group:
        os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does
    else:
        os.kill(proc.pid, sig)
    try:
        proc.wait(30)
    finally:
        if proc.returncode is None:  # the test failed: still end what it started (its process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    deadline = time.monotonic() + 15
    while rb.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rb.processes() == []  # the sandbox (and with it every mount namespace) is gone
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_ctrl_c_leaves_no_mounts_or_staging(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "RUN echo started; sleep 60\n")})
    _interrupt_build(rb, ctx, root, signal.SIGINT, group=True)
    with open(os.path.join(root, "images.json")) as f:
        assert len(json.load(f)["images"]) == 1  # only the imported base image; the build recorded nothing


def test_sigterm_ends_a_run_as_another_user(rb: Runner, busybox: str) -> None:
    # a RUN as USER app has other credentials than the builder: its death signal must not depend on it
    root = rb.fresh_root()
    ctx = rb.context({"Containerfile": cf(busybox, "USER app\nRUN echo started; sleep 60\n")})
    _interrupt_build(rb, ctx, root, signal.SIGTERM, group=False)


def test_run_cannot_redirect_stub_cleanup_to_host_files(rb: Runner, busybox: str) -> None:
    # the RUN swaps the directory rbuild made for its mount points for a symlink to a host directory
    # holding an empty file and an empty directory of the same names as the mount points
    victim = rb.mkdir("victim")
    rb.write(os.path.join(victim, "target"), "")
    os.mkdir(os.path.join(victim, "mnt"))
    rb.own(victim)
    run = (
        f"RUN --mount=type=tmpfs,target=/x/mnt --mount=type=bind,source=f,target=/x/target "
        f"mv /x /x.old && ln -s {victim} /x\n"
    )
    ctx = rb.context({"Containerfile": cf(busybox, run), "f": "bound"})
    rb.build(ctx)
    assert sorted(os.listdir(victim)) == ["mnt", "target"]


def test_image_with_a_path_as_diff_id_is_refused(rb: Runner, busybox: str) -> None:
    layout = rb.mkdir() + "/evil"
    write_oci_layout(layout, [busybox_layer()])
    with open(os.path.join(layout, "index.json")) as f:
        mdigest = json.load(f)["manifests"][0]["digest"]
    man_path = os.path.join(layout, "blobs", "sha256", mdigest[7:])
    man = json.load(open(man_path))
    cpath = os.path.join(layout, "blobs", "sha256", man["config"]["digest"][7:])
    config = json.load(open(cpath))
    evil = "./" * 27 + "../../tmp/"  # 64 characters that walk out of the store
    assert len(evil) == 64
    config["rootfs"]["diff_ids"] = ["sha256:" + evil]
    write_oci_layout(layout, [busybox_layer()], tag="latest")  # fresh, then patch the config in place
    data = json.dumps(config).encode()
    import hashlib

    new_digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", new_digest), "wb") as f:
        f.write(data)
    with open(os.path.join(layout, "index.json")) as f:
        mdigest = json.load(f)["manifests"][0]["digest"]
    man = json.load(open(os.path.join(layout, "blobs", "sha256", mdigest[7:])))
    man["config"] = {"mediaType": man["config"]["mediaType"], "digest": "sha256:" + new_digest, "size": len(data)}
    mdata = json.dumps(man).encode()
    mnew = hashlib.sha256(mdata).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", mnew), "wb") as f:
        f.write(mdata)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": man["mediaType"], "digest": "sha256:" + mnew, "size": len(mdata)}],
    }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    rb.own(os.path.dirname(layout))
    ctx = rb.context({"Containerfile": f"FROM oci:{layout}\nRUN true\n"})
    _one_error(rb.run("build", ctx, check=False), 125, "Containerfile:1", "digest")


def test_kill_9_leaves_no_secret_and_the_next_build_sweeps(rb: Runner, busybox: str) -> None:
    root = rb.fresh_root()
    secret = rb.write(os.path.join(rb.mkdir(), "tok"), "s3cr3t-token-value", 0o600)
    ctx = rb.context({"Containerfile": cf(busybox, "RUN --mount=type=secret,id=tok echo started; sleep 60\n")})
    argv = rb._prefix() + [rb.bin, "build", "--secret", f"id=tok,src={secret}", ctx]
    proc = subprocess.Popen(
        argv,
        env=rb._env({"RBUILD_ROOT": root}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=default_signals,
    )
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 60
    while b"started" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += proc.stderr.read() or b""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 15
    while rb.processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    assert b"s3cr3t-token-value" not in f.read(), path
    assert os.listdir(os.path.join(root, "tmp"))  # the killed build's staging is still there
    rb.build(rb.context({"Containerfile": cf(busybox, "ENV A=1\n")}), root=root)
    assert os.listdir(os.path.join(root, "tmp")) == []
