#!/usr/bin/env python3
"""rbuild vs buildah: build every workload under bench/workloads with both, as the same unprivileged user.

    sudo /opt/rbuild/venv/bin/python bench/run.py [--quick] [--reps N] [--only CASES] [--docs]

Any world-readable python that has rbuild installed works (the rbuild script beside it is used, or
--rbuild PATH). As root it creates a user rbbNNNNN with a subuid range for the builds and removes it
at the end (or --user NAME takes an existing one); as an ordinary user it builds as that user (the
Debian base then has to be in the cache already: making it needs debootstrap, so root).
See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from workloads import Case, Generated, Scale, load_cases  # noqa: E402
from workloads.harness import images, physical, report  # noqa: E402
from workloads.harness.builders import Buildah, Builder, Rbuild, check_usable, find_rbuild, snapshot  # noqa: E402
from workloads.harness.proc import IS_ROOT, Sample, User, drop_user, take_user  # noqa: E402

DEFAULT_CACHE = os.environ.get(
    "RBUILD_BENCH_CACHE", "/var/cache/rbuild-bench" if IS_ROOT else os.path.expanduser("~/.cache/rbuild-bench")
)
FRESH = ("cold", "ci", "push")  # modes that build in a fresh store every repetition
BASE_ARG = {"busybox": "BUSYBOX", "bigdir": "BIGDIR", "debian": "DEBIAN"}
TOP = """# Benchmarks

Numbers for rbuild's claims, measured on this project's machine and reproducible with one command each.
Each section is owned by the engineer of its area and says how to reproduce its numbers.
The build comparison (rbuild against `buildah build --layers --isolation chroot`, rootless, overlay
driver, same unprivileged user, same base images from a loopback registry) comes from

    sudo /opt/rbuild/venv/bin/python bench/run.py --docs

(see bench/README.md; `--quick` is a one-repetition smoke run with small sizes). Each run also writes
JSON under bench/results/ so runs can be compared over time.

**Noise.** The machine has 2 cores and is shared: other engineers build and run tests on it while
benchmarks run. Every number is a median of alternating A/B runs and the load average is recorded
with it, but differences under ~10% between runs mean little. Trust the ratios more than the seconds.
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark rbuild against buildah (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition, no network cases")
    p.add_argument("--reps", type=int, help="repetitions per case (default 5; --quick: 1)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="case or workload names, comma-separated (repeatable); e.g. hello,copy10k-cold",
    )
    p.add_argument("--skip", action="append", default=[], help="case or workload names to leave out")
    p.add_argument("--no-network", action="store_true", help="leave out the cases that need the Debian mirror")
    p.add_argument("--tools", default="rbuild,buildah", help="builders to run (default rbuild,buildah)")
    p.add_argument("--user", help="existing unprivileged user to build as (default: a new one, removed after)")
    p.add_argument(
        "--rev",
        default="HEAD",
        help="benchmark rootless/ of this git revision (a snapshot run with this python; default "
        "HEAD), or 'installed' for the rbuild script as installed (an editable install runs the "
        "working tree, uncommitted edits included)",
    )
    p.add_argument("--rbuild", help="with --rev installed: the rbuild executable (default: the one beside this python)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"base images are kept here (default {DEFAULT_CACHE})")
    p.add_argument("--workdir", default="/var/tmp", help="where the run's temporary tree goes (default /var/tmp)")
    p.add_argument(
        "--out",
        help="JSON result file (default: bench/results/latest.json and a dated copy; "
        "--quick: rbuild-bench-quick.json in --workdir)",
    )
    p.add_argument("--docs", action="store_true", help="rewrite the builds section of docs/benchmarks.md")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after each case, one more rbuild build under cProfile; reports go to --profile-dir",
    )
    p.add_argument(
        "--profile-dir",
        default=str(BENCH / "results" / "profiles"),
        help="where --profile writes CASE.txt (default bench/results/profiles)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary tree (contexts, logs)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one build may take (default 1800)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--render",
        metavar="JSON",
        help="build nothing: print (and with --docs, write) the tables of an earlier run's JSON",
    )
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="build nothing: compare two runs' JSON")
    return p.parse_args(argv)


def _names(values: list[str]) -> set[str]:
    return {n.strip() for v in values for n in v.split(",") if n.strip()}


