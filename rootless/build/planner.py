"""The build planner: from a parsed Containerfile and the user's options to an ordered list of stages.

It resolves the global (meta) ARGs and FROM references, finds which stages the target needs (unused
stages are skipped, as BuildKit does) and validates everything that can be checked before any work
starts, so a bad Containerfile fails in milliseconds with FILE:LINE.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rootless.errors import ContainerfileError, RbuildError
from rootless.events import Reporter, Warn
from rootless.kernel.fspath import inside
from rootless.oci.platform import host_platform, parse_platform

if TYPE_CHECKING:
    from rootless.frontend.containerfile import Containerfile
    from rootless.frontend.instructions import Command, FromCmd

# ARGs docker predefines: usable without an ARG line, left out of the image history
PROXY_ARGS = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
)


def normalize_platform(text: str, what: str) -> tuple[str, str, str]:
    """`os/arch[/variant]` as containerd's platforms.Normalize writes it: (os, arch, variant)."""
    try:
        p = parse_platform(text)
    except RbuildError:
        raise RbuildError(f"{what}: invalid platform {text!r} (want os/arch[/variant])") from None
    return p.os, p.architecture, p.variant


def platform_text(p: tuple[str, str, str]) -> str:
    return "/".join(x for x in p if x)


def build_platform() -> tuple[str, str, str]:
    h = host_platform()
    return h.os, h.architecture, h.variant


def platform_args(target: tuple[str, str, str] | None = None) -> dict[str, str]:
    """BuildKit's automatic platform ARGs: in the global scope (FROM) without a declaration, in a stage
    only once an ARG line names them (frontend/dockerfile/docs/reference.md, "Automatic platform ARGs")."""
    build = build_platform()
    target = target or build
    return {
        "BUILDPLATFORM": platform_text(build),
        "BUILDOS": build[0],
        "BUILDARCH": build[1],
        "BUILDVARIANT": build[2],
        "TARGETPLATFORM": platform_text(target),
        "TARGETOS": target[0],
        "TARGETARCH": target[1],
        "TARGETVARIANT": target[2],
    }


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # expanded FROM reference ("scratch", a stage name, an image)
    base_stage: int | None  # index of the stage it builds on, if any
    from_cmd: FromCmd
    commands: list[Command] = field(default_factory=list)
    deps: set[int] = field(default_factory=set)


@dataclass
class Plan:
    filename: str
    context: str
    stages: list[Stage]
    order: list[int]
    meta_args: dict[str, str]
    build_args: dict[str, str]
    target: int
    escape: str = "\\"
    # --build-context NAME=...: NAME -> ("dir", host path) or ("image", an image reference FROM takes)
    contexts: dict[str, tuple[str, str]] = field(default_factory=dict)
    platform: tuple[str, str, str] | None = None  # --platform: the target platform (os, arch, variant)


def read_containerfile(path: str) -> tuple[bytes, str]:
    if path == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    try:
        with open(path, "rb") as f:
            return f.read(), path
    except FileNotFoundError:
        raise RbuildError(f"{path}: no such Containerfile") from None
    except IsADirectoryError:
        raise RbuildError(f"{path}: is a directory, not a Containerfile") from None
    except OSError as e:
        raise RbuildError(f"{path}: cannot read: {e.strerror}") from None


def find_containerfile(context: str, given: str | None) -> str:
    """-f as given (relative to the current directory, as docker does: a file the user names is theirs to
    name), else Containerfile then Dockerfile in the context, which must not lead out of it."""
    if given:
        return given
    for name in ("Containerfile", "Dockerfile"):
        p = os.path.join(context, name)
        if os.path.exists(p):
            if not inside(p, context):
                raise RbuildError(
                    f"{os.path.relpath(p)} is a symbolic link out of the build context; rbuild does "
                    "not follow it (name the file with -f to use it)"
                )
            if not os.path.isfile(p):  # -f may name a pipe (`-f <(...)`); the context's own must not hang
                raise RbuildError(f"{p} is not a regular file")
            return p
    raise RbuildError(f"no Containerfile or Dockerfile in the build context {context}")


def plan(
    data: bytes,
    filename: str,
    context: str,
    build_args: dict[str, str],
    target: str | None,
    reporter: Reporter,
    private: bool = False,
    contexts: dict[str, tuple[str, str]] | None = None,
    platform: tuple[str, str, str] | None = None,
) -> Plan:
    """The plan for a Containerfile's text; the parser's warnings go to reporter.

    private: the file lies outside the build context and may be anything (a credentials file a symlink
    named as the Containerfile led to), so a fault in it is named by file and line only, without its
    text, and its warnings wait until it has proved to be a Containerfile.
    """
    from rootless.frontend import containerfile

    try:
        cf = containerfile.parse(data, filename)
        if not private:
            _warn(cf.warnings, reporter)
        result = _plan(cf, filename, context, build_args, target, contexts or {}, platform)
    except ContainerfileError as e:
        if not private:
            raise
        raise ContainerfileError(
            f"not a valid Containerfile (its text is not shown: the file is outside the "
            f"build context; `rbuild parse -f {filename}` shows it)",
            e.filename,
            e.line,
        ) from None
    if private:
        _warn(cf.warnings, reporter)
    return result


