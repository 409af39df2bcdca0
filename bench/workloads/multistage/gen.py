"""multistage: 3 stages, COPY --from of both builder stages into the final one."""

from __future__ import annotations

from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile, make_tree

BASES = ("busybox",)
PRIMARY = "cp"
CASES = [
    CaseSpec("multistage-cold", "cold", "3 stages: 200 x 100 kB generated + 1,000 files (20 MB) COPY --from"),
    CaseSpec(
        "multistage-jobs1",
        "cold",
        "the same, rbuild --jobs 1 (its two builder stages one after the other, as before issue 15)",
        flags={"rbuild": ["--jobs", "1"]},
    ),
]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """1,000 asset files (~20 MB; quick: 100 files, 1 MB); the gen stage makes 20 MB more (quick: 1 MB)."""
    install_containerfile(ctx, Path(__file__).parent)
    make_tree(ctx / "assets", scale.pick(1000, 100), scale.pick(20_000_000, 1_000_000), seed=20)
    return Generated(data=ctx / "assets", build_args={"GEN_FILES": str(scale.pick(200, 10))})
