"""debian: useradd, COPY of an application tree, chown -R (copy-up of every file) on Debian minbase."""

from __future__ import annotations

from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile, make_tree

BASES = ("debian",)
PRIMARY = "cp"
CASES = [
    CaseSpec("debian-cold", "cold", "Debian minbase: useradd, COPY 2,000 files (20 MB), chown -R, dpkg-query"),
    CaseSpec("debian-cached", "cached", "the same build again, every step cached"),
    CaseSpec("debian-ci", "ci", "fresh CI runner: empty store, warm registry cache (--cache-from)"),
    CaseSpec("debian-push", "push", "cold build + push to the loopback registry, end to end"),
]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """2,000 application files, ~20 MB (quick: 100 files, 1 MB)."""
    install_containerfile(ctx, Path(__file__).parent)
    make_tree(ctx / "app", scale.pick(2000, 100), scale.pick(20_000_000, 1_000_000), seed=30, per_dir=50)
    return Generated(data=ctx / "app")
