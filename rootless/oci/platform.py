"""Platforms (`os/arch[/variant]`) and the one choice of an image from an index, for registry pulls, `oci:`
layouts and `oci-archive:` imports alike: the entry containerd would run, or one error listing what exists."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from rootless.errors import RbuildError

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "i386": "386",
    "i686": "386",
    "armhf": "arm",
    "armel": "arm",
    "armv7l": "arm",
    "armv6l": "arm",
}
_ARCH_VARIANT = {"armhf": "v7", "armel": "v6", "armv7l": "v7", "armv6l": "v6"}


@dataclass(frozen=True)
class Platform:
    """os/arch/variant, normalised as containerd does (arm64/v8 is arm64, arm is arm/v7)."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def make(cls, os_: str, arch: str, variant: str = "") -> Platform:
        """Normalise aliases (`x86_64`, `aarch64`, `armhf`) and default variants."""
        os_, raw = os_.lower(), arch.lower()
        arch = _ARCH_ALIASES.get(raw, raw)
        variant = (variant or _ARCH_VARIANT.get(raw, "")).lower()
        if variant and not variant.startswith("v") and variant.isdigit():
            variant = "v" + variant
        if arch == "arm64" and variant == "v8":
            variant = ""
        if arch == "arm" and not variant:
            variant = "v7"
        return cls(os_, arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platform(text: str | None) -> Platform:
    """`os/arch[/variant]`, or the host's platform for None."""
    if not text:
        return host_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RbuildError(f"invalid platform {text!r}: want os/arch[/variant]")
    return Platform.make(*parts)


def host_platform() -> Platform:
    """The platform this machine runs natively."""
    return Platform.make("linux", os.uname().machine or "amd64")  # platform.machine()'s answer, without its import


def match_rank(want: Platform, have: Platform) -> int | None:
    """0 for an exact match, higher for worse fallbacks (arm/v7 runs v6 and v5), None for no match."""
    if want.os != have.os or want.architecture != have.architecture:
        return None
    if want.variant == have.variant:
        return 0
    if want.architecture == "arm" and have.variant[1:].isdigit() and want.variant[1:].isdigit():
        gap = int(want.variant[1:]) - int(have.variant[1:])
        return gap if gap > 0 else None
    return None


def choose_platform(index: dict[str, Any], want: Platform, where: str) -> dict[str, Any]:
    """The index entry (a descriptor) that best matches `want`; an error listing what exists when none does."""
    best: tuple[int, int, dict[str, Any]] | None = None
    seen = []
    for position, entry in enumerate(index.get("manifests") or []):
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue
        have = Platform.make(str(plat.get("os", "")), str(plat.get("architecture", "")), str(plat.get("variant", "")))
        seen.append(str(have))
        rank = match_rank(want, have)
        if rank is not None and (best is None or (rank, position) < best[:2]):
            best = (rank, position, entry)
    if best is None:
        listed = ", ".join(sorted(set(seen))) or "none"
        raise RbuildError(f"{where}: no image for platform {want} (available: {listed})")
    return best[2]


def check_config_platform(config: bytes, want: Platform, what: str) -> None:
    """An explicit platform must match a single-platform image's config (when the config names one)."""
    try:
        data = json.loads(config)
        have = Platform.make(data.get("os", ""), data.get("architecture", ""), data.get("variant", ""))
    except (ValueError, AttributeError):
        return
    if have.architecture and match_rank(want, have) is None:
        raise RbuildError(f"{what}: image is for {have}, not the requested {want}")