def select(cases: list[Case], args: argparse.Namespace) -> list[Case]:
    """--only / --skip by case or workload name; network cases out with --no-network or --quick."""
    only, skip = _names(args.only), _names(args.skip)
    known = {c.name for c in cases} | {c.workload for c in cases}
    unknown = (only | skip) - known
    if unknown:
        raise SystemExit(f"unknown case or workload: {', '.join(sorted(unknown))} (see --list)")
    out = []
    for c in cases:
        names = {c.name, c.workload}
        if only and not names & only:
            continue
        if names & skip:
            continue
        if c.spec.network and (args.no_network or (args.quick and not names & only)):
            continue
        out.append(c)
    return out


class Run:
    """One benchmark run: its user, temporary tree, registry, builders and results."""

    def __init__(
        self, args: argparse.Namespace, user: User, workdir: Path, builders: list[Builder], scale: Scale
    ) -> None:
        self.args = args
        self.user = user
        self.workdir = workdir
        self.builders = builders
        self.scale = scale
        self.reps = args.reps or (1 if args.quick else 5)
        self.commit = ""  # the rbuild revision under test, when a snapshot
        self.refs: dict[str, str] = {}
        self.addr = ""  # the run's loopback registry (host:port)
        self.pulls: dict[str, dict[str, list[float]]] = {}
        self.logs = workdir / "logs"
        self.logs.mkdir()
        os.chmod(self.logs, 0o777)

    def order(self, rep: int) -> list[Builder]:
        """A/B alternation: the first builder of even repetitions goes second in odd ones."""
        return self.builders if rep % 2 == 0 else list(reversed(self.builders))

    def _log(self, case: Case, b: Builder, what: str) -> str:
        path = self.logs / f"{case.name}.{b.name}.{what}.log"
        return str(path)

    def pull_bases(self, case: Case, b: Builder, store: Path, record: bool) -> str:
        """Pull the case's bases into a fresh store; returns an error or ''."""
        for base in case.bases:
            s = b.pull(store, self.refs[base], self._log(case, b, "pull"))
            if not s.ok:
                return f"pull {self.refs[base]}: {s.error}"
            if record:
                self.pulls.setdefault(base, {}).setdefault(b.name, []).append(s.wall_s)
        return ""

    def run_case(self, case: Case, ctx: Path, gen: Generated) -> dict[str, Any]:
        """All repetitions of one case with every builder; returns its JSON record."""
        build_args = {BASE_ARG[b]: self.refs[b] for b in case.bases} | gen.build_args
        tag = f"localhost/bench/{case.name}:latest"
        runs: dict[str, list[dict[str, Any]]] = {b.name: [] for b in self.builders}
        errors: dict[str, str] = {}
        warm: dict[str, dict[str, Any]] = {}
        stores: dict[str, Path] = {}
        mode = case.spec.mode
        fresh = mode in FRESH
        cache_ref = {b.name: f"{self.addr}/bench-cache/{case.name}-{b.name}:cache" for b in self.builders}
        if mode == "ci":  # one build fills the registry cache; its store is then thrown away
            for b in self.builders:
                store = b.new_store(self.workdir / "stores" / f"{case.name}-{b.name}-fill")
                err = self.pull_bases(case, b, store, record=False)
                if not err:
                    flags = b.cache_flags(cache_ref[b.name], export=True)
                    s = b.build(store, ctx, build_args, tag, self._log(case, b, "fill"), self.args.timeout, flags)
                    warm[b.name] = s.to_json()
                    err = "" if s.ok else f"cache-filling build: {s.error}"
                b.remove_store(store)
                if err:
                    errors[b.name] = err
                    log(f"  {b.name}: {err.splitlines()[-1] if err else ''}")
        elif not fresh:
            for b in self.builders:
                store = b.new_store(self.workdir / "stores" / f"{case.name}-{b.name}")
                stores[b.name] = store
                err = self.pull_bases(case, b, store, record=False)
                if not err:
                    s = b.build(store, ctx, build_args, tag, self._log(case, b, "warm"), self.args.timeout)
                    warm[b.name] = s.to_json()
                    err = "" if s.ok else f"warm-up build: {s.error}"
                if err:
                    errors[b.name] = err
                    log(f"  {b.name}: {err.splitlines()[-1] if err else ''}")
        for rep in range(self.reps):
            mutate(ctx, gen, mode, rep)
            for b in self.order(rep):
                if b.name in errors and mode != "cold":
                    continue
                if fresh:
                    store = b.new_store(self.workdir / "stores" / f"{case.name}-{b.name}-{rep}")
                    err = self.pull_bases(case, b, store, record=True)
                    if err:
                        errors[b.name] = err
                        runs[b.name].append({"returncode": -1, "error": err})
                        b.remove_store(store)
                        continue
                else:
                    store = stores[b.name]
                os.sync()
                flags = b.cache_flags(cache_ref[b.name], export=False) if mode == "ci" else []
                flags += case.spec.flags.get(b.name, [])
                s = b.build(store, ctx, build_args, tag, self._log(case, b, f"rep{rep}"), self.args.timeout, flags)
                if mode == "push" and s.ok:
                    dest = f"{self.addr}/bench-push/{case.name}-{b.name}:rep{rep}"
                    s = end_to_end(s, b.push(store, tag, dest, self._log(case, b, f"push{rep}")))
                runs[b.name].append(s.to_json())
                status = f"{s.wall_s:7.3f} s  pss {s.peak_pss_mib:6.0f} MiB" if s.ok else "FAILED"
                log(f"  rep {rep + 1}/{self.reps} {b.name:8s} {status}")
                if not s.ok:
                    errors.setdefault(b.name, s.error)
                if fresh:
                    b.remove_store(store)
        profile = ""
        rb_builder = next((b for b in self.builders if isinstance(b, Rbuild)), None)
        if self.args.profile and rb_builder and "rbuild" not in errors:
            profile = self.profile(case, ctx, gen, rb_builder, stores.get("rbuild"), build_args, tag)
        for b in self.builders:
            if b.name in stores:
                b.remove_store(stores[b.name])
        tools: dict[str, Any] = {}
        for b in self.builders:
            ok_runs = [r for r in runs[b.name] if "wall_s" in r]
            summary: dict[str, Any] = report.summarize(ok_runs) if ok_runs else {"n": len(runs[b.name]), "ok": False}
            if runs[b.name] and len(ok_runs) < len(runs[b.name]):
                summary["ok"] = False
            if not runs[b.name] and b.name in errors:
                summary["n"] = 1
            if b.name in errors:
                summary["error"] = errors[b.name]
            summary["runs"] = runs[b.name]
            if b.name in warm:
                summary["warm"] = warm[b.name]
            if profile and b.name == "rbuild":
                summary["profile"] = profile
            tools[b.name] = summary
        for name in report.TOOLS:
            tools.setdefault(name, {"n": 0, "ok": False, "runs": []})
        rb, ba = tools["rbuild"].get("median_s"), tools["buildah"].get("median_s")
        return {
            "name": case.name,
            "workload": case.workload,
            "mode": mode,
            "description": case.spec.description,
            "network": case.spec.network,
            "bases": list(case.bases),
            "primary": case.primary,
            "tools": tools,
            "ratio": round(rb / ba, 3) if rb and ba else None,
        }

    def profile(
        self, case: Case, ctx: Path, gen: Generated, b: Rbuild, store: Path | None, build_args: dict[str, str], tag: str
    ) -> str:
        """One more rbuild build in the case's state, under cProfile; returns the report's path."""
        if store is None:
            store = b.new_store(self.workdir / "stores" / f"{case.name}-rbuild-profile")
            if self.pull_bases(case, b, store, record=False):
                b.remove_store(store)
                return ""
        mutate(ctx, gen, case.spec.mode, self.reps)
        os.sync()
        sample, text = b.profile(store, ctx, build_args, tag, self._log(case, b, "profile"))
        if case.spec.mode in FRESH:
            b.remove_store(store)
        pdir = Path(self.args.profile_dir)
        pdir.mkdir(parents=True, exist_ok=True)
        path = pdir / f"{case.name}.txt"
        head = (
            f"rbuild {self.commit or 'as installed'}: {case.name} ({case.spec.description}) under cProfile, "
            f"{time.strftime('%Y-%m-%d %H:%M')}; exit {sample.returncode}\n"
        )
        path.write_text(head + text)
        log(f"  profile: {path}")
        return str(path)


