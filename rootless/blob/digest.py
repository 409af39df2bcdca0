"""Digests `ALGO:HEX`: the one parser, so every place that takes a digest from outside (a manifest, a
reference, a file name in the store) refuses the same things."""

from __future__ import annotations

import hashlib
import re

from rootless.errors import RbuildError

HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}  # the algorithms hashlib and the OCI spec share
_HEX = re.compile(r"[0-9a-f]+")


def parse_digest(digest: str, algorithms: tuple[str, ...] = ("sha256", "sha512")) -> tuple[str, str]:
    """(algorithm, hex) of `digest`; RbuildError unless the algorithm is one of `algorithms` and the hex
    part is lower-case hex of its length (it becomes part of file names and URLs)."""
    algo, _, hexpart = digest.partition(":")
    if algo not in algorithms or len(hexpart) != HEX_LEN[algo] or not _HEX.fullmatch(hexpart):
        want = " or ".join(f"{a}:<{HEX_LEN[a]} hex>" for a in algorithms)
        raise RbuildError(f"invalid digest {digest!r}: want {want}")
    return algo, hexpart


def check_digest(digest: str) -> str:
    """`digest` itself if it is a valid sha256 or sha512 digest."""
    parse_digest(digest)
    return digest


def hex_of(digest: str) -> str:
    """The hex part of a sha256 digest (the store names blobs and layers by it); anything else refused."""
    return parse_digest(digest, ("sha256",))[1]


def is_sha256_hex(name: object) -> bool:
    """Whether `name` is 64 lower-case hex digits: a store file name that a sha256 digest made."""
    return isinstance(name, str) and len(name) == 64 and _HEX.fullmatch(name) is not None


def sha256_of(data: bytes) -> str:
    """The sha256 digest of `data`, as `sha256:HEX`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
