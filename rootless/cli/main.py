"""The `rbuild` command line: parses arguments, reports errors as one `Error:` line, dispatches.

Heavy modules are imported inside the command functions, so `rbuild images` or a fully cached
build does not pay for what it does not use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from rootless import __version__
from rootless.cli.flags import attached_flag
from rootless.errors import RbuildError
from rootless.kernel.fspath import inside
from rootless.layer.ownership import Ownership

if TYPE_CHECKING:
    from rootless.build.planner import Plan
    from rootless.build.regcache import CacheSpec
    from rootless.build.state import BuildOptions
    from rootless.env.probe import Probe
    from rootless.events import Reporter
    from rootless.idmap import IdMap
    from rootless.registry.api import RegistryOptions
    from rootless.store.store import ImageRecord, Store


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise RbuildError(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=argparse.SUPPRESS, help="store directory")
    p.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warn", "error"])
    p.add_argument(
        "--storage-driver",
        default=argparse.SUPPRESS,
        metavar="DRIVER",
        help="how a step gets its tree: overlay, fuse or copy (vfs: copy); default: RBUILD_STORAGE_DRIVER, "
        "else the best that works here",
    )
    p.add_argument(
        "--isolation",
        default=argparse.SUPPRESS,
        metavar="RUNG",
        help="how builds are isolated: userns (a subuid map), single (one uid), privileged (root of a container: "
        "no user namespace, real chown; chroot: the same), none (no RUN), host (real root), auto; "
        "default: RBUILD_ISOLATION, else the best that works here",
    )


def _progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        choices=["auto", "tty", "plain", "json", "quiet"],
        help="a live view (tty), step lines (plain), only warnings and failed RUN output (quiet), "
        "or one JSON object an event (json, docs/events.md); all on stderr. Default auto: tty on a terminal, "
        "else plain",
    )


BUILD_EXAMPLES = """examples:
  rbuild build -t myapp:1.0 .
  rbuild build -f Containerfile.dev --build-arg VERSION=2 --target test -t myapp:test ctx/
  rbuild build -t registry.example.com/team/app:1 --push .
  rbuild build --output type=local,dest=rootfs/ .         # the root filesystem as files
  rbuild build -o type=tar,dest=- . | tar -t               # ... as a tar on standard output
  rbuild build -t app:1 -o type=oci,dest=app.tar --metadata-file meta.json .
"""
PUSH_EXAMPLES = """examples:
  rbuild push registry.example.com/team/app:1
  rbuild push myapp:1.0 docker://127.0.0.1:5000/myapp:1.0 --tls-verify=false
  rbuild push myapp:1.0 oci-archive:myapp.tar:1.0
  rbuild push --format docker --compression-format gzip myapp:1.0 docker-archive:myapp.tar:myapp:1.0
