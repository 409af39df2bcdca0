"""apt: apt-get update + install from the Debian mirror; network-bound, so reported apart."""

from __future__ import annotations

from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile

BASES = ("debian",)
PRIMARY = ""
CASES = [CaseSpec("apt-cold", "cold", "Debian minbase: apt-get update && install ca-certificates curl", network=True)]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """Only the Containerfile; no physical reference (the time is the mirror's)."""
    install_containerfile(ctx, Path(__file__).parent)
    return Generated(data=None)
