"""Every directory of examples/ (but ci/, checked by test_recipes.py, and bootable/, whose mkdisk.sh
test_kernel_patches.py runs) has a README and a run.sh, and the
run.sh runs to its end as the `rb` user: offline ones from busybox, the Debian ones from the session's
Debian layout (BASE=oci:...), as their READMEs say."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import Runner

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
OFFLINE = ["hello", "nonroot", "reproducible"]
DEBIAN = ["python-app", "c-cache-mount"]


def test_every_example_has_a_readme_and_a_script_and_a_test() -> None:
    others = ("ci", "bootable")  # tested by test_recipes.py and test_kernel_patches.py
    found = sorted(d for d in os.listdir(EXAMPLES) if d not in others and os.path.isdir(os.path.join(EXAMPLES, d)))
    assert found == sorted(OFFLINE + DEBIAN)
    for d in found:
        for f in ("README.md", "run.sh"):
            assert os.path.isfile(os.path.join(EXAMPLES, d, f)), f"examples/{d}/{f}"


def run_example(rb: Runner, name: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """A copy of the example (readable by rb) run with rb's rbuild and a fresh store; its output."""
    copy = os.path.join(rb.mkdir(), name)
    shutil.copytree(os.path.join(EXAMPLES, name), copy)
    rb.own(os.path.dirname(copy))
    res = rb.sh(
        f"sh {copy}/run.sh", env={"RBUILD": rb.bin, "RBUILD_ROOT": rb.fresh_root(), **(env or {})}, timeout=timeout
    )
    assert f"example {name}: ok" in res.stdout, res.stdout + res.stderr
    return res.stdout + res.stderr


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_example_runs(rb: Runner, name: str) -> None:
    run_example(rb, name)


def ca_bundle(rb: Runner) -> dict[str, str]:
    """This machine reaches PyPI through a proxy whose CA only the host trusts: the example's CA_BUNDLE."""
    found = [p for p in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt") if p and os.path.isfile(p)]
    if not found:
        return {}
    copy = os.path.join(rb.mkdir(), "ca-bundle.crt")
    shutil.copy(found[0], copy)
    rb.own(copy)
    return {"CA_BUNDLE": copy}


@pytest.mark.parametrize("name", DEBIAN)
def test_debian_example_runs(rb: Runner, debian_layout: str, name: str) -> None:
    run_example(rb, name, {"BASE": f"oci:{debian_layout}", **ca_bundle(rb)}, timeout=1200)
