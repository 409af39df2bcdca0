"""Main's registry cache (build/regcache.py) after the merge with onecopy: the cache reference goes through
the transport classes and the cache index's digests through the one digest parser."""

from __future__ import annotations

from typing import Any

import pytest

from rootless.build.regcache import FORMAT_VERSION, _check_index, parse_spec
from rootless.errors import RbuildError

GOOD = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "spec", ["oci:/tmp/cache", "oci-archive:/tmp/c.tar", "docker-archive:/tmp/c.tar", "type=registry,ref=oci:/tmp/c"]
)
def test_a_cache_outside_a_registry_is_refused_up_front(spec: str) -> None:
    """A layout or archive named as a cache was taken as a registry reference and failed late, at the push."""
    with pytest.raises(RbuildError, match="a cache is kept in a registry"):
        parse_spec(spec, "--cache-to")


def test_a_registry_cache_with_docker_prefix_is_accepted() -> None:
    assert parse_spec("docker://h:5000/c:1", "--cache-from").ref == "docker://h:5000/c:1"


def _index(diff_id: str, desc: Any) -> dict[str, Any]:
    return {"rbuild-cache": FORMAT_VERSION, "entries": {}, "layers": {diff_id: desc}}


@pytest.mark.parametrize(
    ("diff_id", "desc", "why"),
    [
        # the digest names a store file (blob_path): it must be a digest, not any string
        (GOOD, {"digest": "sha256:../../../etc/passwd", "size": 1}, "bad descriptor"),
        (GOOD, {"digest": "md5:" + "a" * 32, "size": 1}, "bad descriptor"),
        ("sha256:" + "A" * 64, {"digest": GOOD, "size": 1}, "bad diff_id"),  # upper-case hex passed the length check
        (GOOD, {"digest": GOOD}, "bad descriptor"),
    ],
)
def test_cache_index_digests_go_through_the_digest_parser(diff_id: str, desc: Any, why: str) -> None:
    with pytest.raises(RbuildError, match=why):
        _check_index(_index(diff_id, desc), "--cache-from h/c")


def test_a_sound_cache_index_is_kept() -> None:
    data = _index(GOOD, {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": GOOD, "size": 3})
    assert _check_index(data, "--cache-from h/c") is data