"""
_GLOBAL_WITH_VALUE = ("--root", "--log-level", "--storage-driver", "--isolation")
_REGISTRY_COMMANDS = ("build", "bud", "push", "pull", "login", "logout", "run")
# every subcommand (and alias) -> the name build_parser makes its parser under
_COMMANDS = {
    name: name
    for name in (
        "build",
        "parse",
        "images",
        "inspect",
        "tag",
        "rmi",
        "push",
        "pull",
        "prune",
        "df",
        "check",
        "unshare",
        "doctor",
        "login",
        "logout",
        "run",
        "history",
        "save",
        "load",
        "completion",
    )
} | {"bud": "build"}


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in argv (so only its parser pays for the registry module's import)."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in _GLOBAL_WITH_VALUE:
            skip = True
        elif not a.startswith("-"):
            return a
    return None


def _registry_options(args: argparse.Namespace, creds_for: list[str]) -> RegistryOptions:
    """The registry flags; `--creds` goes only to the registries of `creds_for`, names the command line
    gave, so a Containerfile cannot send it to a host of its choosing."""
    from rootless.cli.registry import options_from_args

    options = options_from_args(args)
    options.creds_for = creds_for
    return options


def build_parser(command: str | None = None, subcommands: bool = True) -> argparse.ArgumentParser:
    """The argument parser. For a known `command` only that subcommand's parser is made (argparse's
    construction of all of them is a good part of a cached build's time), and registry flags only when it
    takes them; for None (help, completion, docs/reference.md) or an unknown word, every subcommand;
    without `subcommands`, none (`rbuild --version`)."""
    registry_flags = command is None or command in _REGISTRY_COMMANDS
    only = _COMMANDS.get(command or "")

    def wanted(*names: str) -> bool:
        return subcommands and (only is None or only in names)

    def _registry_args(p: argparse.ArgumentParser) -> None:
        if registry_flags:
            from rootless.cli.registry import add_registry_arguments

            add_registry_arguments(p)

    parser = _Parser(prog="rbuild", description="Rootless, daemonless OCI image builder")
    parser.add_argument("--version", action="version", version=f"rbuild version {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    if wanted("build"):
        b = sub.add_parser(
            "build",
            aliases=["bud"],
            help="build an image from a Containerfile",
            description="Build an image from the Containerfile (or Dockerfile) in CONTEXT, as an unprivileged user.",
            epilog=BUILD_EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(b)
        b.add_argument("context", nargs="?", default=".")
        b.add_argument("-f", "--file", help="Containerfile (default: Containerfile, then Dockerfile, in the context)")
        b.add_argument("-t", "--tag", action="append", default=[], help="name the image (repeatable)")
        b.add_argument("--build-arg", action="append", default=[], metavar="K[=V]")
        b.add_argument(
            "--build-arg-file", action="append", default=[], metavar="FILE", help="KEY=VALUE lines; # comments"
        )
        b.add_argument("--label", action="append", default=[], metavar="K=V")
        b.add_argument(
            "--build-context",
            action="append",
            default=[],
            metavar="NAME=DIR|docker-image://REF|oci-layout://PATH[:TAG]",
            help="a named context for FROM NAME, COPY --from=NAME and RUN --mount=from=NAME (repeatable)",
        )
        b.add_argument("--no-cache", action="store_true")
        b.add_argument(
            "--check",
            action="store_true",
            help="run BuildKit's build checks on the Containerfile and exit (1: findings)",
        )
        b.add_argument("--format", choices=["oci", "docker"], default="oci")
        b.add_argument("--iidfile")
        b.add_argument("-q", "--quiet", action="store_true", help="the same as --progress=quiet")
        _progress_arg(b)
        b.add_argument("--target", help="build up to this stage")
        b.add_argument(
            "--jobs",
            type=_jobs,
            default=0,
            metavar="N",
            help="build up to N independent stages at once (default: one per CPU; 1: one stage after the other)",
        )
        b.add_argument("--timestamp", type=int, help="set created times and every new layer entry's mtime to N")
        attached_flag(
            b,
            "--rewrite-timestamp",
            True,
            {"true": True, "false": False},
            True,
            "--rewrite-timestamp[=BOOL]: clamp new layer mtimes to SOURCE_DATE_EPOCH (default true)",
        )
        b.add_argument("--push", action="store_true", help="push every -t name to its registry after the build")
        b.add_argument(
            "--network",
            default="host",
            metavar="host|none",
            help="the network of RUN steps (default host: rbuild's own; none: loopback only); RUN --network overrides",
        )
        b.add_argument(
            "--secret",
            action="append",
            default=[],
            metavar="id=ID[,src=FILE|,env=VAR]",
            help="a secret for RUN --mount=type=secret (never stored in the image or the cache)",
        )
        b.add_argument(
            "--ssh",
            action="append",
            default=[],
            metavar="default|ID=SOCKET|ID=KEY[,KEY]",
            help="an ssh-agent for RUN --mount=type=ssh (default: $SSH_AUTH_SOCK; key files get an agent of their own)",
        )
        b.add_argument(
            "--cache-from",
            action="append",
            default=[],
            metavar="REF",
            help="read build steps from this registry cache (repeatable; type=registry,ref=REF accepted)",
        )
        b.add_argument(
            "--cache-to",
            action="append",
            default=[],
            metavar="REF",
            help="push this build's steps to a registry cache (type=registry,ref=REF,mode=max|min accepted)",
        )
        b.add_argument(
            "-o",
            "--output",
            action="append",
            default=[],
            metavar="type=TYPE,dest=PATH",
            help="also export the result: type=local,dest=DIR (the root filesystem as files), type=tar,dest=FILE|- "
            "(as one tar), type=oci,dest=FILE[,name=NAME] or type=docker,dest=FILE[,name=NAME] (the image as an "
            "archive); a bare DIR means type=local, - a tar on standard output",
        )
        b.add_argument(
            "--metadata-file",
            metavar="FILE",
            help="write BuildKit's metadata (containerimage.digest, containerimage.config.digest, image.name) as JSON",
        )
        _registry_args(b)
        if registry_flags:
            from rootless.cli.registry import add_pull_argument

            add_pull_argument(b)
        b.set_defaults(func=cmd_build)

    if wanted("parse"):
        p = sub.add_parser("parse", help="print the Containerfile's syntax tree (BuildKit's dump format)")
        _common(p)
        p.add_argument("-f", "--file")
        p.add_argument("context", nargs="?", default=".")
        p.set_defaults(func=cmd_parse)

    if wanted("images"):
        i = sub.add_parser("images", help="list images")
        _common(i)
        i.add_argument("--format", choices=["table", "json"], default="table")
        i.add_argument("-q", "--quiet", action="store_true")
        i.set_defaults(func=cmd_images)

    if wanted("inspect"):
        ins = sub.add_parser("inspect", help="show an image's details (docker's shape)")
        _common(ins)
        ins.add_argument("names", nargs="+")
        ins.set_defaults(func=cmd_inspect)

    if wanted("tag"):
        t = sub.add_parser("tag", help="add names to an image")
        _common(t)
        t.add_argument("image")
        t.add_argument("names", nargs="+")
        t.set_defaults(func=cmd_tag)

    if wanted("rmi"):
        r = sub.add_parser("rmi", help="remove image names or images")
        _common(r)
        r.add_argument("names", nargs="+")
        r.add_argument("-f", "--force", action="store_true")
        r.set_defaults(func=cmd_rmi)

    if wanted("push"):
        pu = sub.add_parser(
            "push",
            help="write an image to oci:, oci-archive:, docker-archive: or a registry",
            description="Write IMAGE to DEST: a registry (docker://HOST/REPO:TAG, the default), oci:DIR[:TAG], "
            "oci-archive:FILE[:TAG] or docker-archive:FILE[:NAME:TAG]. Without DEST, IMAGE names its registry.",
            epilog=PUSH_EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(pu)
        pu.add_argument("image")
        pu.add_argument("dest", nargs="?")
        pu.add_argument("--format", choices=["oci", "docker"])
        pu.add_argument("--compression-format", choices=["gzip", "zstd"])
        pu.add_argument("--compression-level", type=int)
        pu.add_argument("--digestfile")
        pu.add_argument("-q", "--quiet", action="store_true")
        _progress_arg(pu)
        _registry_args(pu)
        pu.set_defaults(func=cmd_push)

    if wanted("pull"):
        pl = sub.add_parser("pull", help="copy an image into the local store")
        _common(pl)
        pl.add_argument("image")
        pl.add_argument("-q", "--quiet", action="store_true")
        _progress_arg(pl)
        _registry_args(pl)
        pl.set_defaults(func=cmd_pull)

    if wanted("prune"):
        pr = sub.add_parser(
            "prune", help="remove what no named image needs: build cache, unused layers, unnamed images"
        )
        _common(pr)
        pr.set_defaults(func=cmd_prune)
    if wanted("df"):
        df = sub.add_parser("df", help="show the store's disk usage and limits")
        _common(df)
        df.set_defaults(func=cmd_df)
    if wanted("check"):
        ck = sub.add_parser("check", help="verify the store; --repair removes what is broken")
        _common(ck)
        ck.add_argument("--repair", action="store_true", help="remove what is broken, then check again")
        ck.set_defaults(func=cmd_check)

    if wanted("unshare"):
        u = sub.add_parser("unshare", help="run a command inside rbuild's user namespace")
        _common(u)
        u.add_argument("cmd", nargs=argparse.REMAINDER)
        u.set_defaults(func=cmd_unshare)

    if wanted("doctor"):
        dr = sub.add_parser("doctor", help="what this environment allows, the strategy rung a build uses, and fixes")
        _common(dr)
        dr.add_argument("--json", action="store_true", help="print rung, run_possible and checks as JSON")
        dr.set_defaults(func=cmd_doctor)

    if wanted("login", "logout"):
        li = sub.add_parser("login", help="log in to a registry")
        lo = sub.add_parser("logout", help="log out of a registry")
        _common(li)
        _common(lo)
        if registry_flags:
            from rootless.cli import registry

            registry.add_login_arguments(li)
            li.set_defaults(func=lambda a: _say(registry.login_command(a)))
            registry.add_logout_arguments(lo)
            lo.set_defaults(func=lambda a: _say(registry.logout_command(a)))
    if wanted("run"):
        from rootless.cli import runcmd

        def _pull_args(p: argparse.ArgumentParser) -> None:
            _registry_args(p)
            if registry_flags:
                from rootless.cli.registry import add_pull_argument

                add_pull_argument(p)

        runcmd.add_parser(sub, _common, _pull_args)
    if wanted("history", "save", "load"):
        from rootless.cli import imagecmds

        imagecmds.add_parsers(sub, _common)
    if wanted("completion"):
        from rootless.cli import completion

        completion.add_parser(sub, _common)
    return parser


# -------------------------------------------------------------------------------------------------------
# plumbing


def _reporter(args: argparse.Namespace) -> Reporter:
    """The reporter for this command's events (made once): --progress, or -q, or plain text."""
    made = getattr(args, "reporter", None)
    if made is None:
        from rootless.cli import report

        mode = getattr(args, "progress", None)
        quiet = getattr(args, "quiet", False)
        if quiet and mode not in (None, "quiet"):
            raise RbuildError(f"-q and --progress={mode} contradict each other")
        made = args.reporter = report.reporter(mode or ("quiet" if quiet else "auto"))
    return made


