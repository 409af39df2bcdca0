"""--build-context NAME=DIR|docker-image://REF|oci-layout://PATH (issue 18): BuildKit's named contexts.

BuildKit's reference (docs of `docker buildx build --build-context`): "In Dockerfile the context can be
accessed when FROM name or --from=name is used. When Dockerfile defines a stage with the same name it is
overwritten." buildah 1.28 has the flag too: the differential test at the end compares the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conftest import Runner
from ocitree import diff_configs, diff_trees, flatten, load
from test_differential import Buildah, _buildah_config, _buildah_tree, _config, _tree, buildah_session


def image_tree(rb: Runner, tag: str) -> dict[str, object]:
    out = rb.mkdir()
    rb.run("push", tag, f"oci:{out}/l:latest")
    return dict(flatten(load(f"{out}/l", "latest").layers))


def one_error(rb: Runner, *argv: str) -> str:
    res = rb.run(*argv, check=False)
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.mark.parametrize("user", ["rb", "rb_single"])
def test_directory_context_for_copy_and_run_mount(request: pytest.FixtureRequest, user: str, busybox: str) -> None:
    runner: Runner = request.getfixturevalue(user)
    extra = runner.context({"f.txt": "from extra\n", "sub/g.txt": "gee\n"})
    ctx = runner.context(
        {
            "Containerfile": f"FROM oci:{busybox}\n"
            "COPY --from=extra f.txt /copied\n"
            "RUN --mount=from=extra,target=/m cat /m/sub/g.txt > /mounted\n"
            "COPY --from=extra sub /sub\n",
            "f.txt": "from the main context\n",
        }
    )
    tag = f"localhost/bctx-dir-{user}"
    runner.build(ctx, "-t", tag, "--build-context", f"extra={extra}")
    tree = image_tree(runner, tag)
    for path, size in (("/copied", 11), ("/mounted", 4), ("/sub/g.txt", 4)):
        e = tree[path]
        assert (e.type, e.size, e.uid, e.gid) == ("file", size, 0, 0), (path, e)  # type: ignore[attr-defined]
    assert "/m" not in tree
    # the context's content is in the cache key: a changed file is copied again
    runner.write(os.path.join(extra, "f.txt"), "changed!\n")
    runner.build(ctx, "-t", tag, "--build-context", f"extra={extra}")
    assert image_tree(runner, tag)["/copied"].size == 9  # type: ignore[attr-defined]


def test_image_contexts_replace_from_and_copy_from(rb: Runner, busybox: str) -> None:
    src = rb.context({"Containerfile": f"FROM oci:{busybox}\nRUN echo marker > /marker\n"})
    rb.build(src, "-t", "localhost/bctx-img")
    ctx = rb.context(
        {
            "Containerfile": "FROM base\n"
            "COPY --from=other /marker /copied-marker\n"
            "RUN --mount=from=other,target=/o cp /o/marker /mounted-marker\n"
        }
    )
    rb.build(
        ctx,
        "-t",
        "localhost/bctx-out",
        "--build-context",
        f"base=oci-layout://{busybox}:latest",
        "--build-context",
        "other=docker-image://localhost/bctx-img",
    )
    tree = image_tree(rb, "localhost/bctx-out")
    assert "/bin/busybox" in tree and "/marker" not in tree
    assert tree["/copied-marker"].size == 7 and tree["/mounted-marker"].size == 7  # type: ignore[attr-defined]


def test_context_overrides_a_stage_of_its_name(rb: Runner, busybox: str) -> None:
    """ "When Dockerfile defines a stage with the same name it is overwritten" (buildx build docs)."""
    extra = rb.context({"made": "by the context\n"})
    ctx = rb.context(
        {
            "Containerfile": f"FROM oci:{busybox} AS gen\nRUN echo by the stage > /made\n"
            f"FROM oci:{busybox}\nCOPY --from=gen made /made\n"
        }
    )
    rb.build(ctx, "-t", "localhost/bctx-stage")
    assert image_tree(rb, "localhost/bctx-stage")["/made"].size == 13  # type: ignore[attr-defined]
    rb.build(ctx, "-t", "localhost/bctx-stage", "--build-context", f"gen={extra}")
    assert image_tree(rb, "localhost/bctx-stage")["/made"].size == 15  # type: ignore[attr-defined]


def test_bad_build_contexts_are_one_error(rb: Runner, busybox: str) -> None:
    extra = rb.context({"f": "x"})
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n\nFROM extra\n"})
    line = one_error(rb, "build", "--build-context", f"extra={extra}", ctx)
    assert "Containerfile:3" in line and "directory" in line
    line = one_error(rb, "build", "--build-context", "extra=/nonexistent/dir", ctx)
    assert line == "Error: --build-context 'extra=/nonexistent/dir': /nonexistent/dir is not a directory"
    line = one_error(rb, "build", "--build-context", "noequals", ctx)
    assert "NAME=VALUE" in line
    line = one_error(rb, "build", "--build-context", "x=https://example.com/a.tar", ctx)
    assert "only a directory" in line


# ---------------------------------------------------------------------------------------------------------
# against buildah 1.28


@pytest.fixture(scope="module")
def buildah(rb: Runner) -> Iterator[Buildah]:
    with buildah_session(rb, "buildah-bctx") as b:
        yield b


def test_differential_named_contexts(rb: Runner, busybox: str, buildah: Buildah) -> None:
    """A directory for COPY --from and RUN --mount=from, an image for FROM and COPY --from: same image."""
    base = buildah.import_layout(busybox, "localhost/bctx-base")
    pulled = rb.run("pull", "-q", f"oci:{busybox}").stdout.split()[-1]
    rb.run("tag", pulled, base)
    extra = rb.context({"f.txt": "from extra\n", "sub/g.txt": "gee\n", "sub/h": "h\n"})
    os.chmod(os.path.join(extra, "sub/h"), 0o750)
    body = (
        "FROM img\n"
        "COPY --from=extra f.txt /copied\n"
        "COPY --from=extra sub /sub/\n"
        "RUN --mount=from=extra,target=/m cat /m/sub/g.txt > /mounted\n"
        "COPY --from=img /etc/passwd /passwd-copy\n"
    )
    ctx = rb.context({"Containerfile": body})
    flags = ["--build-context", f"extra={extra}", "--build-context", f"img=docker-image://{base}"]
    buildah.build(ctx, "localhost/bctx-diff", *flags)
    out = rb.mkdir()
    buildah.push("localhost/bctx-diff", f"oci:{out}/b:latest")
    bimg = load(f"{out}/b", "latest")
    rb.build(ctx, "-t", "localhost/bctx-diff", *flags)
    rb.run("push", "localhost/bctx-diff", f"oci:{out}/r:latest")
    rimg = load(f"{out}/r", "latest")
    assert diff_configs(_buildah_config(bimg, "oci"), _config(rimg, "oci")) == []
    rtree = _tree(rimg)
    assert diff_trees(_buildah_tree(bimg, rtree), rtree) == []
    assert "/copied" in rtree and "/sub/h" in rtree and "/mounted" in rtree
