#!/usr/bin/python3
"""Layer benchmarks: rbuild against rootless buildah (overlay driver), as an unprivileged user.

    sudo /usr/bin/python3 bench/layers_bench.py --user rbprobe [--rbuild /opt/rbuild/env/bin/rbuild]

Started as root it re-runs itself as --user (who needs an /etc/subuid range, like buildah). Measured,
each as a whole `build` (FROM a busybox image, then one step) in a fresh store, best of --runs:

  * a RUN step writing a 1 GiB file (`dd` from /dev/zero), and the `dd` alone in the same container;
  * a COPY of 10,000 small files (4 KiB each), and `cp -a` of the same tree;
  * the unpack of a ~200 MB base image (`FROM` a gzip OCI layout), against `sha256sum`, `zstd -3` and
    `cp -a` on the same data;
  * in-process layer throughput: write_tar (hash only and to a file), gzip (ISA-L) / zstd compression,
    open_blob + unpack of the gzip blob.

Prints a markdown table (docs/benchmarks.md "## Layers" quotes it) and writes --json.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))


def best(fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(runs):
        if setup:
            setup()
        os.sync()  # start each run without the previous one's dirty pages being written back meanwhile
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def alternate(fns: dict[str, Callable[[], object]], runs: int, setup: Callable[[], object]) -> dict[str, float]:
    """Best wall time and CPU time (user + system of the process tree) per tool, tools taking turns
    run by run so that drifting load from other work on the machine hits both alike."""
    out: dict[str, float] = {}
    for _ in range(runs):
        for name, fn in fns.items():
            setup()
            os.sync()
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
            out[name] = min(out.get(name, wall), wall)
            out[name + "_cpu"] = min(out.get(name + "_cpu", cpu), cpu)
    return out


def sh(*argv: str, env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    if res.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def write_layout(path: str, layer: bytes) -> None:
    """An OCI layout with one gzip layer (no test helpers: the bench stands alone)."""
    import hashlib

    os.makedirs(os.path.join(path, "blobs", "sha256"))

    def put(data: bytes) -> dict[str, object]:
        h = hashlib.sha256(data).hexdigest()
        with open(os.path.join(path, "blobs", "sha256", h), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + h, "size": len(data)}

    blob = gzip.compress(layer, compresslevel=6, mtime=0)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", **put(json.dumps(config).encode())}
    ldesc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(blob)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": [ldesc],
    }
    mdesc = {
        "mediaType": manifest["mediaType"],
        **put(json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [mdesc]}, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


def busybox_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "tmp", "etc"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tf.addfile(ti)
        tf.add("/bin/busybox", "bin/busybox")
        for applet in ("sh", "dd", "cp", "true", "mkdir", "cat", "rm", "ls"):
            ti = tarfile.TarInfo(f"bin/{applet}")
            ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, "busybox", 0o777
            tf.addfile(ti)
    return buf.getvalue()


def base_layer(limit: int) -> bytes:
    """~limit bytes of real files (/usr/lib, /usr/share): what a distribution base layer holds."""
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for top in ("/usr/lib", "/usr/share"):
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in sorted(filenames):
                    p = os.path.join(dirpath, name)
                    if total > limit or not os.path.isfile(p) or os.path.islink(p):
                        continue
                    try:
                        tf.add(p, p.lstrip("/"), recursive=False)
                    except OSError:
                        continue
                    total += os.path.getsize(p)
    return buf.getvalue()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = tempfile.mkdtemp(prefix="rbuild-bench-", dir="/var/tmp")
        self.results: dict[str, float] = {}
        self.env = dict(os.environ, HOME=self.work)

    def rbuild(self, *argv: str, root: str) -> str:
        return sh(self.args.rbuild, "--root", root, *argv, env=self.env)

    def buildah(self, *argv: str, root: str) -> str:
        return sh(
            "buildah",
            "--root",
            root + "/root",
            "--runroot",
            root + "/run",
            "--storage-driver",
            "overlay",
            *argv,
            env=self.env,
        )

    def fresh(self, name: str) -> str:
        path = os.path.join(self.work, name)
        if os.path.exists(path):
            self.cleanup_store(path)
        return path

    def cleanup_store(self, path: str) -> None:
        # files owned by subordinate ids: remove from inside the user namespace
        subprocess.run(["buildah", "unshare", "rm", "-rf", path], env=self.env, capture_output=True, check=False)

    def context(self, name: str, containerfile: str) -> str:
        ctx = os.path.join(self.work, name)
        os.makedirs(ctx, exist_ok=True)
        with open(os.path.join(ctx, "Containerfile"), "w") as f:
            f.write(containerfile)
        return ctx

    def build_pair(self, key: str, ctx: str) -> None:
        store = os.path.join(self.work, "store-" + key)
        got = alternate(
            {
                "rbuild": lambda: self.rbuild("build", "-q", "--no-cache", ctx, root=store),
                # chroot isolation: buildah's OCI runtime cannot run rootless under this host's cgroup setup
                "buildah": lambda: self.buildah(
                    "build",
                    "-q",
                    "--layers=false",
                    "--isolation",
                    "chroot",
                    "-f",
                    os.path.join(ctx, "Containerfile"),
                    ctx,
                    root=store,
                ),
            },
            self.args.runs,
            setup=lambda: self.cleanup_store(store),
        )
        self.results.update({f"{key}.{k}": v for k, v in got.items()})
        self.cleanup_store(store)

    def run(self) -> None:
        self.results["loadavg.start"] = os.getloadavg()[0]
        bb = os.path.join(self.work, "busybox")
        write_layout(bb, busybox_layer())
        base = f"FROM oci:{bb}\n"
        # a no-op step: the fixed cost of a build (process start, base import) to subtract mentally
        self.build_pair("noop", self.context("noop", base + "RUN true\n"))
        # 1 GiB RUN
        dd = "RUN dd if=/dev/zero of=/big bs=1M count=1024 2>/dev/null\n"
        self.build_pair("run1g", self.context("run1g", base + dd))
        dd_dir = os.path.join(self.work, "dd")
        os.makedirs(dd_dir)
        self.results["run1g.dd_alone"] = best(
            lambda: sh("dd", "if=/dev/zero", f"of={dd_dir}/big", "bs=1M", "count=1024"), self.args.runs
        )
        big = os.path.join(dd_dir, "big")
        self.results["run1g.sha256sum"] = best(lambda: sh("sha256sum", big), self.args.runs)
        self.layer_micro("1g", big_dir=dd_dir)
        os.unlink(big)
        # 10,000-file COPY
        ctx = self.context("copy10k", base + "COPY files/ /files/\n")
        for i in range(10_000):
            sub = os.path.join(ctx, "files", f"d{i // 100:03d}")
            if i % 100 == 0:
                os.makedirs(sub)
            with open(os.path.join(sub, f"f{i:05d}"), "wb") as f:
                f.write(os.urandom(64) * 64)
        self.build_pair("copy10k", ctx)
        dst = os.path.join(self.work, "cpa")
        self.results["copy10k.cp_a"] = best(
            lambda: sh("cp", "-a", os.path.join(ctx, "files"), dst),
            self.args.runs,
            setup=lambda: shutil.rmtree(dst, ignore_errors=True),
        )
        self.layer_micro("10k", big_dir=dst)
        shutil.rmtree(dst, ignore_errors=True)
        # 200 MB base unpack
        layer = base_layer(self.args.base_mb << 20)
        self.results["base.tar_bytes"] = len(layer)
        layout = os.path.join(self.work, "base")
        write_layout(layout, layer)
        tarpath = os.path.join(self.work, "base.tar")
        with open(tarpath, "wb") as f:
            f.write(layer)
        del layer
        ctx = self.context("base", f"FROM oci:{layout}\nLABEL bench=unpack\n")
        store = os.path.join(self.work, "store-base")
        got = alternate(
            {
                "rbuild": lambda: self.rbuild("build", "-q", "--no-cache", ctx, root=store),
                "buildah": lambda: self.buildah("from", f"oci:{layout}", root=store),
            },
            self.args.runs,
            setup=lambda: self.cleanup_store(store),
        )
        self.results.update({f"base.{k}": v for k, v in got.items()})
        self.cleanup_store(store)
        self.results["base.sha256sum"] = best(lambda: sh("sha256sum", tarpath), self.args.runs)
        self.results["base.zstd3"] = best(
            lambda: sh("zstd", "-3", "-q", "-f", "-T1", tarpath, "-o", tarpath + ".zst"), self.args.runs
        )
        tree = os.path.join(self.work, "tree")
        os.makedirs(tree)
        sh("tar", "-xf", tarpath, "-C", tree)
        dst = os.path.join(self.work, "tree2")
        self.results["base.cp_a"] = best(
            lambda: sh("cp", "-a", tree, dst), self.args.runs, setup=lambda: shutil.rmtree(dst, ignore_errors=True)
        )
        self.layer_micro("base", big_dir=tree)
        self.results["loadavg.end"] = os.getloadavg()[0]

    def layer_micro(self, key: str, big_dir: str) -> None:
        """write_tar / compression / unpack throughput in the rbuild install's python."""
        py = os.path.join(os.path.dirname(self.args.rbuild), "python")
        code = MICRO.replace("@DIR@", big_dir).replace("@OUT@", self.work).replace("@RUNS@", str(self.args.runs))
        out = sh(py, "-c", code, env=self.env)
        for k, v in json.loads(out).items():
            self.results[f"{key}.{k}"] = v

    def close(self) -> None:
        self.cleanup_store(self.work)
        shutil.rmtree(self.work, ignore_errors=True)