def _error(message: str) -> None:
    """The one `Error:` line of a failed command."""
    print(f"Error: {message}", file=sys.stderr)


def _say(line: str) -> int:
    """A command's one line of result on stdout; success."""
    print(line)
    return 0


def _store_and_map(args: argparse.Namespace, create: bool = True) -> tuple[Store, IdMap]:
    """The store and the id mapping; `create`: for a command that works in the user namespace, which
    also gets the runtime directory for its mount points (commands that only read need neither)."""
    from rootless.env import paths, userns
    from rootless.store.store import Store

    idmap, notice = userns.host_mapping()
    runtime = None
    root = paths.store_root(getattr(args, "root", None))
    if create:
        from rootless.events import Warn

        # both paths depend on who we are on the host: resolve them before entering the user namespace
        runtime, runtime_notice = paths.runtime_dir(root)
        for line in (notice, runtime_notice):
            if line:
                _reporter(args).emit(Warn(line))
    return Store(root, runtime=runtime), idmap


def _warn(args: argparse.Namespace) -> Callable[[str], None]:
    """A line that is shown even with -q (the environment degraded, a wait, a prune) as a Warn event."""
    from rootless.events import Warn

    reporter = _reporter(args)
    return lambda line: reporter.emit(Warn(line))


def _run_inside(args: argparse.Namespace, idmap: IdMap, fn: Callable[[IdMap], int]) -> int:
    """fn(mapping) in the user namespace (userns.run_inside), its failures as one `Error:` line."""
    from rootless.env import userns

    return userns.run_inside(idmap, lambda got: _guard(args, lambda: fn(got)), _error, _warn(args))


def _in_namespace(
    args: argparse.Namespace,
    fn: Callable[[Store, IdMap], int],
    limited: bool = False,
    made: tuple[Store, IdMap] | None = None,
) -> int:
    """Run fn(store, idmap) inside the user namespace, the store opened (and checked) there; `limited`: a
    build, under the user's limits (env/limits.py: a build slot, then pruning down to the store size);
    `made`: _store_and_map's answer, when the caller asked it already."""

    store, idmap = made or _store_and_map(args)
    parent = os.path.dirname(store.root)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise RbuildError(f"cannot create {parent}: {e.strerror}") from None

    def inner(got: IdMap) -> int:
        _open_inside(args, store, got)
        if not limited:
            with store.in_use():
                return fn(store, got)
        from rootless.env import limits

        lim = limits.load()
        warn = _warn(args)
        slots = (
            store.build_slot(
                lim.concurrent_builds,
                lambda: warn(
                    f"rbuild: waiting for one of the {lim.concurrent_builds} concurrent builds this user may run"
                ),
            )
            if lim.concurrent_builds
            else contextlib.nullcontext()
        )
        with slots:
            with store.in_use():
                status = fn(store, got)
            if lim.store_size is not None and store.usage() > lim.store_size:
                for line in store.prune(lim.store_size):
                    warn(f"rbuild: store over its limit of {lim.store_size} bytes: {line}")
                if store.usage() > lim.store_size:
                    warn(f"rbuild: store {store.root} is still over its limit: named images fill it (rbuild rmi)")
        return status

    return _run_inside(args, idmap, inner)


