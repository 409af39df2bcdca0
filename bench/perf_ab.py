"""Issue 15's cases, two rbuild revisions side by side in one run (A/B alternating, medians).

    sudo /opt/rbuild/env/bin/python bench/perf_ab.py --old REV --new REV --user NAME [--reps 5] [--buildah]

Everything lives on tmpfs (--work, default /dev/shm/rbuild-perf): the contexts, the stores, a
docker-registry on 127.0.0.1 started for the run (stopped by pid at the end). NAME is an existing user with
a subuid range; builds run as that user (runuser). Cases:

* copy10k: `COPY files/ /data/` of 10,000 files (~200 MB, ~2:1 compressible) into a fresh store holding the
  base, against `cp -a` of the same tree into a plain directory on the same tmpfs;
* hello-cached, fifty-cached: fully cached rebuilds (bench/workloads), against `python3 -c pass`;
* write1g: one RUN writing 1 GiB of random bytes (bench/workloads/write1g, --write-mb) into a fresh store
  holding the base, against `dd` of the same into a plain file; its stores are on disk (--disk), not tmpfs;
* push1g: a fresh copy of a store holding a 1 GiB image (4 layers of 256 MiB, half random) pushed to the
  registry (every layer compressed: nothing kept from an earlier push), each time to a new repository and
  with no memory of earlier pushes (every blob is uploaded); with --buildah also buildah's build+push of
  the same Containerfile against rbuild's build+push (old, new, buildah);
* pull1g: that image pulled into an empty store (with --buildah: buildah's pull too).

With --link-mbps N the pushes and the 1 GiB pull go over a relay paced to N MB/s each way (bench/slowlink.py),
as to a registry across a network, instead of loopback.

The work directory (several GiB: keep --work on a tmpfs with room) and --disk are removed at the end.
Either revision may be any commit with `python -m rootless` (wave 1, 0c9f22e, too): each runs from a
`git archive` of its rootless/ with its own stores.
Wall time is a median of --reps (a multiple of the variants, 2 or 3, puts each in each place equally
often); CPU is user+system of the process tree (wait4). The machine is shared:
the load average is printed with every case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIG = "".join(
    f"RUN head -c 134217728 /dev/urandom > /l{i} && head -c 134217728 /dev/zero >> /l{i}\n" for i in range(1, 5)
)


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall, cpu) of argv and everything it waited for; a failure stops the run."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{err}")
    return wall, ru.ru_utime + ru.ru_stime


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.disk = Path(args.disk)
        self.py = args.python
        self.rows: list[dict[str, object]] = []
        self.pushes = 0
        self.repo = ""

    def as_user(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> list[str]:
        user = self.args.user
        pre = [
            "setpriv",
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "env",
            *[f"{k}={v}" for k, v in (env or {}).items()],
        ]
        return pre + (["sh", "-c", 'cd "$0" && exec "$@"', cwd, *argv] if cwd else argv)

    def rbuild(self, rev: str, store: Path, *argv: str, cwd: str | None = None) -> list[str]:
        env = {
            "PYTHONPATH": str(self.work / rev),
            "RBUILD_ROOT": str(store),
            "XDG_RUNTIME_DIR": str(self.work / f"rt-{rev}"),  # the probe's cache: each revision keys it its own way
            "HOME": str(self.work / "home"),
        }
        # never the caller's directory: `python -m` puts it first on sys.path, and a checkout there would
        # shadow the revision under test (PYTHONPATH)
        return self.as_user([self.py, "-m", "rootless", *argv], env, cwd or str(self.work))

    def wanted(self, name: str) -> bool:
        return not self.args.only or name in self.args.only.split(",")

    def setup(self) -> None:
        for d in (self.work, self.disk):
            if d.exists():
                shutil.rmtree(d)
        self.disk.mkdir(parents=True)
        for d in ("rt-old", "rt-new", "home", "stores"):
            (self.work / d).mkdir(parents=True)
        for rev, name in ((self.args.old, "old"), (self.args.new, "new")):
            (self.work / name).mkdir()
            arch = subprocess.run(
                ["git", "-C", str(HERE.parent), "archive", rev, "rootless"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(self.work / name)], input=arch.stdout, check=True)
            subprocess.run([self.py, "-m", "compileall", "-q", str(self.work / name)], check=True)
        self.port = _free_port()
        reg = Path(self.args.registry_dir) if self.args.registry_dir else self.work / "registry"
        reg.mkdir(parents=True)
        (reg / "config.yml").write_text(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {reg}/data\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\nlog:\n  level: error\n"
        )
        self.registry = subprocess.Popen(
            ["docker-registry", "serve", str(reg / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(1)
        self.base = f"127.0.0.1:{self.port}/busybox:latest"
        self.push_host = f"127.0.0.1:{self.port}"
        if self.args.link_mbps:  # pushes and the 1 GiB pull go over a paced link; base pulls stay direct
            portfile = self.work / "link-port"
            self.link = subprocess.Popen(
                [self.py, str(HERE / "slowlink.py"), str(portfile), self.push_host, str(self.args.link_mbps)]
            )
            while not portfile.exists():
                time.sleep(0.05)
            self.push_host = f"127.0.0.1:{portfile.read_text()}"
        subprocess.run(
            ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{self.args.busybox}", f"docker://{self.base}"],
            check=True,
        )
        self.contexts()
        for d in (self.work, self.disk):
            subprocess.run(["chown", "-R", self.args.user, str(d)], check=True)

    def contexts(self) -> None:
        for w in ("hello", "fifty"):
            ctx = self.work / w
            ctx.mkdir()
            text = (HERE / "workloads" / w / "Containerfile").read_text()
            (ctx / "Containerfile").write_text(text.replace("ARG BUSYBOX\n", "").replace("${BUSYBOX}", self.base))
        ctx = self.work / "write1g"
        ctx.mkdir()
        text = (HERE / "workloads" / "write1g" / "Containerfile").read_text()
        (ctx / "Containerfile").write_text(text.replace("ARG BUSYBOX\n", "").replace("${BUSYBOX}", self.base))
        (self.work / "hello" / "hello.sh").write_text('#!/bin/sh\necho "hello from $(hostname)"\ncat /app/motd\n')
        (self.work / "fifty" / "conf").mkdir()
        for i in range(10):
            text = "".join(f"key{j} = value {i}.{j}\n" for j in range(50))
            (self.work / "fifty" / "conf" / f"c{i}.conf").write_text(text)
        ctx = self.work / "copy10k"
        (ctx / "files").mkdir(parents=True)
        n = self.args.files if self.wanted("copy10k") else 0
        per = 200_000_000 // 10_000
        for i in range(n):
            d = ctx / "files" / f"d{i // 100:03d}"
            d.mkdir(exist_ok=True)
            (d / f"f{i:05d}.dat").write_bytes(os.urandom(per // 2) + bytes(per - per // 2))
        (ctx / "Containerfile").write_text(f"FROM {self.base}\nCOPY files/ /data/\n")
        big = self.work / "big"
        big.mkdir()
        (big / "Containerfile").write_text(f"FROM {self.base}\n{BIG}")

    def fresh_push(self) -> str:
        """A new repository name for the next push, and no memory of where blobs were pushed before: every
        push uploads all of its blobs (no HEAD hit from an earlier repetition, no mount from the other
        variant's repository)."""
        self.pushes += 1
        shutil.rmtree(self.work / "home" / ".cache", ignore_errors=True)
        return f"{self.push_host}/big{self.pushes}"

    def case(
        self, name: str, what: str, variants: dict[str, Callable[[], list[str]]], before: Callable[[str], None]
    ) -> None:
        if not self.wanted(name):
            return
        load0 = os.getloadavg()[0]
        got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        order = list(variants)
        for rep in range(self.args.reps):
            # each variant takes each place in turn: forward/backward left the middle one always after
            # another's run (and the removal of its GiB before it), a bias of 20-40% on write1g between two
            # copies of the same revision
            for v in order[rep % len(order) :] + order[: rep % len(order)]:
                before(v)
                subprocess.run(["sync"], check=True)
                got[v].append(timed(variants[v]()))
        row: dict[str, object] = {"case": name, "what": what, "load": [round(load0, 1), round(os.getloadavg()[0], 1)]}
        for v, runs in got.items():
            row[v] = {"wall": statistics.median(w for w, _ in runs), "cpu": statistics.median(c for _, c in runs)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def fresh_store(self, name: str, rev: str, under: Path | None = None) -> Path:
        store = (under or self.work / "stores") / name
        if store.exists():
            shutil.rmtree(store)
        subprocess.run(
            self.rbuild(rev, store, "pull", "-q", "--tls-verify=false", self.base), check=True, capture_output=True
        )
        return store

    def run(self) -> None:
        tls = "--tls-verify=false"
        copy10k = str(self.work / "copy10k")
        plain = self.work / "stores" / "cp"

        def before_copy(v: str) -> None:
            if v == "cp -a":
                shutil.rmtree(plain, ignore_errors=True)
            else:
                self.fresh_store(f"copy-{v}", v)

        self.case(
            "copy10k",
            "COPY of 10,000 files (200 MB) into a new path, fresh store with the base",
            {
                "old": lambda: self.rbuild(
                    "old", self.work / "stores" / "copy-old", "build", "-q", tls, ".", cwd=copy10k
                ),
                "new": lambda: self.rbuild(
                    "new", self.work / "stores" / "copy-new", "build", "-q", tls, ".", cwd=copy10k
                ),
                "cp -a": lambda: self.as_user(["cp", "-a", f"{copy10k}/files", str(plain)]),
            },
            before_copy,
        )
        for w in ("hello", "fifty"):
            if not self.wanted(f"{w}-cached"):
                continue
            ctx = str(self.work / w)
            for v in ("old", "new"):
                subprocess.run(
                    self.rbuild(v, self.work / "stores" / f"{w}-{v}", "build", "-q", tls, ".", cwd=ctx),
                    check=True,
                    capture_output=True,
                )
            self.case(
                f"{w}-cached",
                "every step cached",
                {
                    "old": lambda w=w, ctx=ctx: self.rbuild(
                        "old", self.work / "stores" / f"{w}-old", "build", "-q", tls, ".", cwd=ctx
                    ),
                    "new": lambda w=w, ctx=ctx: self.rbuild(
                        "new", self.work / "stores" / f"{w}-new", "build", "-q", tls, ".", cwd=ctx
                    ),
                    "python3 -c pass": lambda: self.as_user([self.py, "-c", "pass"]),
                },
                lambda v: None,
            )
        self.write_case()
        self.push_case()

    def write_case(self) -> None:
        """write1g: a RUN that writes --write-mb MiB, against dd writing the same into a plain file."""
        tls = "--tls-verify=false"
        ctx = str(self.work / "write1g")
        mb = str(self.args.write_mb)
        plain = self.disk / "dd.bin"

        def before(v: str) -> None:
            if v == "dd":
                plain.unlink(missing_ok=True)
            else:
                self.fresh_store(f"write-{v}", v, self.disk)

        def build(v: str) -> list[str]:
            store = self.disk / f"write-{v}"
            return self.rbuild(v, store, "build", "-q", tls, "--build-arg", f"SIZE_MB={mb}", ".", cwd=ctx)

        self.case(
            "write1g",
            f"RUN writing {mb} MiB of random bytes (dd from /dev/urandom), fresh store with the base, on disk",
            {
                "old": lambda: build("old"),
                "new": lambda: build("new"),
                "dd": lambda: self.as_user(["dd", "if=/dev/urandom", f"of={plain}", "bs=1M", f"count={mb}"]),
            },
            before,
        )
        for v in ("old", "new"):
            shutil.rmtree(self.disk / f"write-{v}", ignore_errors=True)
        plain.unlink(missing_ok=True)

    def push_case(self) -> None:
        tls = "--tls-verify=false"
        big = str(self.work / "big")
        if self.wanted("push1g") or self.wanted("pull1g"):
            built = self.work / "stores" / "big"
            subprocess.run(
                self.rbuild("new", built, "build", "-q", tls, "-t", "big", ".", cwd=big),
                check=True,
                capture_output=True,
            )

            def before_push(v: str) -> None:
                for old in (self.work / "stores").glob("push-*"):  # one copy at a time: tmpfs is memory
                    shutil.rmtree(old)
                subprocess.run(["cp", "-a", str(built), str(self.work / "stores" / f"push-{v}")], check=True)
                self.repo = self.fresh_push()

            self.case(
                "push1g",
                "push of a 1 GiB image (4 layers of 256 MiB, half random), every layer compressed (gzip)",
                {
                    v: (
                        lambda v=v: self.rbuild(
                            v, self.work / "stores" / f"push-{v}", "push", "-q", tls, "big", f"docker://{self.repo}"
                        )
                    )
                    for v in ("old", "new")
                },
                before_push,
            )
            for old in (self.work / "stores").glob("push-*"):
                shutil.rmtree(old)
            pulled = self.fresh_push()  # after push1g: this push keeps its compressed blobs in `built`
            subprocess.run(self.rbuild("new", built, "push", "-q", tls, "big", pulled), check=True, capture_output=True)
            shutil.rmtree(built)
            self.pull_case(pulled)
        if self.args.buildah and self.wanted("build+push1g"):
            self.buildah_case(big)

    def pull_case(self, ref: str) -> None:
        """pull1g: the 1 GiB image into an empty store (layers unpacked, blobs kept); buildah's pull too."""
        tls = "--tls-verify=false"
        stores = self.work / "stores"
        home = f"HOME={self.work / 'home'}"
        g = f"env {home} buildah --root {stores}/pull-buildah/root --runroot {stores}/pull-buildah/run"

        def before(v: str) -> None:
            if (stores / "pull-buildah").exists():
                subprocess.run(self.as_user(["sh", "-c", f"{g} rmi -a -f"]), capture_output=True)
            for old in stores.glob("pull-*"):  # one store at a time: tmpfs is memory
                shutil.rmtree(old)

        variants = {
            v: (lambda v=v: self.rbuild(v, stores / f"pull-{v}", "pull", "-q", tls, ref)) for v in ("old", "new")
        }
        if self.args.buildah:
            variants["buildah"] = lambda: self.as_user(
                ["sh", "-c", f"{g} --storage-driver overlay pull {tls} -q {ref}"]
            )
        self.case("pull1g", "pull of the 1 GiB image into an empty store", variants, before)
        before("")

    def buildah_case(self, big: str) -> None:
        tls = "--tls-verify=false"
        bstore = self.work / "stores" / "buildah"
        home = f"HOME={self.work / 'home'}"
        g = f"env {home} buildah --root {bstore}/root --runroot {bstore}/run --storage-driver overlay"

        def script(v: str) -> list[str]:
            if v == "buildah":
                build = f"{g} build --layers --isolation chroot {tls} -q -t big . >/dev/null"
                cmd = f"{build} && {g} push {tls} -q big docker://{self.repo}"
            else:
                store = self.work / "stores" / f"bp-{v}"
                env = f"{home} PYTHONPATH={self.work / v} RBUILD_ROOT={store} XDG_RUNTIME_DIR={self.work / f'rt-{v}'}"
                cmd = f"env {env} {self.py} -m rootless build -q {tls} -t {self.repo} --push ."
            return self.as_user(["sh", "-c", f'cd "{big}" && {cmd}'])

        def clear_buildah() -> None:
            if bstore.exists():
                subprocess.run(self.as_user(["sh", "-c", f"{g} rm -a; {g} rmi -a -f"]), capture_output=True)
                shutil.rmtree(bstore, ignore_errors=True)

        def before(v: str) -> None:
            for old in (self.work / "stores").glob("bp-*"):  # one builder's store at a time: tmpfs is memory
                shutil.rmtree(old)
            clear_buildah()
            self.repo = self.fresh_push()
            if v == "buildah":
                pull = self.as_user(["sh", "-c", f"{g} pull {tls} -q {self.base}"])
                subprocess.run(pull, check=True, capture_output=True)
            else:
                self.fresh_store(f"bp-{v}", v)

        self.case(
            "build+push1g",
            "build of the 1 GiB image and its push",
            {"old": lambda: script("old"), "new": lambda: script("new"), "buildah": lambda: script("buildah")},
            before,
        )
        for old in (self.work / "stores").glob("bp-*"):
            shutil.rmtree(old)
        clear_buildah()

    def stop(self) -> None:
        link = getattr(self, "link", None)
        if link is not None:
            link.kill()
            link.wait()
        reg = getattr(self, "registry", None)
        if reg is not None:
            reg.terminate()
            reg.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True)
    p.add_argument("--new", default="HEAD")
    p.add_argument("--user", required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--work", default="/dev/shm/rbuild-perf")
    p.add_argument("--disk", default="/var/tmp/rbuild-perf-disk", help="write1g's stores (on disk, not tmpfs)")
    p.add_argument("--write-mb", type=int, default=1024, help="write1g's size in MiB")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--busybox", default=str(next(Path("/var/cache/rbuild-bench").glob("busybox-*"), "")))
    p.add_argument("--buildah", action="store_true")
    p.add_argument(
        "--only",
        help="comma-separated case names (copy10k, hello-cached, fifty-cached, write1g, push1g, pull1g, build+push1g)",
    )
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument(
        "--link-mbps",
        type=float,
        help="push and pull the big image over a link of this many MB/s each way (bench/slowlink.py)",
    )
    p.add_argument(
        "--registry-dir",
        help="the registry's storage (default: under --work); several GiB with --buildah, each push being new"
        " blobs: put it on disk when tmpfs is short. Removed at the end.",
    )
    args = p.parse_args()
    run = Run(args)
    try:
        run.setup()
        run.run()
    finally:
        run.stop()
        shutil.rmtree(run.work, ignore_errors=True)  # several GiB on tmpfs: memory the machine needs back
        if args.registry_dir:
            shutil.rmtree(args.registry_dir, ignore_errors=True)
        shutil.rmtree(run.disk, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(run.rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