MICRO = r"""
import json, os, time, shutil
from rootless.layer import layers
from rootless.blob import compress
d, out, runs = "@DIR@", "@OUT@", @RUNS@
def best(fn):
    ts = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts)
r = {}
size = layers.write_tar(d, None)[1]
r["tar_bytes"] = size
r["write_tar_hash"] = best(lambda: layers.write_tar(d, None))
tarp = os.path.join(out, "micro.tar")
def to_file():
    with open(tarp, "wb") as f:
        layers.write_tar(d, f)
r["write_tar_file"] = best(to_file)
for fmt in ("gzip", "zstd"):
    p = os.path.join(out, "micro." + fmt)
    r["compress_" + fmt] = best(lambda: compress.compress_layer(d, p, fmt))
    r["compressed_" + fmt] = os.path.getsize(p)
def unpack():
    dest = os.path.join(out, "micro-unpack")
    shutil.rmtree(dest, ignore_errors=True)
    os.mkdir(dest)
    with layers.open_blob(os.path.join(out, "micro.gzip")) as b:
        layers.unpack(b, dest)
r["unpack_gzip"] = best(unpack)
def drain(open_):
    with open_() as b:
        while b.read(1 << 20):
            pass
import gzip
r["decompress_isal"] = best(lambda: drain(lambda: layers.open_blob(os.path.join(out, "micro.gzip"))))
r["decompress_zlib"] = best(lambda: drain(lambda: gzip.open(os.path.join(out, "micro.gzip"))))
r["decompress_zstd"] = best(lambda: drain(lambda: layers.open_blob(os.path.join(out, "micro.zstd"))))
shutil.rmtree(os.path.join(out, "micro-unpack"), ignore_errors=True)
for p in ("micro.tar", "micro.gzip", "micro.zstd"):
    os.unlink(os.path.join(out, p))
print(json.dumps(r))
"""