def end_to_end(build: Sample, push: Sample) -> Sample:
    """A build and the push after it as one sample: times add, peaks are the larger one."""
    return Sample(
        wall_s=build.wall_s + push.wall_s,
        cpu_user_s=build.cpu_user_s + push.cpu_user_s,
        cpu_sys_s=build.cpu_sys_s + push.cpu_sys_s,
        peak_pss_mib=max(build.peak_pss_mib, push.peak_pss_mib),
        peak_rss_mib=max(build.peak_rss_mib, push.peak_rss_mib),
        maxrss_mib=max(build.maxrss_mib, push.maxrss_mib),
        returncode=push.returncode,
        error=push.error,
        samples=build.samples + push.samples,
        extra={"build_s": build.wall_s, "push_s": push.wall_s},
    )


def mutate(ctx: Path, gen: Generated, mode: str, rep: int) -> None:
    """The touch / change modes' edit before repetition rep (a no-op for the other modes)."""
    if mode == "touch":
        t = time.time() + rep + 1
        os.utime(ctx / (gen.mutate or ""), (t, t))
    elif mode == "change":
        path = ctx / (gen.mutate or "")
        data = bytearray(path.read_bytes())
        data[-1] = 0x80 + rep % 128  # the generated files end in ASCII text: always a new value
        path.write_bytes(bytes(data))


