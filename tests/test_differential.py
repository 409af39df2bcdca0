"""Differential tests: rbuild and buildah 1.28 build the same Containerfiles into the same images.

Each directory under tests/differential/ is a case: a Containerfile plus its context. `@BASE@` in the
Containerfile (and in the case's build flags) stands for the session's busybox image: `oci:PATH` for
rbuild, the same image imported into buildah's store for buildah (see Builds). An optional case.json
gives build flags ("args"), the image format ("format": "docker"), and what git cannot store in the
context: "modes" (path -> octal), "symlinks" (path -> target) and empty "dirs" (path -> octal mode); an
optional prepare.sh runs as the builder user in the context before the builds. An optional
Parent.containerfile is built first (same flags) as the image `@PARENT@` names (for ONBUILD).

Both builders run as the unprivileged test user: buildah as `buildah build --layers --isolation chroot`
with the overlay driver (native overlay in the user namespace: checked below) in its own store under the
session's directory. Both images are written out (OCI layout, or docker-archive for the docker format)
and compared with tests/ocitree.py: the compared config keys, and the merged file tree (path, type,
mode, uid, gid, size, content hash, link target, xattrs). Normalised away, each with its reason in
docs/differences.md: the empty stubs buildah's RUN leaves behind (BUILDAH_STUBS), buildah's version
label (BUILDER_LABELS), the order of Env, buildah's /bin/sh -c for CMD/ENTRYPOINT shell forms after
SHELL, the mount points buildah's RUN leaves at VOLUME paths, and the overlay xattrs buildah copies
into its layers (_buildah_config, _buildah_tree).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Runner
from ocitree import (
    CONFIG_KEYS,
    DOCKER_ONLY_KEYS,
    Entry,
    Image,
    compared_config,
    diff_configs,
    diff_trees,
    drop_empty_stubs,
    flatten,
    load,
)

CASES_DIR = Path(__file__).parent / "differential"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "Containerfile").is_file())

# buildah's RUN creates these as empty mount points (files for the bind-mounted /etc files, directories
# for the pseudo filesystems) and commits them; they are not content of the image
BUILDAH_STUBS = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev", "/proc", "/sys", "/run")
# buildah records its version as a label (rbuild adds none)
BUILDER_LABELS = ("io.buildah.version",)

# ("config" | "tree", case) -> reason: known rbuild bugs, each reported with a reproduction. Strict: an
# unexpected pass fails the suite, so the mark goes once the bug is fixed.
XFAIL: dict[tuple[str, str], str] = {}  # (kind, case) -> the rbuild bug it reproduces


# -------------------------------------------------------------------------------------------------------
# buildah as the test user


class Buildah:
    """buildah 1.28, rootless, chroot isolation, overlay driver, its own store under the session dir."""

    def __init__(self, rb: Runner, name: str) -> None:
        self.rb = rb
        self.dir = rb.mkdir(name)
        self.env = {
            "BUILDAH_ISOLATION": "chroot",
            "HOME": self._private("home"),
            "XDG_RUNTIME_DIR": self._private("xdg"),
            "TMPDIR": self._private("tmp"),
            "XDG_CONFIG_HOME": self._private("config"),
            "XDG_DATA_HOME": self._private("data"),
        }
        self.store = os.path.join(self.dir, "store")
        self.runroot = os.path.join(self.dir, "run")

    def _private(self, name: str) -> str:
        path = self.rb.mkdir(os.path.join(self.dir, name))
        os.chmod(path, 0o700)
        return path

    def run(self, *args: str, timeout: float = 300) -> str:
        argv = ["buildah", "--root", self.store, "--runroot", self.runroot, "--storage-driver", "overlay", *args]
        return self.rb.sh(shlex.join(argv), env=self.env, timeout=timeout).stdout

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.run("info")))

    def build(self, ctx: str, tag: str, *flags: str) -> str:
        out = self.run("build", "--layers", "--isolation", "chroot", "-q", "-t", tag, *flags, ctx)
        return out.strip().splitlines()[-1]

    def push(self, image: str, dest: str) -> None:
        self.run("push", "-q", image, dest)

    def import_layout(self, layout: str, name: str) -> str:
        """Put the image of an OCI layout (ref "latest") into the store as `name`:latest, digests kept."""
        archive = os.path.join(self.dir, name.rpartition("/")[2] + ".tar")
        self.rb.sh(
            shlex.join(["skopeo", "copy", "-q", f"oci:{layout}:latest", f"docker-archive:{archive}:{name}:latest"]),
            env=self.env,
        )
        self.run("pull", "-q", f"docker-archive:{archive}")
        return f"{name}:latest"

    def cleanup(self) -> None:
        # the store holds files owned by subordinate ids: remove it from inside buildah's user namespace
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.rb.sh(shlex.join(["buildah", "unshare", "rm", "-rf", self.store, self.runroot]), env=self.env)


# runtime dirs buildah's chroot runner falls back to (it drops XDG_RUNTIME_DIR): removed if we made them
def _fallback_dirs(uid: int) -> list[str]:
    return [
        f"/tmp/podman-run-{uid}",
        f"/tmp/containers-user-{uid}",
        f"/var/tmp/podman-run-{uid}",
        f"/var/tmp/containers-user-{uid}",
    ]


@contextlib.contextmanager
def buildah_session(rb: Runner, name: str) -> Iterator[Buildah]:
    """A Buildah for rb's user; removes its store and the fallback runtime dirs it made when done."""
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed (these tests need buildah 1.28)")
    existed = {d for d in _fallback_dirs(rb.uid) if os.path.lexists(d)}
    b = Buildah(rb, name)
    try:
        yield b
    finally:
        b.cleanup()
        for d in _fallback_dirs(rb.uid):
            if d not in existed and os.path.isdir(d) and not os.path.islink(d) and os.stat(d).st_uid == rb.uid:
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def buildah(rb: Runner) -> Iterator[Buildah]:
    with buildah_session(rb, "buildah-differential") as b:
        yield b


