"""The strategy ladder (issue 11): the copy rung with the store on overlayfs, the store's layer format.

A container's root filesystem is an overlayfs: kernel overlay cannot use it as an upper dir, and it
refuses the 0:0 character device that marks a whiteout in overlay's layer format (overlayfs will not
create one, which would be a whiteout of its own). Such a store takes rbuild's xattr layer format
(`rootless.layer.format.XATTR`) when it is made and builds on the copy rung. The store is on a real
overlayfs mount (tests/envsim.py), the build runs as an unprivileged user; its image (flattened tree with
owners and modes, config) must equal the same user's build on a plain store.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import ocitree  # noqa: E402
from conftest import IS_ROOT, Runner  # noqa: E402
from envsim import EnvSim, EnvSpec  # noqa: E402

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="mounting an overlayfs for the store needs root")

# RUN chown, COPY --chown, a non-root USER's RUN, a whiteout of a base file, a symlink, an opaque directory
CONTAINERFILE = """FROM oci:{busybox}
RUN mkdir -p /data/sub /opq && echo x > /data/sub/f && echo y > /opq/old && chown -R 1000:1000 /data \\
    && ln -s /data/sub/f /link
COPY --chown=1000:1000 a.txt /home/app/a.txt
USER app
RUN echo hi > /home/app/b.txt && id -u > /home/app/uid
USER root
RUN rm -rf /opq && mkdir /opq && echo new > /opq/new && rm /home/app/a.txt && rm /etc/group
LABEL rung=copy
"""


def _image(user: Runner, run: Any, store: str, ctx: str, *extra: str) -> tuple[ocitree.Tree, dict[str, Any]]:
    """Build ctx into `store` and push it to a layout through `run` (argv, env) -> CompletedProcess."""
    env = user._env({"RBUILD_ROOT": store})
    res = run(["rbuild", "build", "-q", *extra, ctx], env)
    assert res.returncode == 0, res.stderr
    layout = os.path.join(user.mkdir(), "layout")
    res = run(["rbuild", "push", "-q", res.stdout.strip(), f"oci:{layout}"], env)
    assert res.returncode == 0, res.stderr
    img = ocitree.load(layout)
    return ocitree.flatten(img.layers), ocitree.compared_config(img)


def _plain(user: Runner, store: str, ctx: str) -> tuple[ocitree.Tree, dict[str, Any]]:
    def run(argv: list[str], env: dict[str, str]) -> Any:
        return user.run(*argv[1:], env=env, check=False)

    return _image(user, run, store, ctx)


@pytest.mark.parametrize("who", ["rb", "rb_single"])
def test_store_on_overlayfs_builds_the_baseline_image(who: str, request: pytest.FixtureRequest, busybox: str) -> None:
    user: Runner = request.getfixturevalue(who)
    ctx = user.context({"Containerfile": CONTAINERFILE.format(busybox=busybox), "a.txt": "a\n"})
    want = _plain(user, user.fresh_root(), ctx)
    with EnvSim(EnvSpec(store_on_overlay=True)) as env:
        env.own_overlay(user)
        store = os.path.join(env.overlay_dir, "store")

        def run(argv: list[str], e: dict[str, str]) -> Any:
            return env.run([user.bin, *argv[1:]], user=user, env=e)

        got = _image(user, run, store, ctx)
        meta = json.loads(env.run(["cat", f"{store}/store.json"], user=user).stdout)
    assert ocitree.diff_trees(want[0], got[0], ("plain store", "store on overlayfs")) == []
    assert got[1] == want[1]
    assert meta["layer_format"] == "rbuild-xattr"
    assert (meta["strategy"]["rootfs"], meta["strategy"]["layer_format"]) == ("copy", "rbuild-xattr")
