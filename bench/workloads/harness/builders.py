"""The two builders, driven the same way: a store directory of their own, pull, build, remove the store."""

from __future__ import annotations

import io
import os
import pstats
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .proc import IS_ROOT, Sample, User, run, run_measured


def _world_usable(path: str) -> bool:
    """Other users can run it: the file readable and executable, every parent searchable."""
    p = os.path.realpath(path)
    if not os.stat(p).st_mode & stat.S_IROTH:
        return False
    while p != "/":
        p = os.path.dirname(p)
        if not os.stat(p).st_mode & stat.S_IXOTH:
            return False
    return True


def check_usable(path: str) -> None:
    """Builds run as another user: refuse an interpreter or script only root can read."""
    if IS_ROOT and not _world_usable(path):
        raise RuntimeError(
            f"{path} is not usable by other users (the builds run unprivileged): use a "
            "world-readable venv such as /opt/rbuild/venv or /opt/rbuild/env"
        )


def find_rbuild(explicit: str | None) -> str:
    """--rbuild, else $RBUILD_BIN, else the rbuild script next to this python, else rbuild on PATH."""
    cand = explicit or os.environ.get("RBUILD_BIN")
    if not cand:
        beside = os.path.join(os.path.dirname(sys.executable), "rbuild")
        cand = beside if os.path.exists(beside) else shutil.which("rbuild")
    if not cand or not os.path.exists(cand):
        raise RuntimeError(
            "rbuild not found: run bench/run.py with a python that has rbuild installed, or pass --rbuild PATH"
        )
    check_usable(cand)
    return os.path.abspath(cand)


class Builder:
    """One builder as the bench user; subclasses say how to pull and build."""

    name = ""

    def __init__(self, user: User, logdir: Path) -> None:
        self.user = user
        self.logdir = logdir

    def version(self) -> str:
        raise NotImplementedError

    def _argv_pull(self, store: Path, ref: str) -> list[str]:
        raise NotImplementedError

    def _argv_build(self, store: Path, ctx: Path, args: dict[str, str], tag: str) -> list[str]:
        raise NotImplementedError

    def _argv_push(self, store: Path, tag: str, dest: str) -> list[str]:
        raise NotImplementedError

    def cache_flags(self, ref: str, export: bool) -> list[str]:
        """The builder's registry-cache flags: import from ref, and with export also write to it."""
        return ["--cache-from", ref] + (["--cache-to", ref] if export else [])

    def _env(self, store: Path) -> dict[str, str]:
        return self.user.env()

    def new_store(self, path: Path) -> Path:
        """An empty store directory owned by the user."""
        if path.exists():
            self.remove_store(path)
        path.mkdir(parents=True)
        self.user.chown_tree(str(path))
        return path

    def pull(self, store: Path, ref: str, log: str) -> Sample:
        argv = self.user.prefix() + self._argv_pull(store, ref)
        return run_measured(argv, self._env(store), str(store), timeout=900, log=log)

    def build(
        self,
        store: Path,
        ctx: Path,
        args: dict[str, str],
        tag: str,
        log: str,
        timeout: float = 3600,
        extra: list[str] | None = None,
    ) -> Sample:
        """One timed build; extra flags go before the context argument."""
        argv = self._argv_build(store, ctx, args, tag)
        argv[-1:-1] = extra or []
        return run_measured(self.user.prefix() + argv, self._env(store), str(ctx), timeout=timeout, log=log)

    def push(self, store: Path, tag: str, dest: str, log: str, timeout: float = 3600) -> Sample:
        """One timed push of a built image to a registry reference."""
        argv = self.user.prefix() + self._argv_push(store, tag, dest)
        return run_measured(argv, self._env(store), str(store), timeout=timeout, log=log)

    def remove_store(self, path: Path) -> None:
        """Delete a store; its files belong to subuids, so a non-root harness removes it in the namespace."""
        if not path.exists():
            return
        if IS_ROOT:
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
        else:
            self._unshare_rm(path)
            shutil.rmtree(path, ignore_errors=True)

    def _unshare_rm(self, path: Path) -> None:
        raise NotImplementedError


def snapshot(repo: Path, rev: str, dest: Path) -> str:
    """Export rootless/ of a git revision to dest (world-readable); returns the short commit id."""
    commit = run(["git", "-C", str(repo), "rev-parse", "--short", f"{rev}^{{commit}}"]).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "rootless"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    # byte-compile now: the bench user cannot write __pycache__ here and would compile on every run
    run([sys.executable, "-m", "compileall", "-q", str(dest)])
    for dirpath, _, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return commit


