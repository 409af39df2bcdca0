"""One copy each of: media types, digest parsing, reference qualification, platform selection, the verifying
reader, atomic writes and the tar reader (issue 10). Each test pins a case where the copies disagreed."""

from __future__ import annotations

import pytest

from rootless.blob.digest import check_digest, hex_of, parse_digest
from rootless.errors import RbuildError
from rootless.oci import names
from rootless.oci.reference import is_qualified, parse_reference


@pytest.mark.parametrize(
    "name",
    ["MyHost/app", "Registry.Example/team/app:1", "index.docker.io/library/busybox", "app", "org/app", "h:5000/a"],
)
def test_local_names_and_references_agree_on_the_registry(name: str) -> None:
    """names.py had its own "is this qualified" rule: `MyHost/app` (a host, as docker reads it: the first
    component has upper case) was stored as `localhost/MyHost/app`, and `index.docker.io/...` kept the legacy
    hub name a pull normalises to docker.io."""
    stored = names.normalize(name)
    assert names.valid(stored)
    want = parse_reference(name).registry if is_qualified(name) else "localhost"
    assert stored.split("/", 1)[0] == want
    assert stored in names.candidates(name)


def test_digest_parsing_is_one_rule() -> None:
    """The store's hex_of and the references' check_digest were two parsers with two error texts."""
    good = "sha256:" + "a" * 64
    assert check_digest(good) == good and hex_of(good) == "a" * 64
    assert parse_digest("sha512:" + "0" * 128) == ("sha512", "0" * 128)
    for bad in ("sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "sha256:../" + "a" * 61, ""):
        with pytest.raises(RbuildError, match="invalid digest"):
            check_digest(bad)
    with pytest.raises(RbuildError, match="want sha256"):
        hex_of("sha512:" + "0" * 128)
