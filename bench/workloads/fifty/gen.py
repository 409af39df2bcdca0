"""fifty: many instructions, each one a cache lookup (and for buildah --layers, an image)."""

from __future__ import annotations

from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile

BASES = ("busybox",)
PRIMARY = ""
CASES = [
    CaseSpec("fifty-cold", "cold", "50 instructions: 8 ENV, 4 LABEL, 10 small COPY, 17 RUN, WORKDIR, USER, ..."),
    CaseSpec("fifty-cached", "cached", "the same 50 instructions again, every step cached"),
]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """Ten small configuration files."""
    install_containerfile(ctx, Path(__file__).parent)
    (ctx / "conf").mkdir(exist_ok=True)
    for i in range(10):
        (ctx / "conf" / f"c{i}.conf").write_text("".join(f"key{j} = value {i}.{j}\n" for j in range(50)))
    return Generated(data=ctx)