# -------------------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    name: str
    args: list[str]
    format: str


CASE_FILES = ("case.json", "prepare.sh")
PARENT = "Parent.containerfile"  # built first (same flags) and tagged parent_tag(case): @PARENT@


def case_tag(name: str) -> str:
    return f"localhost/diff-{name.replace('_', '-')}"


def parent_tag(name: str) -> str:
    return case_tag(name) + "-parent"


def load_case(name: str, base: str) -> Case:
    spec: dict[str, Any] = {}
    path = CASES_DIR / name / "case.json"
    if path.exists():
        spec = json.loads(path.read_text())
    args = [a.replace("@BASE@", base) for a in spec.get("args", [])]
    return Case(name, args, spec.get("format", "oci"))


def prepare_context(rb: Runner, name: str, bases: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A fresh copy of the case's directory owned by the test user, case.json applied, prepare.sh run.

    Returns the context and, for each builder of `bases` (builder -> what @BASE@ stands for), the path of
    its Containerfile: the rbuild one is the context's Containerfile, the others are written beside the
    context (they differ only in how FROM names the same base image).
    """
    src = CASES_DIR / name
    ctx = rb.mkdir(f"ctx-{name}-{len(os.listdir(rb.base))}")
    shutil.copytree(
        src,
        ctx,
        dirs_exist_ok=True,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if Path(d) == src and n in (*CASE_FILES, PARENT)],
    )
    files: dict[str, str] = {}
    for builder in bases:
        files[builder] = os.path.join(ctx, "Containerfile") if builder == "rbuild" else f"{ctx}.{builder}"
        if (src / PARENT).exists():
            files[f"{builder}-parent"] = f"{ctx}.{builder}-parent"
    for key, path in files.items():
        text = (src / (PARENT if key.endswith("-parent") else "Containerfile")).read_text()
        with open(path, "w") as f:
            f.write(text.replace("@BASE@", bases[key.removesuffix("-parent")]).replace("@PARENT@", parent_tag(name)))
    spec: dict[str, Any] = {}
    if (src / "case.json").exists():
        spec = json.loads((src / "case.json").read_text())
    for rel, target in spec.get("symlinks", {}).items():
        os.symlink(target, os.path.join(ctx, rel))
    for rel in spec.get("dirs", {}):
        os.makedirs(os.path.join(ctx, rel), exist_ok=True)
    rb.own(ctx)
    for rel, mode in {**spec.get("dirs", {}), **spec.get("modes", {})}.items():
        os.chmod(os.path.join(ctx, rel), int(mode, 8))
    if (src / "prepare.sh").exists():
        rb.sh((src / "prepare.sh").read_text(), cwd=ctx)
    return ctx, files


@dataclass
class Result:
    buildah: Image | None
    rbuild: Image | None
    error: str


class Builds:
    """Builds each case once with both builders (on first use) and keeps the two images.

    rbuild starts FROM oci:<busybox layout>. buildah gets the same image (same config and layer digests)
    imported into its store under a fixed name: its oci: transport names images after the layout's path
    and rejects paths that are not valid image names (a temporary directory ending in "_" is enough).
    """

    def __init__(self, rb: Runner, buildah: Buildah, busybox: str) -> None:
        self.rb, self.buildah = rb, buildah
        self.bases = {"rbuild": f"oci:{busybox}", "buildah": buildah.import_layout(busybox, "localhost/rbdiff-base")}
        self.out = rb.mkdir("diff-out")
        self.results: dict[str, Result] = {}

    def export_buildah(self, tag: str, fmt: str, dest: str) -> Image:
        if fmt == "docker":
            self.buildah.push(tag, f"docker-archive:{dest}.tar")
            return load(dest + ".tar")
        self.buildah.push(tag, f"oci:{dest}:latest")
        return load(dest, "latest")

    def build_buildah(self, name: str, tag: str, *extra: str) -> Image:
        case = load_case(name, self.bases["buildah"])
        ctx, files = prepare_context(self.rb, name, {"buildah": self.bases["buildah"]})
        self.buildah.build(ctx, tag, "-f", files["buildah"], "--format", case.format, *case.args, *extra)
        return self.export_buildah(tag, case.format, os.path.join(self.out, tag.rpartition("/")[2]))

    def get(self, name: str) -> Result:
        if name not in self.results:
            try:
                self.results[name] = self._build(name)
            except AssertionError as e:  # the buildah side failed: the case itself is broken
                self.results[name] = Result(None, None, str(e))
        return self.results[name]

    def _build(self, name: str) -> Result:
        tag = case_tag(name)
        ctx, files = prepare_context(self.rb, name, self.bases)
        case = {b: load_case(name, base) for b, base in self.bases.items()}
        fmt = case["rbuild"].format
        steps = [(parent_tag(name), "-parent")] if "rbuild-parent" in files else []
        for t, suffix in [*steps, (tag, "")]:
            self.buildah.build(ctx, t, "-f", files["buildah" + suffix], "--format", fmt, *case["buildah"].args)
        bimg = self.export_buildah(tag, fmt, os.path.join(self.out, f"{name}-buildah"))
        for t, suffix in [*steps, (tag, "")]:
            res = self.rb.run(
                "build",
                "-q",
                "-t",
                t,
                "-f",
                files["rbuild" + suffix],
                "--format",
                fmt,
                *case["rbuild"].args,
                ctx,
                check=False,
            )
            if res.returncode != 0:
                return Result(bimg, None, f"rbuild build of {t} failed ({res.returncode}):\n{res.stderr}")
        dest = os.path.join(self.out, f"{name}-rbuild")
        if fmt == "docker":
            res = self.rb.run("push", tag, f"docker-archive:{dest}.tar", check=False)
            load_path, ref = dest + ".tar", None
        else:
            res = self.rb.run("push", tag, f"oci:{dest}:latest", check=False)
            load_path, ref = dest, "latest"
        if res.returncode != 0:
            return Result(bimg, None, f"rbuild push failed ({res.returncode}):\n{res.stderr}")
        return Result(bimg, load(load_path, ref), "")


@pytest.fixture(scope="module")
def builds(rb: Runner, buildah: Buildah, busybox: str) -> Builds:
    return Builds(rb, buildah, busybox)


def _params(kind: str) -> list[Any]:
    return [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=XFAIL[kind, c])) if (kind, c) in XFAIL else c
        for c in CASES
    ]


def _config(image: Image, fmt: str) -> dict[str, Any]:
    keys = CONFIG_KEYS + (DOCKER_ONLY_KEYS if fmt == "docker" else ())
    cfg = compared_config(image, keys, drop_labels=BUILDER_LABELS)
    if "Env" in cfg:
        # buildah moves a variable that ENV sets again to the end of the list, docker keeps its place:
        # compare the variables, not their order (duplicates would still show)
        cfg["Env"] = sorted(cfg["Env"])
    return cfg


def _buildah_config(image: Image, fmt: str) -> dict[str, Any]:
    """buildah's config, normalised where it knowingly departs from docker (docs/differences.md)."""
    cfg = _config(image, fmt)
    shell = cfg.get("Shell")
    if shell and shell != ["/bin/sh", "-c"]:
        # buildah 1.28 writes the shell forms of CMD and ENTRYPOINT with /bin/sh -c whatever SHELL says;
        # docker (and rbuild) use SHELL for them as for RUN
        for key in ("Cmd", "Entrypoint"):
            v = cfg.get(key)
            if isinstance(v, list) and len(v) == 3 and v[:2] == ["/bin/sh", "-c"]:
                cfg[key] = [*shell, v[2]]
    return cfg


def _tree(image: Image) -> dict[str, Entry]:
    return drop_empty_stubs(flatten(image.layers), BUILDAH_STUBS)


# overlayfs's private xattrs: buildah 1.28 copies user.overlay.origin/impure from its upper dirs (native
# overlay in a user namespace keeps them in the user.* namespace) into its layers; they mean nothing
# outside that overlay mount. rbuild's layers must not have them: only buildah's tree drops them.
OVERLAY_XATTRS = ("user.overlay.", "trusted.overlay.")


def _buildah_tree(image: Image, other: dict[str, Entry]) -> dict[str, Entry]:
    """buildah's tree, normalised where it knowingly departs from docker/BuildKit (docs/differences.md)."""
    tree = {
        p: e._replace(xattrs=tuple(x for x in e.xattrs if not x[0].startswith(OVERLAY_XATTRS)))
        for p, e in _tree(image).items()
    }
    # buildah's RUN mounts an anonymous volume at each VOLUME path declared before it (docker's classic
    # builder does the same): the empty mount point directories, and parents made for them, stay in the
    # image. BuildKit and rbuild treat VOLUME as metadata only. Dropped when the other tree lacks them.
    for vol in image.runtime_config.get("Volumes") or {}:
        path = os.path.normpath("/" + vol.lstrip("/"))
        while (
            path != "/"
            and path not in other
            and path in tree
            and tree[path].type == "dir"
            and not any(p.startswith(path + "/") for p in tree)
        ):
            del tree[path]
            path = os.path.dirname(path)
    return tree


# -------------------------------------------------------------------------------------------------------
# the harness itself


def test_at_least_ten_cases() -> None:
    assert len(CASES) >= 10, CASES


def test_buildah_uses_native_overlay(buildah: Buildah) -> None:
    info = buildah.info()
    store = info["store"]
    assert store["GraphDriverName"] == "overlay"
    assert store["GraphStatus"]["Native Overlay Diff"] == "true"
    assert not any("mount_program" in o for o in store.get("GraphOptions") or []), store
    assert info["host"]["rootless"] is True


def test_buildah_against_itself(builds: Builds) -> None:
    """The comparison is stable: the same case built again from scratch compares equal (times differ)."""
    first = builds.get("run_files").buildah
    assert first is not None, builds.get("run_files").error
    again = builds.build_buildah("run_files", "localhost/diff-again", "--no-cache")
    assert first.layers != again.layers, "a rebuild should differ in its bytes (mtimes), else this proves little"
    assert diff_configs(_config(first, "oci"), _config(again, "oci")) == []
    tree = _tree(first)
    assert diff_trees(tree, _tree(again)) == []
    # and the tree holds what the comparison is meant to see
    assert tree["/t/c/hard2"] == tree["/t/a/file"] and tree["/t/a/file"].link == "=/t/a/file"
    # overlayfs copies up only the name written to: that name leaves the hardlink group (buildah and
    # docker on overlay alike; see docs/differences.md)
    assert tree["/t/a/hard"].link == "" and tree["/t/a/hard"].size == len("hello\nmore\n")
    assert tree["/t/c/fifo"].type == "fifo" and tree["/t/a/big"].mode == 0o4755
    assert "/etc/hosts" in flatten(first.layers) and "/etc/hosts" not in tree


# -------------------------------------------------------------------------------------------------------
# the cases


@pytest.mark.parametrize("name", _params("config"))
def test_same_config(builds: Builds, name: str) -> None:
    r = builds.get(name)
    assert r.buildah is not None and r.rbuild is not None, r.error
    fmt = load_case(name, "").format
    env = [e.partition("=")[0] for e in r.rbuild.runtime_config.get("Env") or []]
    assert len(env) == len(set(env)), f"rbuild's Env repeats a variable: {env}"
    diff = diff_configs(_buildah_config(r.buildah, fmt), _config(r.rbuild, fmt), ("buildah", "rbuild"))
    assert not diff, "\n".join(diff)


@pytest.mark.parametrize("name", _params("tree"))
def test_same_tree(builds: Builds, name: str) -> None:
    r = builds.get(name)
    assert r.buildah is not None and r.rbuild is not None, r.error
    theirs = _tree(r.rbuild)
    diff = diff_trees(_buildah_tree(r.buildah, theirs), theirs, ("buildah", "rbuild"))
    assert not diff, "\n".join(diff)


# -------------------------------------------------------------------------------------------------------
# ocitree on hand-made layers


def _layer(*entries: tuple[str, str] | tuple[str, str, str]) -> bytes:
    """("f"|"d"|"l"|"h"|"s", name[, data or link target]) -> an uncompressed tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, *rest in entries:
            arg = rest[0] if rest else ""
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755 if kind == "d" else 0o644
            data = None
            if kind == "d":
                ti.type = tarfile.DIRTYPE
            elif kind == "l":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
            elif kind == "h":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
            else:
                ti.size, data = len(arg), io.BytesIO(arg.encode())
            tf.addfile(ti, data)
    return buf.getvalue()


def test_ocitree_whiteouts_and_opaque() -> None:
    lower = _layer(
        ("d", "a"), ("f", "a/x", "1"), ("d", "a/sub"), ("f", "a/sub/y"), ("d", "b"), ("f", "b/z"), ("f", "c", "c")
    )
    upper = _layer(
        ("f", "a/.wh.sub"), ("d", "b"), ("f", "b/new"), ("f", "b/.wh..wh..opq"), ("f", ".wh.c"), ("f", "c", "again")
    )
    tree = flatten([lower, upper])
    assert sorted(tree) == ["/a", "/a/x", "/b", "/b/new", "/c"]
    assert tree["/c"].size == 5  # a whiteout hides the lower file, not the same layer's new one


def test_ocitree_type_changes_and_hardlinks() -> None:
    lower = _layer(("d", "d"), ("f", "d/in"), ("f", "f", "data"), ("h", "g", "f"), ("h", "h", "f"))
    upper = _layer(("l", "d", "/tmp"), ("f", "h", "new"))
    tree = flatten([lower, upper])
    assert sorted(tree) == ["/d", "/f", "/g", "/h"]
    assert tree["/d"] == Entry("symlink", 0o644, 0, 0, 0, "", "/tmp")
    assert tree["/f"].link == tree["/g"].link == "=/f" and tree["/f"].sha256 == tree["/g"].sha256
    assert tree["/h"].link == "" and tree["/h"].size == 3
    # the same link structure stored with the other name first compares equal
    other = flatten([_layer(("d", "d"), ("f", "d/in"), ("f", "g", "data"), ("h", "f", "g"), ("f", "h", "data")), upper])
    assert diff_trees(tree, other) == []
    # and a lost link does not
    broken = flatten([_layer(("d", "d"), ("f", "f", "data"), ("f", "g", "data"), ("f", "h", "x")), upper])
    assert diff_trees(tree, broken) != []


def test_ocitree_xattrs() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {"SCHILY.xattr.user.b": "2", "SCHILY.xattr.user.a": "1"}
        tf.addfile(ti, io.BytesIO(b""))
        tf.addfile(tarfile.TarInfo("g"), io.BytesIO(b""))
    tree = flatten([buf.getvalue(), _layer(("h", "h", "f"))])
    assert tree["/f"].xattrs == (("user.a", "1"), ("user.b", "2")) == tree["/h"].xattrs
    assert tree["/g"].xattrs == ()
    assert diff_trees({"/f": tree["/f"]}, {"/f": tree["/g"]}) != []


def test_ocitree_stubs_only_when_empty() -> None:
    tree = flatten(
        [
            _layer(
                ("d", "dev"),
                ("d", "run"),
                ("f", "run/x"),
                ("d", "etc"),
                ("f", "etc/hosts"),
                ("f", "etc/hostname", "name"),
            )
        ]
    )
    kept = drop_empty_stubs(tree, BUILDAH_STUBS)
    assert sorted(kept) == ["/etc", "/etc/hostname", "/run", "/run/x"]
