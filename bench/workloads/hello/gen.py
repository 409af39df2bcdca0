"""hello: the smallest useful build, cold and fully cached."""

from __future__ import annotations

from pathlib import Path

from workloads import CaseSpec, Generated, Scale, install_containerfile

BASES = ("busybox",)
PRIMARY = ""
CASES = [
    CaseSpec("hello-cold", "cold", "busybox, 2 RUN, 1 small COPY; empty store (base pulled beforehand)"),
    CaseSpec("hello-cached", "cached", "the same build again, every step cached"),
]


def generate(ctx: Path, work: Path, scale: Scale) -> Generated:
    """A Containerfile and a 3-line script."""
    install_containerfile(ctx, Path(__file__).parent)
    (ctx / "hello.sh").write_text('#!/bin/sh\necho "hello from $(hostname)"\ncat /app/motd\n')
    return Generated(data=ctx)
