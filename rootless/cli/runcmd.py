"""`rbuild run`: a command in an image, in the sandbox a RUN step gets (rootless/sandbox/).

The image's layers get a fresh writable tree from the strategy's rootfs driver, thrown away when the
command ends: every run is `--rm` (rbuild keeps no containers; `--rm` is accepted for docker's command
lines). Entrypoint, Cmd, Env, WorkingDir and User come from the image's config, as docker applies them;
the exit status is the command's. `-t` gives it a terminal of the container's own /dev/pts (runinit sends
the master here over a socket), relayed to rbuild's terminal in raw mode, its size kept in step. Without
`-t`, a terminal of the caller is never handed to the command: its output reaches it through a pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rootless.errors import RbuildError

EXAMPLES = """examples:
  rbuild run docker.io/library/alpine:3.20 cat /etc/os-release     # pulled when not in the store
  rbuild run oci:./layout:1 ls /                                    # an OCI layout, imported first
  rbuild run -it -v "$PWD":/src:ro -w /src localhost/dev:1 sh
  rbuild run -e DEBUG=1 --user 1000:1000 myapp:1.0 --serve
"""


def add_parser(
    sub: Any, common: Callable[[argparse.ArgumentParser], None], registry: Callable[[argparse.ArgumentParser], None]
) -> None:
    """`rbuild run`; `registry`: adds the registry flags and --pull (an image not in the store is pulled)."""
    r = sub.add_parser(
        "run",
        help="run a command in an image (its changes are thrown away)",
        description="Run a command in a new container of IMAGE, in the sandbox RUN steps get. The container's "
        "writable layer is thrown away when the command ends (every run is --rm); the exit status is the "
        "command's (125: rbuild failed, 126: the command cannot run, 127: it is not found).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(r)
    r.add_argument("--rm", action="store_true", help="remove the container when it ends (always so)")
    r.add_argument("-i", "--interactive", action="store_true", help="pass standard input to the command")
    r.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    r.add_argument("--name", help="the container's host name (no container is kept under it)")
    r.add_argument(
        "-e", "--env", action="append", default=[], metavar="K[=V]", help="set (K alone: pass on) a variable"
    )
    r.add_argument(
        "-v", "--volume", action="append", default=[], metavar="SRC:DST[:ro]", help="bind a host path (repeatable)"
    )
    r.add_argument("-w", "--workdir", help="the working directory (made if missing, as docker does)")
    r.add_argument("-u", "--user", help="USER[:GROUP], names or ids (default: the image's USER)")
    r.add_argument("--entrypoint", help="replace the image's ENTRYPOINT (\"\": none); the image's CMD is dropped")
    registry(r)
    r.add_argument("image")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments (default: CMD)")
    r.set_defaults(func=cmd_run)


def _env(items: list[str], base: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in base:
        k, _, v = item.partition("=")
        env[k] = v
    for item in items:
        k, sep, v = item.partition("=")
        if not k:
            raise RbuildError(f"-e {item!r}: no variable name")
        if sep:
            env[k] = v
        elif k in os.environ:
            env[k] = os.environ[k]
    return env


def _volume(spec: str) -> tuple[str, str, bool]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise RbuildError(f"-v {spec!r}: want SRC:DST or SRC:DST:ro")
    src, dst = parts[0], parts[1]
    opt = parts[2] if len(parts) == 3 else "rw"
    if opt not in ("ro", "rw"):
        raise RbuildError(f"-v {spec!r}: unknown option {opt!r} (ro or rw)")
    if "/" not in src and not src.startswith("."):
        raise RbuildError(f"-v {spec!r}: named volumes are not supported; give a host path (./{src} or /...)")
    if not dst.startswith("/"):
        raise RbuildError(f"-v {spec!r}: the destination must be an absolute path")
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise RbuildError(f"-v {spec!r}: {src} does not exist")
    return src, dst, opt == "ro"


def _argv(config: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """docker's rule: ENTRYPOINT + (the command given, else CMD); --entrypoint drops the image's CMD."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if args.entrypoint is not None:
        entry = [args.entrypoint] if args.entrypoint else []
        return entry + cmd
    entry = list(config.get("Entrypoint") or [])
    return entry + (cmd or list(config.get("Cmd") or []))


