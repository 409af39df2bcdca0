#!/usr/bin/python3
"""Registry benchmark: rbuild against `skopeo copy`, over Debian's docker-registry on loopback.

    /opt/rbuild/venv/bin/python bench/registry_bench.py [--mb 200] [--runs 3] [--json out.json]

An image of --mb MB in eight gzip layers (random content, so sizes are real) is pushed once; then,
each as a fresh process, the two tools alternating, median of --runs:

  * pull: registry -> an empty directory. skopeo: `copy docker://... oci:DIR`; rbuild: resolve +
    fetch_blobs (verified, parallel) + the manifest and config written next to the blobs.
  * push: an OCI layout -> a registry that has none of the blobs (a fresh docker-registry per run).
    skopeo: `copy oci:DIR docker://...`; rbuild: Registry.push from the same layout's files.

Wall time is what counts; CPU time (user + system, the tool's process tree) is shown because it is
far less sensitive to other load on the machine. Prints a markdown table (docs/benchmarks.md "## Registry" quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from registry_helpers import SampleImage, docker_registry, make_image  # noqa: E402

PULL = """
import json, os, sys
from rootless.oci.reference import parse_reference
from rootless.registry.api import Registry, RegistryOptions
ref, dest = parse_reference(sys.argv[1]), sys.argv[2]
r = Registry(RegistryOptions())
img = r.resolve(ref)
r.fetch_blobs(ref, img.layers, dest)
for digest, data in ((img.manifest_digest, img.manifest), (img.config_descriptor.digest, img.config)):
    with open(os.path.join(dest, "sha256", digest.split(":")[1]), "wb") as f:
        f.write(data)
"""

PUSH = """
import json, os, sys
from rootless.oci.reference import parse_reference
from rootless.registry.api import Descriptor, Registry, RegistryOptions
layout, ref = sys.argv[1], parse_reference(sys.argv[2])
blob = lambda d: os.path.join(layout, "blobs", "sha256", d.split(":")[1])
index = json.load(open(os.path.join(layout, "index.json")))
manifest = open(blob(index["manifests"][0]["digest"]), "rb").read()
data = json.loads(manifest)
desc = lambda j: Descriptor(j["mediaType"], j["digest"], j["size"])
config = desc(data["config"])
layers = [(desc(j), lambda j=j: open(blob(j["digest"]), "rb")) for j in data["layers"]]
Registry(RegistryOptions()).push(ref, manifest, data["mediaType"], config, open(blob(config.digest), "rb").read(),
                                 layers)
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def interleaved(runs: int, tools: dict[str, Callable[[int], tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Median wall and CPU time per tool, the tools alternating run by run (the machine's load drifts)."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
    for i in range(runs):
        order = list(tools) if i % 2 == 0 else list(reversed(tools))
        for name in order:
            samples[name].append(tools[name](i))
    return {
        name: (statistics.median(w for w, _ in got), statistics.median(c for _, c in got))
        for name, got in samples.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    shares = [0.35, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02]
    work = tempfile.mkdtemp(prefix="rbuild-regbench-")
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(work, "cache")}  # no mount hints from earlier runs
    py = sys.executable
    try:
        img: SampleImage = make_image([int(args.mb * 1e6 * s) for s in shares], seed=1)
        total = sum(d.size for d in img.layers)
        layout = os.path.join(work, "layout")
        img.write_layout(layout)
        results: dict[str, tuple[float, float]] = {}
        with docker_registry() as src:
            ref = f"{src.host}/bench/img:1"
            subprocess.run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--dest-tls-verify=false",
                    f"oci:{layout}:latest",
                    f"docker://{ref}",
                ],
                check=True,
                capture_output=True,
            )

            def pull_skopeo(i: int) -> tuple[float, float]:
                dest = os.path.join(work, f"sk-pull-{i}")
                t = timed(
                    [
                        "skopeo",
                        "--insecure-policy",
                        "copy",
                        "--src-tls-verify=false",
                        f"docker://{ref}",
                        f"oci:{dest}:latest",
                    ]
                )
                shutil.rmtree(dest)
                return t

            def pull_rbuild(i: int) -> tuple[float, float]:
                dest = os.path.join(work, f"rb-pull-{i}")
                t = timed([py, "-c", PULL, ref, dest], env)
                shutil.rmtree(dest)
                return t

            pull_skopeo(-1)  # warm the registry's page cache for both
            results.update(
                {
                    f"pull_{k}": v
                    for k, v in interleaved(args.runs, {"skopeo": pull_skopeo, "rbuild": pull_rbuild}).items()
                }
            )

        def push_with(tool: str) -> Callable[[int], tuple[float, float]]:
            def run(i: int) -> tuple[float, float]:
                with docker_registry() as dst:
                    target = f"{dst.host}/bench/pushed:1"
                    if tool == "skopeo":
                        return timed(
                            [
                                "skopeo",
                                "--insecure-policy",
                                "copy",
                                "--dest-tls-verify=false",
                                f"oci:{layout}:latest",
                                f"docker://{target}",
                            ]
                        )
                    return timed([py, "-c", PUSH, layout, target], env)

            return run

        results.update(
            {
                f"push_{k}": v
                for k, v in interleaved(
                    args.runs, {"skopeo": push_with("skopeo"), "rbuild": push_with("rbuild")}
                ).items()
            }
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = total / 1e6
    print(
        f"Image: {mb:.0f} MB in {len(img.layers)} gzip layers; docker-registry 2.8 on loopback; "
        f"median of {args.runs}, the tools alternating; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f} at the end.\n"
    )
    print("| operation | skopeo copy | rbuild | rbuild / skopeo (wall) | CPU s: skopeo / rbuild |")
    print("|---|---|---|---|---|")
    for op in ("pull", "push"):
        (sk, sk_cpu), (rb, rb_cpu) = results[f"{op}_skopeo"], results[f"{op}_rbuild"]
        print(
            f"| {op} | {sk:.2f} s ({mb / sk:.0f} MB/s) | {rb:.2f} s ({mb / rb:.0f} MB/s) | {rb / sk:.2f} "
            f"| {sk_cpu:.2f} / {rb_cpu:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mb": mb, "runs": args.runs, **results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
