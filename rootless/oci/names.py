"""Local image names: podman's conventions (`myapp:1.0` is stored as `localhost/myapp:1.0`)."""

from __future__ import annotations

from rootless.oci.reference import normalize_host, split_host


def _has_tag(name: str) -> bool:
    return ":" in name.rsplit("/", 1)[-1] or "@" in name


def _qualified(name: str) -> str | None:
    """`name` with its registry (docker's rule, as for pulls; the host normalised), None when it names none."""
    host, rest = split_host(name)
    return None if host is None else f"{normalize_host(host)}/{rest}"


def normalize(name: str) -> str:
    """The name an image is stored under: registry-qualified, with a tag."""
    name = name.strip()
    name = _qualified(name) or "localhost/" + name
    if not _has_tag(name):
        name += ":latest"
    return name


def candidates(name: str) -> list[str]:
    """Names to try in the local store for a user-given name, in order."""
    out: list[str] = []
    base = name if _has_tag(name) else name + ":latest"
    for cand in (
        name,
        base,
        normalize(name),
        ("docker.io/" + ("" if "/" in name else "library/") + base) if not _qualified(name) else None,
    ):
        if cand and cand not in out:
            out.append(cand)
    return out


def valid(name: str) -> bool:
    """A conservative check of reference syntax for names the user wants to give an image."""
    import re

    return re.fullmatch(
        r"[a-z0-9]+([._:/-][a-zA-Z0-9_.-]+)*(@sha256:[0-9a-f]{64})?", name
    ) is not None and not name.endswith((":", "/"))