def cmd_run(args: argparse.Namespace) -> int:
    from rootless.cli import main

    volumes = [_volume(v) for v in args.volume]
    env_items = list(args.env)

    def run(store: Any, idmap: Any) -> int:
        from rootless.env import strategy
        from rootless.sandbox import spec as sandbox

        rec = _image(args, store, idmap)
        image = store.read_json(rec.id)
        config = image.get("config") or {}
        argv = _argv(config, args)
        if not argv:
            raise RbuildError(f"{args.image}: no command given, and the image has neither ENTRYPOINT nor CMD")
        forced = getattr(args, "storage_driver", None) or os.environ.get("RBUILD_STORAGE_DRIVER") or None
        chosen = strategy.choose(idmap, store.root, forced, store.layer_format, store.last_rung(), rung)
        blocked = strategy.runs_possible(chosen)
        if blocked is not None:
            raise RbuildError(f"run needs a user namespace, and none can be made here: {blocked}")
        namespaces = chosen.isolation != "none-privileged"
        if (args.tty or volumes) and not namespaces:
            raise RbuildError("-t and -v need a mount namespace, and none can be made here")
        emulate = chosen.isolation == "userns-single"
        diff_ids = image.get("rootfs", {}).get("diff_ids", [])
        lowers = store.layer_dirs(diff_ids)
        with store.staging("run-") as tmp, store.mountpoints() as mnt:
            scratch, merged = os.path.join(tmp, "scratch"), os.path.join(mnt, "merged")
            os.mkdir(scratch, 0o700)
            os.mkdir(merged, 0o700)
            with chosen.rootfs.writable(lowers, tmp, merged) as root:
                user = sandbox.resolve_user(root.path, args.user or config.get("User") or "0")
                workdir = args.workdir or config.get("WorkingDir") or "/"
                if not workdir.startswith("/"):
                    raise RbuildError(f"--workdir {workdir}: must be an absolute path")
                _ensure_dir(root.path, workdir, user.uid, user.gid)
                env = _env(env_items, list(config.get("Env") or []))
                env.setdefault("PATH", sandbox.DEFAULT_PATH)
                env.setdefault("HOME", user.home or "/")
                env["HOSTNAME"] = args.name or sandbox.HOSTNAME
                if args.tty:
                    env.setdefault("TERM", "xterm")
                spec = sandbox.RunSpec(
                    argv,
                    env,
                    workdir,
                    user.uid,
                    user.gid,
                    user.groups,
                    hostname=args.name or sandbox.HOSTNAME,
                    mounts=[sandbox.MountSpec("bind", d, s, ro, is_file=not os.path.isdir(s)) for s, d, ro in volumes],
                    namespaces=namespaces,
                    emulate=emulate,
                    lowers=lowers if emulate else [],
                    upper=root.upper,
                )
                with _io(args, spec):
                    try:
                        return sandbox.run(root.path, spec, scratch)
                    except RbuildError as e:
                        raise _start_error(str(e), argv[0]) from None

    rung = main._probed_rung(args)  # as a build takes it, before the namespace
    return main._in_namespace(args, run)


def _image(args: argparse.Namespace, store: Any, idmap: Any) -> Any:
    """The image to run: the store's, else (or with --pull=always) pulled as `rbuild pull` does."""
    from rootless.cli import main
    from rootless.layer.ownership import Ownership
    from rootless.oci import names, transports

    policy = getattr(args, "pull", "missing")
    found = store.find(names.candidates(args.image))
    if found is not None and policy in ("missing", "never"):
        return found
    if found is None and policy == "never":
        raise RbuildError(f"{args.image}: image not known (and --pull=never)")
    source = transports.parse_transport(args.image)
    options = main._registry_options(args, [] if source.local else [source.rest])
    with source.open(store, options, main._reporter(args)) as src:
        names_ = [] if source.local else [src.name]
        return transports.import_image(store, src, names_, Ownership.for_mapping(idmap.single))


def _start_error(message: str, program: str) -> RbuildError:
    """The sandbox's words for a command that could not be started, as `run` says them (docker's statuses)."""
    if message.startswith("RUN: exec "):
        reason = message.partition(": ")[2].partition(": ")[2]
        code = 127 if "No such file" in reason else 126
        return RbuildError(f"cannot run {program}: {reason}", exit_code=code)
    return RbuildError(message.removeprefix("RUN: "))


def _ensure_dir(root: str, path: str, uid: int, gid: int) -> None:
    from rootless.build import copyfiles
    from rootless.kernel.fspath import secure_join

    if path != "/" and not os.path.isdir(secure_join(root, path)):
        copyfiles.ensure_dir(root, path, uid, gid)


# -------------------------------------------------------------------------------------------------- I/O


