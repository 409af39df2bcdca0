"""Image references `[HOST[:PORT]/]REPO[:TAG][@DIGEST]`, normalised the way docker does.

Stdlib only: every command parses references, so this must stay cheap to import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rootless.blob.digest import check_digest
from rootless.errors import RbuildError

DOCKER_HUB = "docker.io"
_LEGACY_HUB_NAMES = ("index.docker.io", "registry-1.docker.io")

# The grammar of github.com/distribution/reference, anchored piece by piece.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference; at least one of tag and digest is set."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """`host/repo`, the part that names a repository."""
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What goes after `/manifests/` in the API: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str | None) -> Reference:
        """The same repository with another tag (and no digest)."""
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to `digest` (the tag kept for display)."""
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def split_host(name: str) -> tuple[str | None, str]:
    """Split off the first component when it names a host (docker's splitDockerDomain rule): the one
    answer to "is this name qualified", for registry references and local names alike."""
    first, sep, rest = name.partition("/")
    if not sep:
        return None, name
    if "." in first or ":" in first or first == "localhost" or first.lower() != first:
        return first, rest
    return None, name


def is_qualified(text: str) -> bool:
    """True when `text` names its registry (`quay.io/x`, `localhost/x`, `host:5000/x`)."""
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    return split_host(text)[0] is not None


def normalize_host(host: str) -> str:
    """Canonical registry name: docker's legacy hub names become `docker.io`."""
    host = host.lower() if not host.startswith("[") else host
    return DOCKER_HUB if host in _LEGACY_HUB_NAMES else host


def parse_reference(text: str, *, default_registry: str = DOCKER_HUB) -> Reference:
    """Parse and normalise `text`; a name without a host lives on `default_registry`.

    `docker.io` names without a namespace get `library/`, and a reference without tag or
    digest gets `:latest`, exactly as docker does, so `alpine` is `docker.io/library/alpine:latest`.
    """
    original = text
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    if not text:
        raise RbuildError("invalid reference: empty name")
    remainder, at, digest = text.partition("@")
    if at:
        if not _DIGEST_RE.fullmatch(digest):
            raise RbuildError(f"invalid reference {original!r}: bad digest {digest!r}")
        check_digest(digest)
    host, path = split_host(remainder)
    tag: str | None = None
    colon = path.rfind(":")
    if colon != -1:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise RbuildError(f"invalid reference {original!r}: bad tag {tag!r}")
    if host is not None and not _HOST_RE.fullmatch(host):
        raise RbuildError(f"invalid reference {original!r}: bad registry host {host!r}")
    registry = normalize_host(host if host is not None else default_registry)
    if path.lower() != path and _REPOSITORY_RE.fullmatch(path.lower()):
        raise RbuildError(f"invalid reference {original!r}: repository name must be lowercase")
    if not _REPOSITORY_RE.fullmatch(path):
        raise RbuildError(f"invalid reference {original!r}: bad repository name {path!r}")
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise RbuildError(f"invalid reference {original!r}: name longer than {_MAX_NAME} characters")
    if tag is None and not at:
        tag = "latest"
    return Reference(registry, path, tag, digest if at else None)
