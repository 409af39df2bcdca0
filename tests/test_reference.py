"""Reference parsing and docker's normalisation rules."""

from __future__ import annotations

import pytest

from rootless.errors import RbuildError
from rootless.oci.reference import Reference, is_qualified, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("library/alpine", "docker.io/library/alpine:latest"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/alpine", "docker.io/library/alpine:latest"),
        ("registry-1.docker.io/library/alpine:1", "docker.io/library/alpine:1"),
        ("docker://alpine", "docker.io/library/alpine:latest"),
        ("quay.io/podman/stable", "quay.io/podman/stable:latest"),
        ("localhost/img", "localhost/img:latest"),
        ("localhost:5000/a/b/c:t_1.0-x", "localhost:5000/a/b/c:t_1.0-x"),
        ("127.0.0.1:5000/img", "127.0.0.1:5000/img:latest"),
        ("[::1]:5000/img:v", "[::1]:5000/img:v"),
        ("Host.Example.COM/x", "host.example.com/x:latest"),
        (f"alpine@{D}", f"docker.io/library/alpine@{D}"),
        (f"alpine:3@{D}", f"docker.io/library/alpine:3@{D}"),
        ("a__b/c-d.e_f", "docker.io/a__b/c-d.e_f:latest"),
    ],
)
def test_normalisation(text: str, want: str) -> None:
    assert str(parse_reference(text)) == want


def test_fields_and_selector() -> None:
    ref = parse_reference(f"quay.io/a/b:1@{D}")
    assert ref == Reference("quay.io", "a/b", "1", D)
    assert ref.selector == D
    assert ref.name == "quay.io/a/b"
    assert parse_reference("quay.io/a/b").selector == "latest"
    assert str(ref.with_tag("2")) == "quay.io/a/b:2"


def test_default_registry_for_unqualified_names() -> None:
    assert str(parse_reference("img", default_registry="127.0.0.1:5000")) == "127.0.0.1:5000/img:latest"
    assert str(parse_reference("ns/img:1", default_registry="quay.io")) == "quay.io/ns/img:1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER",
        "a//b",
        "a/",
        "/a",
        "a:",
        "a:-tag",
        "a@sha256:xyz",
        f"a@sha256:{'ab' * 31}",
        "a@md5:" + "ab" * 16,
        "a b",
        "host:99999999999x/a",
        "a/B",
        "x" * 256,
        "-a",
        "a..b",
    ],
)
def test_bad_references(text: str) -> None:
    with pytest.raises(RbuildError):
        parse_reference(text)


def test_uppercase_repository_message() -> None:
    with pytest.raises(RbuildError, match="lowercase"):
        parse_reference("quay.io/Foo/bar")


@pytest.mark.parametrize(
    ("text", "qualified"),
    [
        ("alpine", False),
        ("alpine:3", False),
        ("library/alpine", False),
        ("quay.io/x", True),
        ("localhost/x", True),
        ("host:5000/x", True),
        ("docker://quay.io/x", True),
        ("localhost", False),
    ],
)
def test_is_qualified(text: str, qualified: bool) -> None:
    assert is_qualified(text) is qualified
