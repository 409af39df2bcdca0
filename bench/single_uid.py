"""Single uid (issue 12): what the seccomp supervisor costs, against a user with a subuid range.

    sudo /opt/rbuild/env/bin/python bench/single_uid.py [--reps 3] [--files 50000]

Run as root: it makes two users as the tests do (tests/conftest.py: one with a subuid range, one
without), builds as each with the installed `rbuild` beside the python, and removes them. Each case is
one Containerfile built once (warm-up: the 50,000 files are made), then --reps times (the builders
taking turns) with a build
argument changed that only the timed step uses, so only that step and its commit run: the number
is the median wall time of that build.

Cases: `chown -R 1000:1000` of the files; `ls -ln` of them (a stat for each, nothing changed), also
where an earlier step chowned one file (so a lower layer holds a record and every stat is looked at);
`find / -xdev`; a tar of the files unpacked without owners; a shell
loop that starts 2,000 processes, an `echo`, and writing 200 MB (none of them makes a call the filter
hands over). `--baseline NAME=CMD`: the single-uid builds also with another rbuild (an older commit:
`PYTHONPATH=DIR python -P -m rootless`, in a script; without -P, run from a checkout, it imports the
checkout; or this one with `RBUILD_NOTIFY_HELPER=none`, the Python supervisor alone).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from conftest import _drop_subid_lines, _make_user, busybox_layer, write_oci_layout  # noqa: E402

CASES = {
    "chown -R": "RUN echo $REP && chown -R 1000:1000 /d",
    "ls -ln (stat each file)": "RUN echo $REP && ls -lnR /d > /dev/null",
    "find / -xdev (stat each file)": "RUN echo $REP && find / -xdev > /dev/null",
    "tar c | tar x, no owners": "RUN echo $REP && mkdir /u && tar -cf - -C /d . | tar -xof - -C /u && rm -r /u",
    "ls -ln, lowers hold records": "RUN echo $REP && ls -lnR /d > /dev/null",
    "2,000 processes": "RUN echo $REP && i=0; while [ $i -lt 2000 ]; do /bin/true; i=$((i+1)); done",
    "nothing (echo)": "RUN echo $REP",
    "write 200 MB": "RUN echo $REP && dd if=/dev/zero of=/w bs=1M count=200 2>/dev/null && rm /w",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--files", type=int, default=50000)
    ap.add_argument("--only", action="append", default=[], help="run only the cases whose name starts with this")
    ap.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="NAME=CMD: another rbuild (a command: an older commit, or RBUILD_NOTIFY_HELPER=none) to time "
        "single-uid builds with too; may be given more than once",
    )
    args = ap.parse_args()
    rbuild = os.path.join(os.path.dirname(sys.executable), "rbuild")
    top = tempfile.mkdtemp(prefix="rbsu-", dir="/var/tmp")
    os.chmod(top, 0o755)
    users = {}
    try:
        layout = os.path.join(top, "busybox")
        write_oci_layout(layout, [busybox_layer()])
        subprocess.run(["chmod", "-R", "a+rX", layout], check=True)
        for kind, ranged in (("subuid", True), ("single-uid", False)):
            name = f"rbsu{kind[:3]}{os.getpid() % 10000}"
            users[kind] = _make_user(name, ranged)
        rows = []
        builders = [(kind, pw, rbuild) for kind, pw in users.items()]
        for spec in args.baseline:
            name, _, cmd = spec.rpartition("=") if "=" in spec else ("baseline", "", spec)
            builders.append((name, users["single-uid"], cmd))
        for i, (case, step) in enumerate(CASES.items()):
            if args.only and not case.startswith(tuple(args.only)):
                continue
            runs = {}
            for kind, pw, cmd in builders:
                base = os.path.join(top, f"{kind}{i}")
                os.makedirs(base, exist_ok=True)
                ctx = os.path.join(base, "ctx")
                os.makedirs(ctx, exist_ok=True)
                setup = f"mkdir /d && cd /d && seq {args.files} | xargs touch"
                if "records" in case:
                    setup += " && chown 5:5 /d/1"
                with open(os.path.join(ctx, "Containerfile"), "w") as f:
                    f.write(f"FROM oci:{layout}\nRUN {setup}\nARG REP\n{step}\n")
                subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", base], check=True)
                env = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "RBUILD_ROOT": os.path.join(base, "store")}
                argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--", cmd]
                runs[kind] = (argv, env, ctx)
            samples: dict[str, list[float]] = {kind: [] for kind in runs}
            for rep in range(args.reps + 1):  # the builders take turns, so a change of load hits each alike
                for kind, (argv, env, ctx) in runs.items():
                    t0 = time.monotonic()
                    res = subprocess.run(
                        [*argv, "build", "-q", "--build-arg", f"REP={case}{rep}", ctx], env=env, capture_output=True
                    )
                    if res.returncode != 0 and kind in users:  # a baseline may not do it (chown)
                        raise SystemExit(f"{kind} {case}: {res.stderr.decode(errors='replace')}")
                    if rep and res.returncode == 0:  # the first build made the files: a warm-up
                        samples[kind].append(time.monotonic() - t0)
            times = {kind: statistics.median(v) if v else math.nan for kind, v in samples.items()}
            rows.append((case, times))
        others = [b[0] for b in builders if b[0] not in users]
        extra = "".join(f" | single-uid, {n} | {n} / subuid" for n in others)
        print(f"| RUN step (median of {args.reps} builds) | subuid | single-uid | single / subuid{extra} |")
        print("| --- | --- | --- | ---" + " | --- | ---" * len(others) + " |")
        for case, t in rows:
            line = f"| {case} | {t['subuid']:.2f} s | {t['single-uid']:.2f} s | {t['single-uid'] / t['subuid']:.2f}"
            for n in others:
                line += f" | {t[n]:.2f} s | {t[n] / t['subuid']:.2f}"
            print(line + " |")
        print(f"load average at the end: {os.getloadavg()}")
    finally:
        for pw in users.values():
            subprocess.run(["userdel", "-r", pw.pw_name], capture_output=True, check=False)
            _drop_subid_lines(pw.pw_name)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
