"""Benchmark workloads: each directory here holds a Containerfile and a context generator (gen.py).

A workload's gen.py defines:
  CASES: list[CaseSpec]  the measured cases (one context can serve a cold build and cached rebuilds)
  generate(ctx, work, scale) -> Generated  writes the build context (Containerfile included) into ctx;
      reference data that is not the context (a base image's tree, say) goes under work
  BASES    the base images the Containerfile names through build args (BUSYBOX, BIGDIR, DEBIAN)
  PRIMARY  the physical reference of the headline fraction: "cp", "write", or "" for none

Modes:
  cold    a fresh store for every repetition; the base image is pulled (timed apart) before the build
  cached  one warm build first (not timed), then the same build again
  touch   warm build, then each repetition touches one context file (mtime only) and rebuilds
  change  warm build, then each repetition changes one byte of one context file and rebuilds
  ci      a fresh CI runner with a warm registry cache: one build exports its cache to the registry
          (--cache-to, not timed); then every repetition builds in a fresh store with --cache-from
  push    cold, then the image is pushed to the registry: build + push timed end to end
The harness (bench/run.py with the modules in workloads/harness/) runs every case with rbuild and with
buildah, alternating which goes first.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("cold", "cached", "touch", "change", "ci", "push")
BASES = ("busybox", "bigdir", "debian")


@dataclass(frozen=True)
class Scale:
    """Full size, or the small sizes of --quick (the smoke test's)."""

    quick: bool = False

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Generated:
    """What generate() made: the data the physical references run on, and the file a mutation hits."""

    data: Path | None = None  # tree (or single file) for cp -a / sha256 / zstd / gzip; None: no references
    mutate: str | None = None  # context-relative file touched or changed by the touch/change modes
    write_bytes: int = 0  # bytes the build's RUN writes from /dev/urandom (the "write" reference)
    build_args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CaseSpec:
    """One measured case of a workload."""

    name: str
    mode: str
    description: str
    network: bool = False  # needs the Debian mirror: reported apart
    flags: dict[str, list[str]] = field(default_factory=dict)  # builder name -> extra build flags (--jobs)


@dataclass
class Case:
    """A case bound to its workload's Containerfile and generator."""

    spec: CaseSpec
    workload: str
    containerfile: Path
    bases: tuple[str, ...]
    generate: Callable[[Path, Path, Scale], Generated]
    primary: str = "cp"  # the physical reference the headline fraction uses

    @property
    def name(self) -> str:
        return self.spec.name


def load_cases() -> list[Case]:
    """Every case of every workload directory, in directory order (ORDER first, then the rest)."""
    cases: list[Case] = []
    dirs = sorted(p for p in HERE.iterdir() if (p / "gen.py").is_file())
    order = {name: i for i, name in enumerate(ORDER)}
    dirs.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    for d in dirs:
        spec = importlib.util.spec_from_file_location(f"bench_workload_{d.name}", d / "gen.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        bases = tuple(getattr(mod, "BASES", ("busybox",)))
        for b in bases:
            if b not in BASES:
                raise ValueError(f"{d.name}: unknown base {b!r}")
        for cs in mod.CASES:
            if cs.mode not in MODES:
                raise ValueError(f"{d.name}: unknown mode {cs.mode!r}")
            cases.append(Case(cs, d.name, d / "Containerfile", bases, mod.generate, getattr(mod, "PRIMARY", "cp")))
    return cases


ORDER = ["hello", "copy10k", "write1g", "whiteout", "multistage", "parallel", "fifty", "debian", "apt"]


# -------------------------------------------------------------------------------------------------------
# helpers for generators


def install_containerfile(ctx: Path, workload_dir: Path) -> None:
    """Copy the workload's Containerfile into the context."""
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Containerfile").write_bytes((workload_dir / "Containerfile").read_bytes())


def file_bytes(rnd: random.Random, size: int) -> bytes:
    """Deterministic content that compresses about 2:1 (half random, half repetitive text)."""
    half = size // 2
    text = b"".join(
        b"line %d of some rather ordinary text, key=%d\n" % (i, rnd.randrange(100)) for i in range(half // 40 + 1)
    )
    return rnd.randbytes(size - half) + text[:half]


def make_tree(root: Path, files: int, total: int, seed: int, per_dir: int = 100, prefix: str = "f") -> int:
    """Write `files` files totalling about `total` bytes (sizes vary 1:9) under root/dNNN/; returns bytes."""
    rnd = random.Random(seed)
    weights = [rnd.uniform(0.2, 1.8) for _ in range(files)]
    scale = total / sum(weights)
    written = 0
    for i, w in enumerate(weights):
        d = root / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = max(1, int(w * scale))
        (d / f"{prefix}{i:05d}.dat").write_bytes(file_bytes(rnd, size))
        written += size
    return written


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file or a tree (regular files only; links not followed)."""
    if path.is_file():
        return path.stat().st_size, 1
    total = n = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
            n += 1
    return total, n


def bigdir_tree(root: Path, scale: Scale) -> int:
    """The big directory of the "bigdir" base image (/big): 10,000 files, ~100 MB (quick: 400, 2 MB)."""
    return make_tree(root, scale.pick(10_000, 400), scale.pick(100_000_000, 2_000_000), seed=7, prefix="f")
