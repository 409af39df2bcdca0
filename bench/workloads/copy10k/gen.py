"""copy10k: COPY of many small files; also the context of the touch / one-byte cached rebuilds."""

from __future__ import annotations

from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile, make_tree

BASES = ("busybox",)
PRIMARY = "cp"
CASES = [
    CaseSpec("copy10k-cold", "cold", "COPY of 10,000 files (~200 MB, ~2:1 compressible) + 1 RUN"),
    CaseSpec("copy10k-touch", "touch", "cached rebuild after touching one context file (mtime only)"),
    CaseSpec("copy10k-byte", "change", "rebuild after changing one byte of one context file"),
    CaseSpec("copy10k-ci", "ci", "fresh CI runner: empty store, warm registry cache (--cache-from)"),
    CaseSpec("copy10k-push", "push", "cold build + push to the loopback registry, end to end"),
]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """10,000 files in 100 directories (quick: 300 files, 3 MB)."""
    install_containerfile(ctx, Path(__file__).parent)
    n = scale.pick(10_000, 300)
    make_tree(ctx / "files", n, scale.pick(200_000_000, 3_000_000), seed=10)
    middle = n // 2
    return Generated(data=ctx / "files", mutate=f"files/d{middle // 100:03d}/f{middle:05d}.dat")
