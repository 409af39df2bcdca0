"""whiteout: deleting half of a base image's big directory makes thousands of whiteouts."""

from __future__ import annotations

from pathlib import Path

from workloads import CaseSpec, Generated, Scale, bigdir_tree, install_containerfile

BASES = ("bigdir",)
PRIMARY = ""
CASES = [CaseSpec("whiteout-cold", "cold", "RUN deleting 5,000 of the 10,000 files (~100 MB) of a base directory")]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """No context files; the reference data is the base image's /big tree, made again under work."""
    install_containerfile(ctx, Path(__file__).parent)
    bigdir_tree(work / "big", scale)
    return Generated(data=work / "big")