def _open_inside(args: argparse.Namespace, store: Store, idmap: IdMap, create: bool = True) -> None:
    """Open the store inside the user namespace; a store of an older format is converted first."""
    from rootless.store.store import STORE_VERSION

    store.open(idmap, create)
    if store.exists() and store.version != STORE_VERSION:
        from rootless.store import migrate

        _warn(args)(
            f"rbuild: converting the store {store.root} to format {STORE_VERSION} (layers are unpacked again, once)"
        )
        migrate.upgrade(store, Ownership.for_mapping(idmap.single))


def _open_readonly(args: argparse.Namespace) -> Store:
    """The store for commands that read or change only the image index (never layer contents), so they
    work on a store made under another id mapping too; a store of an older format is converted first."""
    from rootless.store.store import STORE_VERSION

    store, idmap = _store_and_map(args, create=False)
    if store.exists():
        store.check_format()
        if store.version != STORE_VERSION:  # converting needs the namespace (layer files of subordinate ids)

            def convert(got: IdMap) -> int:
                _open_inside(args, store, got, create=False)
                return 0

            if _run_inside(args, idmap, convert):
                raise RbuildError(f"the store {store.root} could not be converted to format {STORE_VERSION}")
            store.check_format()
    return store


def _find(store: Store, name: str) -> ImageRecord:
    from rootless.oci import names

    rec = store.find(names.candidates(name))
    if rec is None:
        raise RbuildError(f"{name}: image not known")
    return rec


# -------------------------------------------------------------------------------------------------------
# commands