def prepare_bases(run: Run, cases: list[Case], cache: Path, addr: str) -> dict[str, Any]:
    """Make (or reuse) the needed base layouts and push them to the registry."""
    needed = sorted({b for c in cases for b in c.bases}, key=list(BASE_ARG).index)
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o755)
    info: dict[str, Any] = {}
    notes: list[str] = []
    for base in needed:
        t0 = time.monotonic()
        if base == "busybox":
            layout = images.busybox_image(cache)
        elif base == "bigdir":
            layout = images.bigdir_image(cache, run.scale)
        else:
            layout = images.debian_image(cache, notes)
        for n in notes:
            log(n)
        notes.clear()
        run.refs[base] = images.push(layout, addr, f"{base}:{'quick' if run.scale.quick else 'latest'}")
        size = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
        info[base] = {"ref": run.refs[base], "layout": str(layout), "compressed_mb": round(size / 1e6, 1)}
        log(f"base {base}: {run.refs[base]} ({size / 1e6:.1f} MB, {time.monotonic() - t0:.1f} s)")
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    all_cases = load_cases()
    if args.list:
        for c in all_cases:
            net = " (network)" if c.spec.network else ""
            print(f"{c.name:18s} {c.spec.mode:7s} {c.spec.description}{net}")
        return 0
    if args.compare:
        old, new = (json.loads(Path(p).read_text()) for p in args.compare)
        print(report.compare(old, new))
        return 0
    if args.render:
        section = report.markdown(json.loads(Path(args.render).read_text()))
        print(section)
        if args.docs:
            report.update_docs(REPO / "docs" / "benchmarks.md", section, TOP)
        return 0
    cases = select(all_cases, args)
    if not cases:
        raise SystemExit("no case selected")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not set(tools) <= set(report.TOOLS) or not tools:
        raise SystemExit(f"--tools takes {', '.join(report.TOOLS)}")
    for exe in ("skopeo", "docker-registry", "zstd", "gzip", "sha256sum", "setpriv", "/bin/busybox") + (
        ("buildah",) if "buildah" in tools else ()
    ):
        if not shutil.which(exe):
            raise SystemExit(
                f"{exe} is missing (Debian: apt-get install buildah skopeo docker-registry zstd "
                "busybox-static util-linux)"
            )
    if args.rev == "installed" or not (REPO / ".git").exists():
        rbuild_cmd = [find_rbuild(args.rbuild)] if "rbuild" in tools else []
    else:
        check_usable(sys.executable)
        cfg = os.path.join(sys.prefix, "pyvenv.cfg")
        check_usable(cfg if os.path.exists(cfg) else sys.executable)
        rbuild_cmd = [sys.executable, "-m", "rootless"]
    scale = Scale(quick=args.quick)
    started = datetime.datetime.now(datetime.UTC)
    user = take_user(args.user)
    workdir = Path(tempfile.mkdtemp(prefix="rbuild-bench-", dir=args.workdir))
    os.chmod(workdir, 0o755)
    log(
        f"{len(cases)} cases as user {user.name} (uid {user.uid}{', created for this run' if user.created else ''}); "
        f"temporary tree {workdir}"
    )
    result: dict[str, Any] = {}
    out_paths: list[Path] = []
    try:
        builders: list[Builder] = []
        commit = ""
        pythonpath = ""
        if "rbuild" in tools and rbuild_cmd[0] == sys.executable:
            commit = snapshot(REPO, args.rev, workdir / "src")
            pythonpath = str(workdir / "src")
            log(f"rbuild: {args.rev} = {commit}, snapshot in {pythonpath}, run with {sys.executable}")
        for t in tools:
            builders.append(Rbuild(user, workdir, rbuild_cmd, pythonpath) if t == "rbuild" else Buildah(user, workdir))
        run = Run(args, user, workdir, builders, scale)
        run.commit = commit
        cmdline = " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])])
        result = {
            "schema": 1,
            "date": started.isoformat(timespec="seconds"),
            "machine": report.machine_info(REPO, commit),
            "versions": {b.name: b.version() for b in builders},
            "config": {
                "reps": run.reps,
                "quick": args.quick,
                "user": user.name,
                "command": cmdline,
                "rbuild": " ".join(rbuild_cmd),
                "rev": args.rev if commit else "installed",
                "load_start": report.load_avg(),
            },
            "bases": {},
            "pulls": {},
            "cases": [],
        }
        if args.out:
            out_paths = [Path(args.out)]
        elif args.quick:
            out_paths = [Path(args.workdir) / "rbuild-bench-quick.json"]
        else:
            stamp = started.strftime("%Y%m%d-%H%M")
            out_paths = [
                BENCH / "results" / "latest.json",
                BENCH / "results" / f"{stamp}-{result['machine']['rbuild_commit'].replace('+', '-')}.json",
            ]
        with images.registry(workdir) as addr:
            run.addr = addr
            result["bases"] = prepare_bases(run, cases, Path(args.cache_dir), addr)
            generated: dict[str, tuple[Path, Generated]] = {}
            refs_done: dict[str, dict[str, Any] | None] = {}
            for i, case in enumerate(cases):
                log(f"[{i + 1}/{len(cases)}] {case.name}: {case.spec.description}")
                if case.workload not in generated:  # one context per workload, shared by its cases in order
                    for old in list(generated):
                        shutil.rmtree(generated.pop(old)[0].parent, ignore_errors=True)
                    wdir = workdir / "cases" / case.workload
                    ctx = wdir / "ctx"
                    gen = case.generate(ctx, wdir / "ref", scale)
                    for d in (workdir / "cases", wdir):
                        os.chmod(d, 0o755)
                    user.chown_tree(str(ctx))
                    generated[case.workload] = (ctx, gen)
                ctx, gen = generated[case.workload]
                if case.workload not in refs_done:
                    refs_done[case.workload] = None
                    if gen.data is not None:
                        refs_done[case.workload] = physical.measure(
                            gen.data, ctx.parent / "scratch", min(run.reps, 3), gen.write_bytes
                        )
                        shutil.rmtree(ctx.parent / "ref", ignore_errors=True)
                load0 = report.load_avg()
                try:
                    rec = run.run_case(case, ctx, gen)
                except Exception:  # one broken case must not lose the others
                    rec = {
                        "name": case.name,
                        "workload": case.workload,
                        "mode": case.spec.mode,
                        "description": case.spec.description,
                        "network": case.spec.network,
                        "bases": list(case.bases),
                        "primary": case.primary,
                        "ratio": None,
                        "tools": {
                            t: {"n": 1, "ok": False, "error": traceback.format_exc(limit=3)} for t in report.TOOLS
                        },
                    }
                    log(f"  harness error: {traceback.format_exc(limit=3)}")
                rec["data"] = refs_done[case.workload]
                rec["load"] = [load0, report.load_avg()]
                result["cases"].append(rec)
                ratio = f"ratio {rec['ratio']:.2f}" if rec.get("ratio") else "no ratio"
                log(
                    f"  {case.name}: rbuild {rec['tools']['rbuild'].get('median_s')} s, "
                    f"buildah {rec['tools']['buildah'].get('median_s')} s, {ratio}"
                )
                result["pulls"] = _pulls(run, result["bases"])
                result["config"]["load_end"] = report.load_avg()
                for p in out_paths:
                    report.write_json(p, result)
    finally:
        stores = sorted((workdir / "stores").glob("*")) if (workdir / "stores").exists() else []
        for b in locals().get("builders", []):
            for store in stores:
                b.remove_store(store)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        drop_user(user)
    section = report.markdown(result)
    print()
    print(section)
    if args.docs:
        report.update_docs(REPO / "docs" / "benchmarks.md", section, TOP)
        log("docs/benchmarks.md updated")
    for p in out_paths:
        log(f"results: {p}")
    failed = [
        c["name"]
        for c in result["cases"]
        if any(c["tools"][t].get("n") and not c["tools"][t].get("ok") for t in report.TOOLS)
    ]
    return 1 if failed else 0


def _pulls(run: Run, bases: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for base, per_tool in run.pulls.items():
        entry: dict[str, Any] = {"compressed_mb": bases.get(base, {}).get("compressed_mb", 0)}
        for tool, values in per_tool.items():
            entry[tool] = round(statistics.median(values), 4)
        out[base] = entry
    return out


if __name__ == "__main__":
    sys.exit(main())