def report(r: dict[str, float]) -> str:
    def mbs(nbytes: float, secs: float) -> str:
        return f"{nbytes / secs / 1e6:,.0f} MB/s"

    def row(label: str, key: str, baseline: str) -> str:
        rb, bh = r[f"{key}.rbuild"], r[f"{key}.buildah"]
        return (
            f"| {label} | {rb:.2f} s | {bh:.2f} s | **{rb / bh:.2f}** | "
            f"{r[key + '.rbuild_cpu']:.2f} / {r[key + '.buildah_cpu']:.2f} | {baseline} |"
        )

    lines = [
        "| measurement (whole build, best of runs) | rbuild | buildah | rbuild / buildah | "
        "CPU s rbuild / buildah | machine baseline |",
        "|---|---|---|---|---|---|",
    ]
    lines.append(row("no-op `RUN true` (fixed cost)", "noop", ""))
    lines.append(
        row(
            "`RUN dd` writing a 1 GiB file",
            "run1g",
            f"`dd` alone {r['run1g.dd_alone']:.2f} s, `sha256sum` {r['run1g.sha256sum']:.2f} s",
        )
    )
    lines.append(row("`COPY` of 10,000 files (40 MB)", "copy10k", f"`cp -a` {r['copy10k.cp_a']:.2f} s"))
    lines.append(
        row(
            f"`FROM` a {r['base.tar_bytes'] / 1e6:.0f} MB gzip base (unpack)",
            "base",
            f"`sha256sum` {r['base.sha256sum']:.2f} s, `zstd -3` {r['base.zstd3']:.2f} s, "
            f"`cp -a` {r['base.cp_a']:.2f} s",
        )
    )
    lines.append(f"\nload average (1 min) at start / end: {r['loadavg.start']:.1f} / {r['loadavg.end']:.1f}")
    lines += ["", "| layer code, in process | 1 GiB file | 10,000 files | 200 MB base |", "|---|---|---|---|"]
    for k, label in (
        ("write_tar_hash", "write_tar, diff_id only"),
        ("write_tar_file", "write_tar to a file"),
        ("compress_gzip", "compress_layer gzip (ISA-L level 1)"),
        ("compress_zstd", "compress_layer zstd (level 3)"),
        ("decompress_isal", "open_blob gzip (ISA-L), read through"),
        ("decompress_zlib", "gzip.open (zlib), read through"),
        ("decompress_zstd", "open_blob zstd, read through"),
        ("unpack_gzip", "open_blob + unpack (gzip)"),
    ):
        cells = [mbs(r[f"{key}.tar_bytes"], r[f"{key}.{k}"]) for key in ("1g", "10k", "base")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        f"| baseline: `sha256sum` | {mbs(1 << 30, r['run1g.sha256sum'])} | | "
        f"{mbs(r['base.tar_bytes'], r['base.sha256sum'])} |"
    )
    lines.append(f"| baseline: `zstd -3 -T1` | | | {mbs(r['base.tar_bytes'], r['base.zstd3'])} |")
    lines.append(
        f"| baseline: `cp -a` | | {mbs(r['10k.tar_bytes'], r['copy10k.cp_a'])} | "
        f"{mbs(r['base.tar_bytes'], r['base.cp_a'])} |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--user", help="run as this user (when started as root)")
    ap.add_argument("--rbuild", default="/opt/rbuild/env/bin/rbuild")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base-mb", type=int, default=200)
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--render", metavar="JSON", help="only print the tables of an earlier run's --json")
    args = ap.parse_args()
    if args.render:
        render(args.render)
        return
    if os.getuid() == 0:
        if not args.user:
            raise SystemExit("started as root: say which unprivileged user runs the benchmark (--user)")
        pw = pwd.getpwnam(args.user)
        argv = [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            "--init-groups",
            "--",
            "/usr/bin/python3",
            os.path.abspath(__file__),
            *sys.argv[1:],
        ]
        argv = [a for a in argv if a != f"--user={args.user}"]
        if "--user" in argv:
            i = argv.index("--user")
            del argv[i : i + 2]
        res = subprocess.run(argv, check=False)
        raise SystemExit(res.returncode)
    b = Bench(args)
    try:
        b.run()
    finally:
        b.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(b.results, f, indent=1)
    print(report(b.results))


def render(path: str) -> None:
    with open(path) as f:
        print(report(json.load(f)))


if __name__ == "__main__":
    main()
