"""Push compresses layers in parallel and uploads each while it is being compressed (issue 15): PATCH chunks go
up as the compressed bytes appear, the digest comes with the final PUT. The blobs, and so the manifest, are
exactly those the non-streaming export (an OCI layout) makes of the same image, whatever the threads did."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator

import pytest
from conftest import Runner
from registry_helpers import FaultProxy, fault_proxy

pytestmark = pytest.mark.e2e

STREAM_CHUNK = 8 << 20  # rootless.registry.client.STREAM_CHUNK


@pytest.fixture
def proxy(registry: str) -> Iterator[FaultProxy]:
    """A recording reverse proxy (a real HTTP server) in front of the session's docker-registry."""
    with fault_proxy(registry) as p:
        yield p


def build_twice(rb: Runner) -> tuple[str, str, str]:
    """One multi-layer image built in two fresh stores (reproducibly: --timestamp); returns (image id,
    store A, store B). One layer is 20 MiB of random bytes: its blob spans several stream chunks."""
    rng = random.Random(15)
    ctx = rb.context(
        {
            "Containerfile": "FROM scratch\nCOPY big /big\nCOPY small/ /small/\nCOPY text /etc/text\n",
            "big": rng.randbytes(20 << 20),
            "small/a": rng.randbytes(300_000),
            "small/b": b"b" * 1_000_000,
            "text": "hello\n" * 1000,
        }
    )
    roots = [rb.fresh_root(), rb.fresh_root()]
    ids = [rb.build(ctx, "--timestamp", "1700000000", "-t", "localhost/stream:1", root=r) for r in roots]
    assert ids[0] == ids[1] and ids[0].startswith("sha256:")
    return ids[0], roots[0], roots[1]


def layout_digest(path: str) -> str:
    with open(os.path.join(path, "index.json")) as f:
        return str(json.load(f)["manifests"][0]["digest"])


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_streamed_push_matches_the_layout_export(rb: Runner, proxy: FaultProxy, compression: str) -> None:
    image, root_a, root_b = build_twice(rb)
    flags = ["--compression-format", compression]
    digestfile = os.path.join(rb.mkdir(), "digest")
    ref = f"{proxy.host}/stream/{compression}:1"
    rb.run("push", *flags, "--digestfile", digestfile, "localhost/stream:1", ref, root=root_a)
    with open(digestfile) as f:
        pushed = f.read().strip()

    # the same image from the other store, compressed the way an export always has (to a file first)
    layout = rb.mkdir()
    rb.run("push", *flags, "localhost/stream:1", f"oci:{layout}:1", root=root_b)
    assert pushed == layout_digest(layout)

    # the 20 MiB layer went up in PATCH chunks while it was compressed (the old push sent a blob of this
    # size in one PUT), each chunk a whole stream chunk, the digest named by the closing PUT
    patches = proxy.requests("PATCH", "/stream/")
    assert len(patches) >= 2 and all(status == 202 for _, _, status in patches)
    puts = proxy.requests("PUT", f"/stream/{compression}/blobs/uploads/.*digest=")
    assert puts and all(status == 201 for _, _, status in puts)

    # a second push of the same store compresses nothing: the kept blobs go up (here: are found present)
    proxy.log.clear()
    rb.run("push", *flags, "localhost/stream:1", f"{proxy.host}/stream/{compression}-again:1", root=root_a)
    assert not proxy.requests("PATCH")

    # and what was pushed pulls back as the same image
    pulled = rb.run("pull", ref, root=rb.fresh_root()).stdout.strip()
    assert pulled == image


def test_push_falls_back_when_the_registry_refuses_chunks(rb: Runner, proxy: FaultProxy) -> None:
    """A registry that refuses a PATCH gets the blob in one PUT once it is complete."""
    from registry_helpers import Fault

    image, root_a, root_b = build_twice(rb)
    proxy.add(Fault("status", "/blobs/uploads/", method="PATCH", times=None, status=405))
    digestfile = os.path.join(rb.mkdir(), "digest")
    rb.run("push", "--digestfile", digestfile, "localhost/stream:1", f"{proxy.host}/stream/nochunks:1", root=root_a)
    layout = rb.mkdir()
    rb.run("push", "localhost/stream:1", f"oci:{layout}:1", root=root_b)
    with open(digestfile) as f:
        assert f.read().strip() == layout_digest(layout)
    assert proxy.requests("PATCH") and all(status == 405 for _, _, status in proxy.requests("PATCH"))
    assert rb.run("pull", f"{proxy.host}/stream/nochunks:1", root=rb.fresh_root()).stdout.strip() == image