def _pump(src: int, dst: int, close_dst: bool) -> Any:
    """A thread copying one descriptor to another until end of file (or until a write fails)."""
    import threading

    def copy() -> None:
        try:
            while data := os.read(src, 65536):
                _write_all(dst, data)
        except OSError:
            pass
        finally:
            if close_dst:
                os.close(dst)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def _io(args: argparse.Namespace, spec: Any) -> Iterator[None]:
    """The command's descriptors: a terminal (-t), else rbuild's own, through pipes where they are terminals."""
    if args.tty:
        with _terminal(args, spec):
            yield
        return
    stack = contextlib.ExitStack()
    with stack:
        fds: list[int] = []
        outputs: list[tuple[int, int, Any]] = []
        if not args.interactive:
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, null)
            fds.append(null)
        elif os.isatty(0):
            r, w = os.pipe2(os.O_CLOEXEC)
            _pump(0, w, close_dst=True)  # left blocked in read when the command ends first
            stack.callback(os.close, r)
            fds.append(r)
        else:
            fds.append(0)
        for fd in (1, 2):
            if os.isatty(fd):
                r, w = os.pipe2(os.O_CLOEXEC)
                outputs.append((r, w, _pump(r, fd, close_dst=False)))
                fds.append(w)
            else:
                fds.append(fd)
        spec.stdio = (fds[0], fds[1], fds[2])
        try:
            yield
        finally:
            for r, w, thread in outputs:  # the command is gone: its pipes reach end of file once ours close
                os.close(w)
                thread.join()
                os.close(r)


@contextlib.contextmanager
def _terminal(args: argparse.Namespace, spec: Any) -> Iterator[None]:
    import signal
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    spec.stdio = (null, null, null)
    spec.terminal_socket = theirs.fileno()
    relay = _terminal_relay()(ours, stop_r, args.interactive)
    old_winch = signal.signal(signal.SIGWINCH, lambda signum, frame: relay.resize())
    saved = _raw(0) if args.interactive and os.isatty(0) else None
    relay.start()
    try:
        yield
    finally:
        theirs.close()
        os.write(stop_w, b"x")
        relay.join()
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        for fd in (stop_r, stop_w, null):
            os.close(fd)
        ours.close()


def _raw(fd: int) -> Any:
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    return saved


def _terminal_relay() -> Any:
    """The relay's class, made when a terminal is asked for (threading is not imported at every start)."""
    import select
    import threading

    class _TerminalRelay(threading.Thread):
        """Receives the terminal's master, then copies rbuild's input to it and its output to rbuild's output."""

        def __init__(self, sock: Any, stop: int, interactive: bool) -> None:
            super().__init__(daemon=True)
            self.sock, self.stop, self.interactive = sock, stop, interactive
            self.master = -1

        def resize(self) -> None:
            import fcntl
            import termios

            if self.master < 0:
                return
            for fd in (0, 1):
                if os.isatty(fd):
                    with contextlib.suppress(OSError):
                        size = fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))
                        fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
                    return

        def run(self) -> None:
            import socket

            ready, _, _ = select.select([self.sock, self.stop], [], [])
            if self.sock not in ready:
                return
            try:
                _, anc, _, _ = self.sock.recvmsg(1, socket.CMSG_SPACE(4))
            except OSError:
                return
            if not anc:
                return  # the sandbox ended before it made the terminal
            self.master = int.from_bytes(anc[0][2][:4], sys.byteorder)
            self.resize()
            try:
                self._copy()
            finally:
                os.close(self.master)
                self.master = -1

        def _copy(self) -> None:
            watched = [self.master, self.stop] + ([0] if self.interactive else [])
            stopping = False
            while True:
                ready, _, _ = select.select(watched, [], [], 0 if stopping else None)
                if self.stop in ready:
                    stopping = True  # the command is gone: copy what its terminal still holds, then end
                    watched = [self.master]
                    continue
                if not ready and stopping:
                    return
                if 0 in ready:
                    data = os.read(0, 65536)
                    if not data:
                        watched.remove(0)
                        _write_all(self.master, b"\x04")  # end of input: ^D, as docker -it passes it on
                    else:
                        with contextlib.suppress(OSError):
                            _write_all(self.master, data)
                if self.master in ready:
                    try:
                        data = os.read(self.master, 65536)
                    except OSError:  # EIO: every slave descriptor is closed
                        return
                    if not data:
                        return
                    _write_all(1, data)

    return _TerminalRelay
