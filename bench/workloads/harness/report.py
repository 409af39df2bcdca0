"""Summaries of a run: medians and ratios, the JSON record, the Markdown tables of docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench/run.py: builds begin (generated; edit bench/workloads/harness/report.py) -->"
END = "<!-- bench/run.py: builds end -->"
TOOLS = ("rbuild", "buildah")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the successful runs of one tool on one case."""
    ok = [r for r in runs if r["returncode"] == 0]
    out: dict[str, Any] = {"n": len(runs), "ok": len(ok) == len(runs) and bool(runs)}
    if not ok:
        return out
    out["median_s"] = round(statistics.median(r["wall_s"] for r in ok), 4)
    out["min_s"] = round(min(r["wall_s"] for r in ok), 4)
    out["max_s"] = round(max(r["wall_s"] for r in ok), 4)
    out["cpu_s"] = round(statistics.median(r["cpu_user_s"] + r["cpu_sys_s"] for r in ok), 4)
    out["peak_pss_mib"] = round(max(r["peak_pss_mib"] for r in ok), 1)
    out["peak_rss_mib"] = round(max(r["peak_rss_mib"] for r in ok), 1)
    out["maxrss_mib"] = round(max(r["maxrss_mib"] for r in ok), 1)
    return out


def machine_info(repo: Path, commit: str = "") -> dict[str, Any]:
    """What the numbers were measured on (commit: the snapshot's; else the checkout's, +dirty)."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
        return res.stdout.strip()

    if not commit:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "rootless")
        commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_kib / 1048576, 1),
        "python": platform.python_version(),
        "os": _os_release(),
        "rbuild_commit": commit,
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def load_avg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# -------------------------------------------------------------------------------------------------------
# Markdown


def _s(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _mib(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def _tool_cell(t: dict[str, Any], key: str = "median_s") -> str:
    if not t.get("n"):
        return "not run"
    if key not in t:
        return "FAIL"
    return _s(t[key]) + ("" if t.get("ok") else " (some failed)")


def _ratio(case: dict[str, Any]) -> str:
    r = case.get("ratio")
    return "—" if r is None else f"**{r:.2f}**"


def _pct(ref: float | None, t: float | None) -> str:
    if not ref or not t:
        return "—"
    return f"{100 * ref / t:.0f}%"


def _load(case: dict[str, Any]) -> str:
    """The 1-minute load average at the case's start and end."""
    load = case.get("load") or []
    if len(load) == 2 and load[0] and load[1]:
        return f"{load[0][0]:.1f}–{load[1][0]:.1f}"
    return "—"


