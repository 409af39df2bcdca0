"""write1g: a RUN that writes one big file; the builder must diff, hash and store it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile

BASES = ("busybox",)
PRIMARY = "write"
CASES = [CaseSpec("write1g-cold", "cold", "one RUN writing a 1 GiB file from /dev/urandom (busybox dd)")]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """No context files; the reference data is the same dd run on the host (quick: 32 MiB)."""
    install_containerfile(ctx, Path(__file__).parent)
    size_mb = scale.pick(1024, 32)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "big.bin"
    subprocess.run(
        ["/bin/busybox", "dd", "if=/dev/urandom", f"of={data}", "bs=1M", f"count={size_mb}"],
        check=True,
        capture_output=True,
    )
    return Generated(data=data, write_bytes=size_mb << 20, build_args={"SIZE_MB": str(size_mb)})
