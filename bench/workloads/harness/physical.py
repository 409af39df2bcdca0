"""Physical references: what the machine does with a workload's data using plain tools, single-threaded.

cp     `cp -a` of the tree (or file) to a sibling directory on the same filesystem
write  busybox `dd if=/dev/urandom bs=1M` of the same size (only for workloads whose RUN does that)
sha256 `openssl dgst -sha256` of a tar of the tree (the tar is made first, untimed: the tools read a
       warm file); OpenSSL uses the CPU's SHA extensions, as Python's hashlib does, where coreutils'
       sha256sum does not (4x slower here), so sha256sum only when there is no openssl
zstd3  `zstd -3 -c` of that tar to /dev/null
gzip6  `gzip -6 -c` of that tar to /dev/null
Each is the best of a few runs (what the machine can do: noise only adds time), after a `sync`, on
a warm page cache (the builders see one too).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from workloads import tree_size

TOOLS = ("cp", "write", "sha256", "zstd3", "gzip6")
SHA256 = ["openssl", "dgst", "-sha256"] if shutil.which("openssl") else ["sha256sum"]


def _timed(argv: list[str], stdout: int | None = subprocess.DEVNULL) -> float:
    subprocess.run(["sync"], check=False)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(data: Path, scratch: Path, reps: int, write_bytes: int = 0) -> dict[str, float | int]:
    """Seconds per reference (best of reps) plus the data's bytes and file count."""
    scratch.mkdir(parents=True, exist_ok=True)
    nbytes, nfiles = tree_size(data)
    times: dict[str, list[float]] = {t: [] for t in TOOLS}
    if data.is_file():
        blob = data
    else:
        blob = scratch / "data.tar"
        subprocess.run(["tar", "-C", str(data), "-cf", str(blob), "."], check=True)
    try:
        for _ in range(max(1, reps)):
            # the write first: right after deleting a big copy, ext4 (mounted with discard) writes slower
            if write_bytes:
                target = scratch / "write.bin"
                mib = max(1, write_bytes >> 20)
                times["write"].append(
                    _timed(
                        ["/bin/busybox", "dd", "if=/dev/urandom", f"of={target}", "bs=1M", f"count={mib}"], stdout=None
                    )
                )
                target.unlink()
            times["sha256"].append(_timed(SHA256 + [str(blob)]))
            times["zstd3"].append(_timed(["zstd", "-3", "-q", "-c", str(blob)]))
            times["gzip6"].append(_timed(["gzip", "-6", "-c", str(blob)]))
            dst = scratch / "cp-dst"
            times["cp"].append(_timed(["cp", "-a", str(data), str(dst)]))
            if dst.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
            else:
                dst.unlink(missing_ok=True)
    finally:
        if blob != data:
            blob.unlink(missing_ok=True)
    out: dict[str, float | int] = {"bytes": nbytes, "files": nfiles, "reps": max(1, reps)}
    for tool, values in times.items():
        if values:
            out[f"{tool}_s"] = round(min(values), 4)
    return out