def markdown(result: dict[str, Any]) -> str:
    """The builds section: setup line, main table, physical table, pulls, network, failures."""
    m, cfg = result["machine"], result["config"]
    cases = result["cases"]
    lines = [
        f"Measured {result['date'][:16].replace('T', ' ')} UTC on {m['hostname']}: {m['cpu']}, {m['cores']} cores, "
        f"{m['mem_gib']} GiB, {m['os']}, kernel {m['kernel']}; rbuild {m['rbuild_commit']} "
        f"(python {m['python']}), {result['versions'].get('buildah', '')}. {cfg['reps']} repetitions, "
        f"alternating which builder goes first; medians. Load average {cfg.get('load_start')} at the start, "
        f"{cfg.get('load_end')} at the end. Command: `{cfg['command']}`.",
        "",
        "Ratio below 1: rbuild is faster. CPU: user+system of the whole tree. Peak memory: the whole process "
        "tree's PSS, sampled (see bench/README.md). Load: the 1-minute load average when the case started and "
        "ended (2 cores: above 2, other work competed).",
        "",
        "| case | what | rbuild s | buildah s | rbuild/buildah | rbuild CPU s | buildah CPU s "
        "| rbuild peak MiB | buildah peak MiB | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    offline = [c for c in cases if not c["network"]]
    network = [c for c in cases if c["network"]]
    for c in offline:
        rb, ba = c["tools"]["rbuild"], c["tools"]["buildah"]
        lines.append(
            f"| {c['name']} | {c['description']} | {_tool_cell(rb)} | {_tool_cell(ba)} | {_ratio(c)} "
            f"| {_s(rb.get('cpu_s'))} | {_s(ba.get('cpu_s'))} | {_mib(rb.get('peak_pss_mib'))} "
            f"| {_mib(ba.get('peak_pss_mib'))} | {_load(c)} |"
        )
    with_data = [c for c in cases if c.get("data")]
    if with_data:
        lines += [
            "",
            "Physical references on the same data (single-threaded: `cp -a` of the tree, busybox `dd` from "
            "/dev/urandom, and on a tar of the tree `openssl dgst -sha256`, `zstd -3`, `gzip -6`; best of 3, warm "
            "page cache) and rbuild's throughput as a fraction of each (reference s / build s): 100% would mean the "
            "whole build took as long as that one tool's pass over the data. *primary* is `cp -a` for COPY "
            "cases and `dd` for the RUN writing a file.",
            "",
            "| case | data | cp -a s | dd s | sha256 s | zstd -3 s | gzip -6 s | rbuild MB/s | rbuild vs primary "
            "| vs sha256 | vs zstd -3 | vs gzip -6 | buildah vs primary |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in with_data:
            d = c["data"]
            rb = c["tools"]["rbuild"].get("median_s")
            ba = c["tools"]["buildah"].get("median_s")
            primary = d.get(f"{c['primary']}_s") if c["primary"] else None
            mbs = f"{d['bytes'] / 1e6 / rb:.0f}" if rb else "—"
            lines.append(
                f"| {c['name']} | {d['bytes'] / 1e6:.1f} MB, {d['files']} files | {_s(d.get('cp_s'))} "
                f"| {_s(d.get('write_s'))} | {_s(d.get('sha256_s'))} | {_s(d.get('zstd3_s'))} "
                f"| {_s(d.get('gzip6_s'))} | {mbs} | {_pct(primary, rb)} | {_pct(d.get('sha256_s'), rb)} "
                f"| {_pct(d.get('zstd3_s'), rb)} | {_pct(d.get('gzip6_s'), rb)} | {_pct(primary, ba)} |"
            )
    pulls = result.get("pulls") or {}
    if pulls:
        lines += [
            "",
            "Base image pulls from the loopback registry into an empty store (the cold cases do this "
            "before the timed build):",
            "",
            "| base image | compressed MB | rbuild pull s | buildah pull s | rbuild/buildah |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for base, p in pulls.items():
            rb, ba = p.get("rbuild"), p.get("buildah")
            ratio = f"{rb / ba:.2f}" if rb and ba else "—"
            lines.append(f"| {base} | {p.get('compressed_mb', 0):.1f} | {_s(rb)} | {_s(ba)} | {ratio} |")
    if network:
        lines += [
            "",
            "Network-bound (the Debian mirror's speed dominates; not part of any claim):",
            "",
            "| case | what | rbuild s | buildah s | rbuild/buildah |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for c in network:
            rb, ba = c["tools"]["rbuild"], c["tools"]["buildah"]
            lines.append(f"| {c['name']} | {c['description']} | {_tool_cell(rb)} | {_tool_cell(ba)} | {_ratio(c)} |")
    fails = [
        (c["name"], tool, c["tools"][tool].get("error", ""))
        for c in cases
        for tool in TOOLS
        if c["tools"][tool].get("n") and not c["tools"][tool].get("ok")
    ]
    if fails:
        lines += ["", "Failures:", ""]
        for name, tool, err in fails:
            first = err.strip().splitlines()[-1] if err.strip() else "(no output)"
            lines.append(f"- {name}, {tool}: `{first[:300]}`")
    return "\n".join(lines) + "\n"


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Per-case medians of two runs side by side (new/old below 1: faster now)."""
    before = {c["name"]: c for c in old.get("cases", [])}
    lines = [
        f"Old: {old.get('date', '?')} rbuild {old.get('machine', {}).get('rbuild_commit', '?')}; "
        f"new: {new.get('date', '?')} rbuild {new.get('machine', {}).get('rbuild_commit', '?')}",
        "",
        "| case | tool | old s | new s | new/old | old peak MiB | new peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in new.get("cases", []):
        o = before.get(c["name"])
        if o is None:
            continue
        for tool in TOOLS:
            a, b = o["tools"].get(tool, {}), c["tools"].get(tool, {})
            ta, tb = a.get("median_s"), b.get("median_s")
            ratio = f"{tb / ta:.2f}" if ta and tb else "—"
            lines.append(
                f"| {c['name']} | {tool} | {_s(ta)} | {_s(tb)} | {ratio} | {_mib(a.get('peak_pss_mib'))} "
                f"| {_mib(b.get('peak_pss_mib'))} |"
            )
    return "\n".join(lines) + "\n"


def update_docs(doc: Path, section: str, top: str) -> None:
    """Replace the generated part of '## Builds (rbuild vs buildah)'; other sections are kept as they are."""
    block = f"{BEGIN}\n{section}{END}"
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, count=1, flags=re.S)
    elif "## Builds (rbuild vs buildah)" in text:
        text = text.replace("## Builds (rbuild vs buildah)\n", f"## Builds (rbuild vs buildah)\n\n{block}\n", 1)
    else:
        rest = text
        if rest.startswith("# "):  # an old top of the file: ours, replaced
            idx = rest.find("\n## ")
            rest = rest[idx + 1 :] if idx >= 0 else ""
        text = f"{top}\n## Builds (rbuild vs buildah)\n\n{block}\n" + ("\n" + rest if rest else "")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
