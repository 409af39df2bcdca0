"""Does one long C call release the GIL? `python bench/gil_release.py` (any python with isal and zstandard).

A Python thread records timestamps in a loop while the main thread makes one call on 64 MiB (half random,
half zeros, like perf_ab's layers). If the call holds the GIL the recorder stalls for the whole call (its
longest stall is about the call's duration); if the call releases it, the recorder keeps running and its
stalls are scheduler slices only. That holds on a busy machine too, where timing two threads against one
shows nothing (there is no idle core). bytes.translate is the control that holds the GIL.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable

import zstandard
from isal import isal_zlib

BUF = os.urandom(32 << 20) + bytes(32 << 20)
TABLE = bytes(range(256))[::-1]


def run(name: str, fn: Callable[[], object]) -> None:
    stamps: list[float] = []
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    recorder = threading.Thread(target=record)
    recorder.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    stop.set()
    recorder.join()
    inside = [s for s in stamps if t0 <= s <= t1]
    points = [t0, *inside, t1]
    stall = max(b - a for a, b in zip(points, points[1:], strict=False))
    took = 1000 * (t1 - t0)
    print(f"{name:34s} call {took:7.1f} ms, recorder ran {len(inside):8d} times, longest stall {1000 * stall:6.1f} ms")


def gzip_isal() -> None:
    c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)
    c.compress(BUF)
    c.flush()


def zstd() -> None:
    c = zstandard.ZstdCompressor(level=3).compressobj()
    c.compress(BUF)
    c.flush()


def main() -> None:
    for _ in range(2):
        run("bytes.translate (holds the GIL)", lambda: BUF.translate(TABLE))
        run("isal_zlib compressobj level 1", gzip_isal)
        run("isal_zlib.crc32", lambda: isal_zlib.crc32(BUF))
        run("zstd level 3 compressobj", zstd)
        run("hashlib.sha256", lambda: hashlib.sha256(BUF).digest())
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()