def parse_build_context(spec: str) -> tuple[str, tuple[str, str]]:
    """--build-context NAME=VALUE (BuildKit's named contexts): a directory, docker-image://REF,
    oci-layout://PATH[:TAG] or rbuild's own oci:PATH[:TAG]. Returns (NAME, (kind, value))."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise RbuildError(f"--build-context {spec!r}: expected NAME=VALUE")
    if value.startswith("docker-image://"):
        ref = value.removeprefix("docker-image://")
        if not ref:
            raise RbuildError(f"--build-context {spec!r}: docker-image:// names no image")
        return name, ("image", ref)
    if value.startswith("oci-layout://"):
        return name, ("image", "oci:" + value.removeprefix("oci-layout://"))
    if value.startswith(("oci:", "oci-archive:")):
        return name, ("image", value)
    if "://" in value or value.startswith("git@"):
        raise RbuildError(
            f"--build-context {spec!r}: only a directory, docker-image://, oci-layout:// or oci: is supported"
        )
    path = os.path.abspath(value)
    if not os.path.isdir(path):
        raise RbuildError(f"--build-context {spec!r}: {value} is not a directory")
    return name, ("dir", path)


def _warn(warnings: list[str], reporter: Reporter) -> None:
    for w in warnings:
        reporter.emit(Warn(w))


def _plan(
    cf: Containerfile,
    filename: str,
    context: str,
    build_args: dict[str, str],
    target: str | None,
    contexts: dict[str, tuple[str, str]],
    platform: tuple[str, str, str] | None = None,
) -> Plan:
    from rootless.frontend import instructions
    from rootless.frontend.shell import Lexer

    lexer = Lexer(cf.escape)
    meta: dict[str, str] = dict(platform_args(platform))
    stages: list[Stage] = []
    for node in cf.nodes:
        cmd = instructions.parse_instruction(node, filename)
        if isinstance(cmd, instructions.ArgCmd) and not stages:
            cmd = cmd.expand(lexer, meta, skip=build_args)
            for name, default in cmd.args:
                if name in build_args:
                    meta[name] = build_args[name]
                elif default is not None:
                    meta[name] = default
            continue
        if isinstance(cmd, instructions.FromCmd):
            fc = cmd.expand(lexer, meta)
            base = fc.image
            if not base:
                raise ContainerfileError(
                    "FROM requires an image name (it expanded to nothing)", filename, node.start_line
                )
            base_stage: int | None = None
            for s in stages:
                if s.name and s.name == base.lower() and base not in contexts:
                    base_stage = s.index
            # BuildKit (buildx build --build-context): "In Dockerfile the context can be accessed when FROM name
            # or --from=name is used. When Dockerfile defines a stage with the same name it is overwritten."
            if base_stage is None and base in contexts:
                kind, value = contexts[base]
                if kind != "image":
                    raise ContainerfileError(
                        f"FROM {base}: the build context {base} is a directory; FROM needs an image "
                        f"(--build-context {base}=docker-image://REF or oci-layout://PATH)",
                        filename,
                        node.start_line,
                    )
                base = value
            if fc.name and any(s.name == fc.name for s in stages):
                raise ContainerfileError(f"duplicate stage name {fc.name!r}", filename, node.start_line)
            stage = Stage(len(stages), fc.name, base, base_stage, fc)
            if base_stage is not None:
                stage.deps.add(base_stage)
            stages.append(stage)
            continue
        if not stages:
            raise ContainerfileError(
                f"{node.keyword.upper()} before the first FROM: no build stage yet", filename, node.start_line
            )
        stages[-1].commands.append(cmd)
        for ref in _from_refs(cmd):
            dep = None if ref in contexts else _stage_ref(stages, ref)
            if dep is not None:
                stages[-1].deps.add(dep)
    if not stages:
        raise ContainerfileError("no FROM instruction: nothing to build", filename, 1)
    if target:
        tgt = next((s.index for s in stages if s.name == target.lower()), None)
        if tgt is None:
            raise RbuildError(f"target stage {target!r} could not be found in {filename}")
    else:
        tgt = stages[-1].index
    needed: set[int] = set()

    def need(i: int) -> None:
        if i in needed:
            return
        needed.add(i)
        for d in stages[i].deps:
            need(d)

    need(tgt)
    return Plan(filename, context, stages, sorted(needed), meta, build_args, tgt, cf.escape, contexts, platform)


def _from_refs(cmd: object) -> list[str]:
    """The --from of COPY and the from= of RUN --mount (neither is ever expanded, as in BuildKit)."""
    from rootless.frontend import instructions

    if isinstance(cmd, instructions.CopyCmd):
        return [cmd.from_] if cmd.from_ else []
    refs = []
    if isinstance(cmd, instructions.RunCmd):
        for raw in cmd.mounts:
            try:
                m = instructions.parse_mount(raw, expanded=True)
            except Exception:  # noqa: BLE001 - fields with variables are checked when the step runs
                continue
            if m.from_:
                refs.append(m.from_)
    return refs


def _stage_ref(stages: list[Stage], ref: str) -> int | None:
    """COPY --from=X: an earlier stage's name or index, or None for an image reference."""
    low = ref.lower()
    for s in stages[:-1]:
        if s.name == low:
            return s.index
    if ref.isdigit():
        i = int(ref)
        if i < len(stages) - 1:
            return i
    return None
