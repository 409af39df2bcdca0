"""Reproducible builds: with SOURCE_DATE_EPOCH, who builds and whether the cache is used do not matter.

The same Containerfile and context, built by the user with a subuid range (SOURCE_DATE_EPOCH in the
environment) and by the single-uid user (as a build arg, with --no-cache), pushed with gzip and with zstd,
give the same manifest digest per format.
"""

from __future__ import annotations

import json
import os
from typing import Any

SDE = "1700000000"
CONTAINERFILE = """FROM oci:{base}
ARG SOURCE_DATE_EPOCH
COPY files/ /app/
RUN mkdir -p /data/sub && echo hello > /data/sub/f && ln -s f /data/sub/ln && ln /data/sub/f /data/hard \\
 && chmod 4755 /data/sub/f && mkfifo /data/fifo && rm /etc/group && echo x > /app/new
RUN rm -r /data/sub && mkdir /data/sub && echo again > /data/sub/g
ENV GREETING=hi
"""


def build_and_push(runner: Any, base: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, str]:
    ctx = runner.context(
        {
            "Containerfile": CONTAINERFILE.format(base=base),
            "files/a.txt": "a\n",
            "files/dir/b.bin": bytes(range(256)) * 100,
            "files/script.sh": "#!/bin/sh\necho\n",
        }
    )
    os.chmod(os.path.join(ctx, "files/script.sh"), 0o755)
    image = runner.build(ctx, *extra, env=env)
    digests = {}
    for fmt in ("gzip", "zstd"):
        out = runner.mkdir()
        digestfile = os.path.join(out, "digest")
        runner.run("push", "-q", "--compression-format", fmt, "--digestfile", digestfile, image, f"oci:{out}/layout")
        with open(digestfile) as f:
            digests[fmt] = f.read().strip()
        with open(os.path.join(out, "layout", "index.json")) as f:
            assert json.load(f)["manifests"][0]["digest"] == digests[fmt]
    return digests


def test_same_digests_across_users_cache_and_formats(rb: Any, rb_single: Any, busybox: str) -> None:
    a = build_and_push(rb, busybox, env={"SOURCE_DATE_EPOCH": SDE})
    b = build_and_push(rb_single, busybox, "--no-cache", "--build-arg", f"SOURCE_DATE_EPOCH={SDE}")
    assert a["gzip"] != a["zstd"]
    assert a == b


def test_rewrite_timestamp_false_keeps_newer_mtimes(rb: Any, busybox: str) -> None:
    """Without clamping, the layer entries keep their (current) mtimes: the digest changes."""
    a = build_and_push(rb, busybox, env={"SOURCE_DATE_EPOCH": SDE})
    b = build_and_push(rb, busybox, "--rewrite-timestamp=false", env={"SOURCE_DATE_EPOCH": SDE})
    assert a != b


def layer_entries(layout: str, digest_file: str) -> tuple[dict[str, Any], list[list[tuple[str, int, int]]]]:
    """Config and, per layer, (name, mtime, uid) of every entry of a pushed OCI layout."""
    import gzip
    import io
    import tarfile

    def blob(digest: str) -> bytes:
        with open(os.path.join(layout, "blobs", "sha256", digest.split(":")[1]), "rb") as f:
            return f.read()

    with open(digest_file) as f:
        manifest = json.loads(blob(f.read().strip()))
    config = json.loads(blob(manifest["config"]["digest"]))
    out = []
    for desc in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(desc["digest"])))) as tf:
            out.append([(m.name, int(m.mtime), m.uid) for m in tf])
    return config, out


def push_layout(runner: Any, image: str) -> tuple[dict[str, Any], list[list[tuple[str, int, int]]]]:
    out = runner.mkdir()
    runner.run(
        "push", "-q", "--compression-format", "gzip", "--digestfile", f"{out}/digest", image, f"oci:{out}/layout"
    )
    return layer_entries(f"{out}/layout", f"{out}/digest")


def test_timestamp_sets_every_new_entry_and_created(rb: Any, busybox: str) -> None:
    ctx = rb.context(
        {"Containerfile": f"FROM oci:{busybox}\nCOPY a.txt /a.txt\nRUN mkdir -p /x/y && touch /x/y/z\n", "a.txt": "a\n"}
    )
    config, layers = push_layout(rb, rb.build(ctx, "--timestamp", "1234567"))
    assert config["created"].startswith("1970-01-15T06:56:07")
    assert all(h["created"].startswith("1970-01-15T06:56:07") for h in config["history"][-2:])
    new = layers[-2:]
    assert new[0] and new[1] and {m for layer in new for _, m, _ in layer} == {1234567}
    assert {m for _, m, _ in layers[0]} != {1234567}, "base layers are untouched"


def test_source_date_epoch_clamps_only_newer_mtimes(rb: Any, busybox: str) -> None:
    ctx = rb.context(
        {"Containerfile": f"FROM oci:{busybox}\nCOPY old.txt new.txt /d/\n", "old.txt": "o\n", "new.txt": "n\n"}
    )
    os.utime(os.path.join(ctx, "old.txt"), (1000, 1000))
    _, layers = push_layout(rb, rb.build(ctx, env={"SOURCE_DATE_EPOCH": SDE}))
    mtimes = dict((n, m) for n, m, _ in layers[-1])
    assert mtimes["d/old.txt"] == 1000 and mtimes["d/new.txt"] == int(SDE) and mtimes["d"] == int(SDE)
