"""The differential cases on the FUSE rung: each case of tests/differential/ built with `--storage-driver fuse`
gives the image the kernel overlay driver gives.

tests/test_differential.py compares rbuild's overlay build of each case with buildah's; here the same case is
built twice more by rbuild, with the overlay driver and with the FUSE helper (csrc/), each in a fresh store and
with SOURCE_DATE_EPOCH set, so equal trees give equal image ids. The ids are compared; when they differ, both
images are written out and the message shows how their configs and trees differ. /dev/fuse is root-only on
this machine: the module opens it to users and puts its mode back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from conftest import Runner, fuse_open_to_users
from ocitree import CONFIG_KEYS, DOCKER_ONLY_KEYS, compared_config, diff_configs, diff_trees, flatten, load
from test_differential import CASES, CASES_DIR, PARENT, case_tag, load_case, parent_tag, prepare_context

SDE = "1700000000"


@pytest.fixture(scope="module")
def dev_fuse() -> Iterator[None]:
    """/dev/fuse open to the test users for this whole module."""
    with fuse_open_to_users():
        yield


def _build(rb: Runner, busybox: str, name: str, driver: str) -> tuple[str, str, str]:
    """The case built in a fresh store with `driver`: (image id, store root, image format)."""
    case = load_case(name, f"oci:{busybox}")
    ctx, files = prepare_context(rb, name, {"rbuild": f"oci:{busybox}"})
    root = rb.fresh_root()
    flags = ["--storage-driver", driver, "--format", case.format, *case.args]
    env = {"SOURCE_DATE_EPOCH": SDE}
    if (CASES_DIR / name / PARENT).exists():
        rb.build(ctx, "-t", parent_tag(name), "-f", files["rbuild-parent"], *flags, root=root, env=env)
    image = rb.build(ctx, "-t", case_tag(name), "-f", files["rbuild"], *flags, root=root, env=env)
    return image.splitlines()[-1], root, case.format


def _explain(rb: Runner, name: str, builds: dict[str, tuple[str, str, str]]) -> str:
    """How the two images differ: config keys and merged trees."""
    images = {}
    for driver, (_, root, fmt) in builds.items():
        dest = os.path.join(rb.mkdir(), "out")
        if fmt == "docker":
            rb.run("push", case_tag(name), f"docker-archive:{dest}.tar", root=root)
            images[driver] = load(dest + ".tar")
        else:
            rb.run("push", case_tag(name), f"oci:{dest}:latest", root=root)
            images[driver] = load(dest, "latest")
    keys = CONFIG_KEYS + (DOCKER_ONLY_KEYS if builds["overlay"][2] == "docker" else ())
    cfg = diff_configs(*(compared_config(images[d], keys) for d in ("overlay", "fuse")), ("overlay", "fuse"))
    tree = diff_trees(*(flatten(images[d].layers) for d in ("overlay", "fuse")), ("overlay", "fuse"))
    return "\n".join(cfg + tree) or "same config and tree, different ids (a timestamp or digest not clamped)"


@pytest.mark.parametrize("name", CASES)
def test_fuse_build_same_as_overlay(rb: Runner, busybox: str, dev_fuse: None, name: str) -> None:
    builds = {driver: _build(rb, busybox, name, driver) for driver in ("overlay", "fuse")}
    for driver, (_, root, _) in builds.items():
        with open(os.path.join(root, "store.json")) as f:
            assert json.load(f)["strategy"]["rootfs"] == driver, f"{driver} was asked for but not used"
    if builds["overlay"][0] != builds["fuse"][0]:
        pytest.fail(f"{name}: the FUSE build differs from the overlay build:\n{_explain(rb, name, builds)}")