def _parse_kv(items: list[str], what: str, env_fallback: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not k:
            raise RbuildError(f"invalid {what} {item!r}")
        if not sep:
            if not env_fallback:
                v = ""
            elif k in os.environ:
                v = os.environ[k]
            else:
                continue
        out[k] = v
    return out


def _jobs(text: str) -> int:
    """--jobs N: a whole number of stages, at least one."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of stages (1 or more)")
    return int(text)


def cmd_build(args: argparse.Namespace) -> int:
    from rootless.build import planner
    from rootless.oci import names

    context = os.path.abspath(args.context)
    if not os.path.isdir(context):
        raise RbuildError(f"build context {args.context} is not a directory")
    cf_path = planner.find_containerfile(context, args.file)
    data, shown = planner.read_containerfile(cf_path)
    shown = args.file or os.path.relpath(cf_path) if shown != "<stdin>" else shown
    if args.check:
        return _check_containerfile(data, shown)
    build_args = _read_build_arg_files(args.build_arg_file)
    build_args.update(_parse_kv(args.build_arg, "--build-arg", env_fallback=True))  # --build-arg wins, as buildah's
    labels = _parse_kv(args.label, "--label", env_fallback=False)
    for t in args.tag:
        if not names.valid(names.normalize(t)):
            raise RbuildError(f"invalid image name {t!r}")
        if args.push and names.normalize(t).startswith("localhost/"):
            raise RbuildError(f"--push: {t} names no registry (use HOST[:PORT]/REPO[:TAG])")
    if args.push and not args.tag:
        raise RbuildError("--push needs at least one -t HOST/REPO:TAG")
    from rootless.cli import output

    outputs = output.parse_all(args.output)
    outside = cf_path != "-" and not inside(cf_path, context)  # -f named a file out of the context
    contexts = dict(planner.parse_build_context(v) for v in args.build_context)
    # --platform (a registry flag: the platform FROM pulls) is also the target platform of the TARGET* ARGs
    platform = getattr(args, "platform", None)
    target_platform = planner.normalize_platform(platform, "--platform") if platform else None
    reporter = _reporter(args)
    plan = planner.plan(
        data,
        shown,
        context,
        build_args,
        args.target,
        reporter,
        private=outside,
        contexts=contexts,
        platform=target_platform,
    )
    sde: int | None = None
    raw_sde = build_args.get("SOURCE_DATE_EPOCH", os.environ.get("SOURCE_DATE_EPOCH"))
    if raw_sde:
        if not raw_sde.isdigit():
            raise RbuildError(f"SOURCE_DATE_EPOCH must be a number of seconds, not {raw_sde!r}")
        sde = int(raw_sde)
    pull = getattr(args, "pull", "missing")
    network = _network_mode(args.network)
    secrets = _read_secrets(args.secret)
    cache_from: list[CacheSpec] = []
    cache_to: list[CacheSpec] = []
    if args.cache_from or args.cache_to:  # the registry cache's module only when asked for
        from rootless.build.regcache import parse_spec

        cache_from = [parse_spec(v, "--cache-from") for v in args.cache_from]
        cache_to = [parse_spec(v, "--cache-to") for v in args.cache_to]
    remote_tags = [names.normalize(t) for t in args.tag if not names.normalize(t).startswith("localhost/")]
    remote_tags += [c.ref.removeprefix("docker://") for c in cache_from + cache_to]  # --creds go there too
    if getattr(args, "creds", None) and not remote_tags:
        raise RbuildError(
            "--creds goes only to the registries of -t names, and no -t names a registry; "
            "use rbuild login for the registries FROM names"
        )

    def options(registry_options: RegistryOptions | None) -> BuildOptions:
        from rootless.build.state import BuildOptions

        return BuildOptions(
            tags=args.tag,
            labels=labels,
            no_cache=args.no_cache,
            fmt=args.format,
            quiet=args.quiet or args.progress == "quiet",
            timestamp=args.timestamp,
            source_date_epoch=sde,
            rewrite_timestamp=args.rewrite_timestamp,
            pull=pull,
            registry_options=registry_options,
            containerfile=cf_path if args.file != "-" else None,
            secrets=secrets,
            debug=getattr(args, "log_level", None) == "debug",
            cache_from=cache_from,
            cache_to=cache_to,
            network=network,
            ssh=ssh,
            jobs=args.jobs,
        )

    def run(store: Store, idmap: IdMap) -> int:
        from rootless import api

        opts = options(_registry_options(args, remote_tags))
        try:
            image_id = api.run_build(plan, store, idmap, opts, reporter, getattr(args, "storage_driver", None), rung)
        except BaseException:
            failed = getattr(reporter, "failed", None)  # the live view shows the failing step's output
            if failed is not None:
                failed()
            raise
        return done(store, idmap, image_id, opts.registry_options)

    def done(store: Store, idmap: IdMap, image_id: str, registry_options: RegistryOptions | None) -> int:
        digest = None
        if args.push:
            from rootless.events import Notice
            from rootless.oci import transports

            rec = store.find([image_id])
            if rec is None:  # just built: only a concurrent rmi removes it
                raise RbuildError(f"{image_id}: image not known")
            for t in args.tag:
                digest = transports.RegistryTransport(names.normalize(t)).export(
                    store, rec, args.format, None, None, registry_options, reporter
                )
                reporter.emit(Notice(f"Pushed {names.normalize(t)} ({digest})"))
        written = output.write(store, image_id, outputs, Ownership.for_mapping(idmap.single), args.tag, reporter)
        if args.metadata_file:
            output.metadata(args.metadata_file, store, image_id, args.tag, digest or written.get("oci"))
        if args.iidfile:
            from rootless.kernel.fsutil import atomic_write

            atomic_write(os.path.abspath(args.iidfile), image_id.encode())
        print(image_id, file=sys.stderr if any(o.dest == "-" for o in outputs) else sys.stdout, flush=True)
        return 0

    rung, found = _probed(args)  # before the namespace: the probe's children are forked from here
    with contextlib.ExitStack() as stack:
        ssh = _ssh_agents(args.ssh, stack)
        made = _store_and_map(args)
        if not (args.push or outputs):  # both read layer files, which only the namespace may
            store, idmap = made
            image_id = _cached_build(args, store, idmap, plan, options(None), reporter, rung, found)
            if image_id is not None:
                return done(store, idmap, image_id, None)
        return int(_in_namespace(args, run, limited=True, made=made))


def _cached_build(
    args: argparse.Namespace,
    store: Store,
    idmap: IdMap,
    plan: Plan,
    opts: BuildOptions,
    reporter: Reporter,
    rung: int,
    found: Probe,
) -> str | None:
    """A build whose every step is cached, answered without the user namespace (build/cached.py) when
    everything the namespace's build does first would change nothing here: the store is current, made
    under this mapping, nothing to sweep, no per-user limits, the strategy decided without a trial mount
    and recorded already. The image id, or None: the build runs in the namespace."""
    from rootless.env import limits, strategy
    from rootless.store.store import STORE_VERSION

    forced = getattr(args, "storage_driver", None) or os.environ.get("RBUILD_STORAGE_DRIVER") or None
    if opts.no_cache or not (idmap.single or idmap.real_root or _check_ok(found, "id_mapping")):
        return None  # (newuidmap would fail here: the namespace's build says what then)
    try:
        if not store.exists():
            return None
        store.check_mapping(idmap)
        store.check_format()
        if store.version != STORE_VERSION or _leftovers(store):
            return None
        lim = limits.load()
        if lim.concurrent_builds or lim.store_size is not None:
            return None
        layer_format = store.layer_format
        if not strategy.settled(idmap, forced, layer_format, rung):
            return None
        chosen = strategy.choose(idmap, store.root, forced, layer_format, store.last_rung(), rung)
    except RbuildError:
        return None  # the namespace's build says it
    if strategy.runs_possible(chosen) is not None or not store.records(chosen.to_json()):
        return None
    from rootless.build import cached

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.in_use())
        except OSError:
            return None
        image_id: str | None = cached.build(plan, store, opts, chosen, reporter)
    return image_id


def _check_ok(found: Probe, name: str) -> bool:
    try:
        return bool(found.check(name).ok)
    except KeyError:
        return False


def _leftovers(store: Store) -> bool:
    """Whether opening the store in the namespace would sweep something (a killed process's staging or
    mount-point directory, temporary file or cut-off layer): then the build goes there."""
    from rootless.blob.digest import is_sha256_hex
    from rootless.store.store import TEMP_PREFIXES

    root = store.root
    try:
        if os.listdir(os.path.join(root, "tmp")):
            return True
        if store.runtime is not None and any(n.startswith("mnt-") for n in os.listdir(store.runtime_path())):
            return True
        for d in (root, os.path.join(root, "blobs"), store.blob_dir(), os.path.join(root, "cache")):
            if any(n.startswith(TEMP_PREFIXES) for n in os.listdir(d)):
                return True
        chains = set(os.listdir(os.path.join(root, "chains")))
    except OSError:
        return True
    return any(n.startswith(TEMP_PREFIXES) or (is_sha256_hex(n) and n + ".json" not in chains) for n in chains)


def _check_containerfile(data: bytes, shown: str) -> int:
    """build --check: BuildKit's build checks, one `FILE:LINE: Rule: message` line each; 1 if any."""
    from rootless.frontend import containerfile, instructions, lint

    cf = containerfile.parse(data, shown)
    for node in cf.nodes:  # an instruction BuildKit would refuse is an error, not a finding
        instructions.parse_instruction(node, shown)
    findings = lint.check(cf)
    for f in findings:
        print(f"{shown}:{f.line}: {f.rule}: {f.message}")
    print(
        f"{len(findings)} check{'s' if len(findings) != 1 else ''} failed" if findings else "no findings",
        file=sys.stderr,
    )
    return 1 if findings else 0


def _ssh_agents(specs: list[str], stack: contextlib.ExitStack) -> dict[str, str]:
    """--ssh default|ID[=SOCKET|=KEY[,KEY...]] (BuildKit's syntax): id -> an agent socket. Key files are
    loaded into an ssh-agent started for this build and ended with it (stack)."""
    if not specs:
        return {}
    import stat
    import subprocess
    import tempfile
    import time

    out: dict[str, str] = {}
    for spec in specs:
        sid, sep, value = spec.partition("=")
        if not sid:
            raise RbuildError(f"--ssh {spec!r}: no id")
        paths = [p for p in value.split(",") if p] if sep else []
        if not paths:
            sock = os.environ.get("SSH_AUTH_SOCK")
            if not sock:
                raise RbuildError(f"--ssh {spec}: SSH_AUTH_SOCK is not set (name a socket or key: --ssh {sid}=PATH)")
            paths = [sock]
        kinds = []
        for p in paths:
            try:
                kinds.append(stat.S_ISSOCK(os.stat(p).st_mode))
            except OSError as e:
                raise RbuildError(f"--ssh {spec}: {p}: {e.strerror}") from None
        if len(paths) == 1 and kinds[0]:
            out[sid] = os.path.abspath(paths[0])
            continue
        if any(kinds):
            raise RbuildError(f"--ssh {spec}: a socket cannot be listed with keys")
        home = stack.enter_context(tempfile.TemporaryDirectory(prefix="rbuild-ssh-"))
        sock = os.path.join(home, "agent")
        try:
            agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
        except OSError as e:
            raise RbuildError(f"--ssh {spec}: cannot start ssh-agent: {e.strerror}") from None
        stack.callback(agent.wait)
        stack.callback(agent.terminate)
        for _ in range(500):  # the agent makes its socket right after it starts
            if os.path.exists(sock) or agent.poll() is not None:
                break
            time.sleep(0.01)
        env = dict(os.environ, SSH_AUTH_SOCK=sock)
        res = subprocess.run(
            ["ssh-add", "-q", *paths], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or ["ssh-add failed"])[-1]
            raise RbuildError(f"--ssh {spec}: {why}")
        out[sid] = sock
    return out


def _read_build_arg_files(paths: list[str]) -> dict[str, str]:
    """--build-arg-file (buildah's): KEY=VALUE lines; blank lines and lines starting with # are skipped."""
    out: dict[str, str] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise RbuildError(f"--build-arg-file {path}: cannot read: {why}") from None
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise RbuildError(f"{path}:{n}: a build argument must be KEY=VALUE, not {line!r}")
            out[key.strip()] = value
    return out


def _network_mode(value: str) -> str:
    """--network: host (also `default`, BuildKit's word for it) or none; buildah's `private` needs a user-mode
    network stack (slirp4netns or pasta) rbuild does not have, so it is refused rather than giving no network."""
    if value in ("host", "default"):
        return "host"
    if value == "none":
        return "none"
    if value == "private":
        raise RbuildError(
            "--network=private: rbuild has no user-mode network stack (slirp4netns, pasta) to connect a private "
            "network namespace; use --network=none (loopback only) or --network=host"
        )
    raise RbuildError(f"--network={value}: unknown network mode (use host or none)")


def _probed_rung(args: argparse.Namespace) -> int:
    """The rung `rbuild doctor` reports for this store (api.probed_rung): builds take it."""
    return _probed(args)[0]


def _probed(args: argparse.Namespace) -> tuple[int, Probe]:
    """The rung `rbuild doctor` reports for this store (api.probed): builds take it; and the probe."""
    from rootless import api

    return api.probed(getattr(args, "root", None))


def _store_format(root: str) -> str | None:
    """The layer format of the store at root; None while it does not exist (or cannot be read: the
    command's own error, or doctor's storage check, says so)."""
    from rootless.store.store import Store

    store = Store(root)
    try:
        return store.layer_format.name if store.exists() else None
    except RbuildError:
        return None


def _read_secrets(specs: list[str]) -> dict[str, bytes]:
    """--secret id=ID[,src=FILE|,env=VAR] (docker's syntax; type=file|env also accepted), read up front."""
    out: dict[str, bytes] = {}
    for spec in specs:
        fields = dict(f.partition("=")[::2] for f in spec.split(","))
        sid = fields.get("id", "")
        src = fields.get("src") or fields.get("source")
        env = fields.get("env")
        if fields.get("type") == "env" and not env:
            env = src or sid
            src = None
        if not sid:
            sid = os.path.basename(src) if src else (env or "")
        if not sid:
            raise RbuildError(f"--secret {spec!r}: no id")
        if src:
            try:
                with open(os.path.expanduser(src), "rb") as f:
                    out[sid] = f.read()
            except OSError as e:
                raise RbuildError(f"--secret id={sid}: cannot read {src}: {e.strerror}") from None
        else:
            name = env or sid
            if name not in os.environ:
                raise RbuildError(f"--secret id={sid}: environment variable {name} is not set")
            out[sid] = os.environ[name].encode()
    return out


def cmd_parse(args: argparse.Namespace) -> int:
    from rootless.build import planner
    from rootless.frontend import containerfile

    path = planner.find_containerfile(os.path.abspath(args.context), args.file)
    data, shown = planner.read_containerfile(path)
    try:
        cf = containerfile.parse(data, shown if args.file == "-" else (args.file or shown))
    except RbuildError as e:
        e.exit_code = 1
        raise
    for w in cf.warnings:
        print(w, file=sys.stderr)
    sys.stdout.write(containerfile.dump(cf))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from rootless.store.store import chain_ids

    store = _open_readonly(args)
    records = store.images() if store.exists() else []
    rows = []
    for r in records:
        size = 0
        try:
            config = store.read_json(r.id)
            for c in chain_ids(config.get("rootfs", {}).get("diff_ids", [])):
                size += store.layer_meta(c).get("size", 0)
        except RbuildError:
            pass
        rows.append((r, size))
    if args.quiet:
        for r, _ in rows:
            print(r.id[7:19])
        return 0
    if args.format == "json":
        out = [
            {"Id": r.id, "Names": r.names, "Created": r.created, "Size": size, "Digest": r.digest or r.manifest}
            for r, size in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'REPOSITORY':<40} {'TAG':<15} {'IMAGE ID':<14} {'CREATED':<22} SIZE")
    for r, size in rows:
        for name in r.names or ["<none>:<none>"]:
            repo, _, tag = name.rpartition(":")
            print(f"{repo:<40} {tag:<15} {r.id[7:19]:<14} {r.created[:19]:<22} {_human(size)}")
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"


def cmd_inspect(args: argparse.Namespace) -> int:
    from rootless.oci import image as img
    from rootless.store.store import chain_ids

    store = _open_readonly(args)
    out = []
    for name in args.names:
        rec = _find(store, name) if store.exists() else None
        if rec is None:
            raise RbuildError(f"{name}: image not known")
        config = store.read_json(rec.id)
        size = sum(store.layer_meta(c).get("size", 0) for c in chain_ids(config.get("rootfs", {}).get("diff_ids", [])))
        repo_digests = [n.rpartition(":")[0] + "@" + rec.digest for n in rec.names] if rec.digest else []
        out.append(img.inspect_doc(rec.id, rec.names, config, rec.digest or rec.manifest, size, repo_digests))
    print(json.dumps(out, indent=4))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from rootless.oci import names

    store = _open_readonly(args)
    if not store.exists():
        raise RbuildError(f"{args.image}: image not known")
    rec = _find(store, args.image)
    for n in args.names:
        full = names.normalize(n)
        if not names.valid(full):
            raise RbuildError(f"invalid image name {n!r}")
        store.tag(rec.id, full, rec.manifest)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    """Remove names (or whole images), then the layers and blobs no image needs any more."""
    from rootless.oci import names

    store, idmap = _store_and_map(args, create=False)
    if not store.exists():
        raise RbuildError(f"{args.names[0]}: image not known")
    store.check_mapping(idmap)  # freeing layers needs the mapping they were written under: refuse up front
    status = 0
    deleted = False
    for n in args.names:
        rec = store.find(names.candidates(n))
        if rec is None:
            print(f"Error: {n}: image not known", file=sys.stderr)
            status = 125
            continue
        full = next((c for c in names.candidates(n) if c in rec.names), None)
        if full is not None and len(rec.names) > 1 and not args.force:
            store.untag(rec.id, full)
            print(f"Untagged: {full}")
        else:
            store.untag(rec.id, None)
            for name in rec.names:
                print(f"Untagged: {name}")
            print(f"Deleted: {rec.id}")
            deleted = True
    if deleted:  # layer files belong to subordinate ids: only the user namespace can remove them

        def gc(got: IdMap) -> int:
            _open_inside(args, store, got, create=False)
            store.collect_garbage()
            return 0

        gc_status = _run_inside(args, idmap, gc)
        status = status or gc_status  # the child printed its Error: line; the exit status must say so too
    return status


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove the build cache, layers and blobs no image needs, and images without a name."""

    store, idmap = _store_and_map(args)
    if not store.exists():
        print(f"no store at {store.root}: nothing to prune", file=sys.stderr)
        return 0

    def run(got: IdMap) -> int:  # inside the namespace: layer directories of other ids are readable only there
        _open_inside(args, store, got, create=False)
        before = store.usage()
        with store.exclusive():
            pass  # refuse clearly while a build runs (prune would skip silently)
        for line in store.prune(None):
            print(line)
        after = store.usage()
        print(f"freed {_size(before - after)}; the store {store.root} holds {_size(after)}")
        return 0

    return _run_inside(args, idmap, run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_df(args: argparse.Namespace) -> int:
    """The store's size by part, and this user's limits."""
    from rootless.env import limits
    from rootless.store.store import Store

    store, idmap = _store_and_map(args)
    lim = limits.load()

    def run(got: IdMap) -> int:  # inside the namespace: layer directories of other ids are readable only there
        parts = {
            "chains": "images and layers",
            "blobs": "blobs",
            "cache": "build cache",
            "cache-mounts": "cache mounts",
        }
        print(f"store              {store.root}")
        print(f"images             {len(store.images()) if store.exists() else 0}")
        for sub, label in parts.items():
            path = os.path.join(store.root, sub)
            print(f"{label:<18} {_size(Store(path).usage() if os.path.isdir(path) else 0)}")
        limit = f" (limit {_size(lim.store_size)})" if lim.store_size else ""
        print(f"{'total':<18} {_size(store.usage() if store.exists() else 0)}{limit}")
        if lim.concurrent_builds:
            print(f"concurrent builds  at most {lim.concurrent_builds}")
        return 0

    return _run_inside(args, idmap, run)


def cmd_check(args: argparse.Namespace) -> int:
    """Verify the store; with --repair remove what is broken and check again. Exit 1 when problems remain."""
    from rootless.store import check as storecheck

    store, idmap = _store_and_map(args)
    if not store.exists():
        print(f"no store at {store.root}: nothing to check", file=sys.stderr)
        return 0

    def run(idmap: IdMap) -> int:
        from rootless.store.store import STORE_VERSION

        store.open(idmap, create=False, sweep=False)
        if store.version != STORE_VERSION:
            _open_inside(args, store, idmap, create=False)
        with store.exclusive() if args.repair else contextlib.nullcontext():
            for path in store.sweep(idle=args.repair):
                print(f"removed leftover of a killed process: {path}")
            with contextlib.nullcontext() if args.repair else store.in_use():
                problems = storecheck.check(store, Ownership.for_mapping(idmap.single))
                if args.repair and problems:
                    for line in storecheck.repair(store, problems):
                        print(line)
                    problems = storecheck.check(store, Ownership.for_mapping(idmap.single))
        for p in problems:
            print(p)
        if problems:
            hint = "" if args.repair else "; `rbuild check --repair` removes what is broken"
            print(
                f"rbuild check: {len(problems)} problem{'s' if len(problems) > 1 else ''} in {store.root}{hint}",
                file=sys.stderr,
            )
            return 1
        return 0

    return _run_inside(args, idmap, run)


def cmd_push(args: argparse.Namespace) -> int:
    from rootless.oci import transports

    dest = args.dest
    if dest is None:
        if args.image.startswith("localhost/") or "/" not in args.image:
            raise RbuildError(f"{args.image}: a local name needs a destination (docker://HOST/REPO:TAG, oci:DIR, ...)")
        dest = "docker://" + args.image
    target = transports.parse_transport(dest)

    def run(store: Store, idmap: IdMap) -> int:
        rec = _find(store, args.image)
        fmt = args.format
        if fmt is None:
            from rootless.oci import image as img

            fmt = "docker" if store.read_json(rec.manifest).get("mediaType") == img.DOCKER_MANIFEST else "oci"
        digest = target.export(
            store,
            rec,
            fmt,
            args.compression_format,
            args.compression_level,
            _registry_options(args, [target.rest] if not target.local else []),
            _reporter(args),
        )
        if args.digestfile:
            from rootless.kernel.fsutil import atomic_write

            atomic_write(os.path.abspath(args.digestfile), digest.encode())
        from rootless.events import Notice

        _reporter(args).emit(Notice(f"Pushed {rec.id[7:19]} to {target.spec} ({digest})"))  # -q: not shown
        return 0

    return _in_namespace(args, run)


def cmd_pull(args: argparse.Namespace) -> int:
    from rootless.oci import transports

    def run(store: Store, idmap: IdMap) -> int:
        source = transports.parse_transport(args.image)
        options = _registry_options(args, [] if source.local else [source.rest])
        with source.open(store, options, _reporter(args)) as src:
            names = [] if source.local else [src.name]
            rec = transports.import_image(store, src, names, Ownership.for_mapping(idmap.single))
        print(rec.id)
        return 0

    return _in_namespace(args, run)


def cmd_unshare(args: argparse.Namespace) -> int:
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = [os.environ.get("SHELL", "/bin/sh")]

    def run(store: Store, idmap: IdMap) -> int:
        import subprocess

        env = dict(os.environ)
        env["RBUILD_STORE"] = store.root
        try:
            return subprocess.run(argv, env=env, check=False).returncode
        except FileNotFoundError:
            raise RbuildError(f"{argv[0]}: command not found", exit_code=127) from None

    return _in_namespace(args, run)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 0 when RUN works here, 1 when only RUN-less builds do, 2 when nothing does."""
    from rootless.env import paths, probe

    root = paths.store_root(getattr(args, "root", None))
    result = probe.probe(root)
    choice = probe.choose(result, _store_format(root))
    status = 0 if choice.run_possible else (1 if result.storage_writable else 2)
    if args.json:
        checks = [{"name": c.name, "ok": c.ok, "detail": c.detail, "remedy": c.remedy} for c in result.checks]
        doc = {"rung": choice.rung, "run_possible": choice.run_possible, "skipped": list(choice.skipped)}
        print(json.dumps({**doc, "checks": checks}, indent=2))
        return status
    run = "RUN works" if choice.run_possible else "RUN is not possible"
    print(f"rung {choice.rung}: {probe.RUNGS[choice.rung]} ({run})")
    for c in result.checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        if c.remedy:
            print(f"     fix: {c.remedy}")
    for why in choice.skipped:
        print(f"skipped {why}")
    return status


# -------------------------------------------------------------------------------------------------------


def _guard(args: argparse.Namespace, fn: Callable[[], int]) -> int:
    """Turn every failure into one `Error:` line and an exit status (a traceback only at debug level)."""
    debug = getattr(args, "log_level", None) == "debug"
    try:
        return fn()
    except RbuildError as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        if debug:
            import traceback

            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"Error: {e.strerror or e}{where}", file=sys.stderr)
        return 125


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen_command(argv)
    # no command and no help asked for: the global flags alone (--version) need no subcommand parsers
    bare = command is None and not any(a.startswith(("-h", "--h")) for a in argv)
    try:
        try:
            args = build_parser(command, subcommands=not bare).parse_args(argv, namespace=argparse.Namespace())
        except RbuildError:
            if command not in _COMMANDS and not bare:
                raise
            # the whole parser says what is wrong, as it always has
            args = build_parser(None).parse_args(argv, namespace=argparse.Namespace())
    except RbuildError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 125
    if not getattr(args, "command", None):
        build_parser(None).print_help(sys.stderr)
        return 125
    return _guard(args, lambda: _isolated(args))


def _isolated(args: argparse.Namespace) -> int:
    """The command, under the user's `--isolation` (or RBUILD_ISOLATION), applied before it looks around."""
    name = getattr(args, "isolation", None) or os.environ.get("RBUILD_ISOLATION")
    if name:
        from rootless.env import userns

        userns.force(name)
    return int(args.func(args) or 0)
