"""parallel: two independent stages of A and B seconds, then a final stage; one stage at a time, or at once.

One stage at a time takes about A + B, stages at once about max(A, B). Sleep, not CPU: on a shared
2-core machine CPU work would measure the other users' load more than the scheduling. rbuild's
default is one stage per CPU; buildah 1.28 builds stages one by one unless --jobs is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile

BASES = ("busybox",)
PRIMARY = ""
CPUS = str(len(os.sched_getaffinity(0)))
CASES = [
    CaseSpec(
        "parallel-jobs1",
        "cold",
        "2 independent stages (sleep 3 s, 2 s) + a final COPY --from both; --jobs 1 (one at a time, as before)",
        flags={"rbuild": ["--jobs", "1"], "buildah": ["--jobs", "1"]},
    ),
    CaseSpec(
        "parallel-cold",
        "cold",
        f"the same, stages at once: rbuild's default (one per CPU), buildah --jobs {CPUS}",
        flags={"buildah": ["--jobs", CPUS]},
    ),
]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """Only the Containerfile; the stages sleep 3 s and 2 s (quick: 1 s each)."""
    install_containerfile(ctx, Path(__file__).parent)
    return Generated(build_args={"A_SECONDS": str(scale.pick(3, 1)), "B_SECONDS": str(scale.pick(2, 1))})