class Rbuild(Builder):
    """rbuild: the installed script, or `python -m rootless` on a snapshot of a revision (PYTHONPATH)."""

    name = "rbuild"

    def __init__(self, user: User, logdir: Path, cmd: list[str], pythonpath: str = "") -> None:
        super().__init__(user, logdir)
        self.cmd = cmd
        self.pythonpath = pythonpath

    def version(self) -> str:
        res = run(self.cmd + ["--version"], env=self._env(self.logdir), check=False)
        return (res.stdout or res.stderr).strip()

    def _env(self, store: Path) -> dict[str, str]:
        extra = {"RBUILD_ROOT": str(store / "rbuild")}
        if os.environ.get("RBUILD_STORAGE_DRIVER"):  # the copy rung against overlay: the same cases per driver
            extra["RBUILD_STORAGE_DRIVER"] = os.environ["RBUILD_STORAGE_DRIVER"]
        if self.pythonpath:
            extra["PYTHONPATH"] = self.pythonpath
        return self.user.env(extra)

    def _argv_pull(self, store: Path, ref: str) -> list[str]:
        return self.cmd + ["pull", "-q", ref]

    def _argv_build(self, store: Path, ctx: Path, args: dict[str, str], tag: str) -> list[str]:
        return self.cmd + self._build_args(ctx, args, tag)

    def _argv_push(self, store: Path, tag: str, dest: str) -> list[str]:
        return self.cmd + ["push", "-q", tag, f"docker://{dest}"]

    @staticmethod
    def _build_args(ctx: Path, args: dict[str, str], tag: str) -> list[str]:
        argv = ["build", "-q", "-t", tag, "-f", str(ctx / "Containerfile")]
        for k, v in args.items():
            argv += ["--build-arg", f"{k}={v}"]
        return argv + [str(ctx)]

    def profile(self, store: Path, ctx: Path, args: dict[str, str], tag: str, log: str) -> tuple[Sample, str]:
        """One build under cProfile (profile_rbuild.py); returns the run and the merged report."""
        pdir = store / "profile"
        pdir.mkdir()
        self.user.chown_tree(str(pdir))
        wrapper = str(Path(__file__).with_name("profile_rbuild.py"))
        argv = self.user.prefix() + [sys.executable, wrapper, str(pdir / "p")] + self._build_args(ctx, args, tag)
        sample = run_measured(argv, self._env(store), str(ctx), timeout=3600, log=log)
        files = sorted(str(p) for p in pdir.glob("p.*"))
        if not files:
            return sample, "no profile written\n"
        buf = io.StringIO()
        stats = pstats.Stats(*files, stream=buf)
        stats.strip_dirs()
        buf.write(f"{len(files)} processes merged; wall {sample.wall_s:.3f} s (profiled, so slower)\n")
        buf.write("\n== by own time (tottime) ==\n")
        stats.sort_stats("tottime").print_stats(30)
        buf.write("\n== by cumulative time ==\n")
        stats.sort_stats("cumulative").print_stats(30)
        return sample, buf.getvalue()

    def _unshare_rm(self, path: Path) -> None:
        run(self.cmd + ["unshare", "rm", "-rf", str(path / "rbuild")], env=self._env(path), check=False)


class Buildah(Builder):
    """buildah build --layers --isolation chroot, rootless, overlay driver, its own --root/--runroot."""

    name = "buildah"

    def version(self) -> str:
        return run(["buildah", "--version"], check=False).stdout.strip()

    def _global(self, store: Path) -> list[str]:
        return [
            "buildah",
            "--root",
            str(store / "root"),
            "--runroot",
            str(store / "run"),
            "--storage-driver",
            "overlay",
        ]

    def _argv_pull(self, store: Path, ref: str) -> list[str]:
        return self._global(store) + ["pull", "-q", "--tls-verify=false", ref]

    def _argv_build(self, store: Path, ctx: Path, args: dict[str, str], tag: str) -> list[str]:
        # --pull=false: pull the base only if missing (the semantics of rbuild's default --pull=missing)
        argv = self._global(store) + [
            "build",
            "--layers",
            "--isolation",
            "chroot",
            "--tls-verify=false",
            "--pull=false",
            "-q",
            "-t",
            tag,
            "-f",
            str(ctx / "Containerfile"),
        ]
        for k, v in args.items():
            argv += ["--build-arg", f"{k}={v}"]
        return argv + [str(ctx)]

    def cache_flags(self, ref: str, export: bool) -> list[str]:
        """buildah names a cache by repository alone (it tags each step's image itself)."""
        return super().cache_flags(ref.rpartition(":")[0], export)

    def _argv_push(self, store: Path, tag: str, dest: str) -> list[str]:
        return self._global(store) + ["push", "-q", "--tls-verify=false", tag, f"docker://{dest}"]

    def _unshare_rm(self, path: Path) -> None:
        run(
            self._global(path) + ["unshare", "rm", "-rf", str(path / "root"), str(path / "run")],
            env=self._env(path),
            check=False,
        )
