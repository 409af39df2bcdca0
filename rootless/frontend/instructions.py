"""Typed Containerfile instructions: BuildKit's instruction-level checks and its expansion rules.

`parse_instruction` turns a parser `Node` into a command the way BuildKit's instructions package does
(known keyword, arity, flags: unknown/duplicate/missing values, bool values, only `--mount` and
`--exclude` repeatable), without expanding anything.  `Command.expand` then returns a copy with the
fields BuildKit's dispatcher expands, expanded: FROM's image and --platform (with the meta ARGs the
caller passes), ENV/LABEL keys and values (all against the env from before the instruction), ARG
defaults, COPY/ADD sources, destination, --chown, --chmod, ADD --checksum and unquoted-delimiter
here-documents, EXPOSE (split into words), VOLUME, WORKDIR, USER, STOPSIGNAL and RUN --mount values.
RUN, CMD, ENTRYPOINT, SHELL and HEALTHCHECK command text is never expanded (the shell does that), nor
is COPY --from (BuildKit uses it verbatim) or `from=` in a mount.  Every error is a
ContainerfileError naming the file and line and quoting the instruction.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rootless.errors import ContainerfileError
from rootless.frontend.containerfile import (
    Containerfile,
    Heredoc,
    Node,
    chomp_heredoc_content,
    go_lower,
    parse_heredoc,
    quote_instruction,
)
from rootless.frontend.shell import GO_SPACES, Lexer, ShellError, go_quote

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "INSTRUCTIONS",
    "Command",
    "FromCmd",
    "RunCmd",
    "CopyCmd",
    "AddCmd",
    "EnvCmd",
    "LabelCmd",
    "ArgCmd",
    "ExposeCmd",
    "VolumeCmd",
    "WorkdirCmd",
    "UserCmd",
    "CmdCmd",
    "EntrypointCmd",
    "ShellCmd",
    "HealthcheckCmd",
    "OnbuildCmd",
    "StopsignalCmd",
    "MaintainerCmd",
    "Mount",
    "parse_instruction",
    "parse_all",
    "parse_mount",
    "parse_duration",
    "suggest",
]

INSTRUCTIONS = (
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
)


class _Fault(ValueError):
    """An instruction-level fault in BuildKit's words; parse_instruction adds file, line and text."""


def _error(node: Node, filename: str, message: str) -> ContainerfileError:
    return ContainerfileError(f"{message} in {quote_instruction(node.original)}", filename, node.start_line)


# --- suggestions (BuildKit's util/suggest) ----------------------------------------------------------


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _go_upper(s: str) -> str:
    if s.isascii():
        return s.upper()
    return "".join(u if len(u := c.upper()) == 1 else c for c in s)


def suggest(value: str, options: Collection[str], case_sensitive: bool) -> str | None:
    """The option closest to a mistyped value (edit distance below 3), as BuildKit suggests it."""
    orig = value
    if not case_sensitive:
        value = go_lower(value)
    match = ""
    best = 3
    for opt in sorted(options):
        cmp = opt if case_sensitive else go_lower(opt)
        if value == cmp:
            return None
        dist = _levenshtein(value, cmp)
        if dist < best:
            best = dist
            if case_sensitive:
                match = cmp
            elif orig == go_lower(orig):
                match = cmp
            elif orig == _go_upper(orig):
                match = _go_upper(cmp)
            else:
                match = cmp
    return match or None


def _with_suggestion(message: str, value: str, options: Collection[str], case_sensitive: bool) -> str:
    match = suggest(value, options, case_sensitive)
    return f"{message} (did you mean {match}?)" if match else message


# --- flags (BuildKit's BFlags) ------------------------------------------------------------------------


class _Flags:
    """The flags one instruction accepts, checked against what was written."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.kinds: dict[str, str] = {}
        self.values: dict[str, str] = {}
        self.lists: dict[str, list[str]] = {}
        self.used: set[str] = set()

    def add_bool(self, name: str, default: bool = False) -> None:
        self.kinds[name] = "bool"
        self.values[name] = "true" if default else "false"

    def add_string(self, name: str, default: str = "") -> None:
        self.kinds[name] = "string"
        self.values[name] = default

    def add_strings(self, name: str) -> None:
        self.kinds[name] = "strings"
        self.lists[name] = []

    def parse(self) -> None:
        for a in self.args:
            if a == "--":
                return
            if not a.startswith("--"):
                raise _Fault(f"arg should start with -- : {a}")
            flag_name, has_value, value = a.partition("=")
            name = flag_name[2:]
            kind = self.kinds.get(name)
            if kind is None:
                raise _Fault(_with_suggestion(f"unknown flag: {flag_name}", name, self.kinds, True))
            if name in self.used and kind != "strings":
                raise _Fault(f"duplicate flag specified: {flag_name}")
            self.used.add(name)
            if kind == "bool":
                if has_value and value == "":
                    raise _Fault(f"missing a value on flag: {flag_name}")
                lower = go_lower(value)
                if lower in ("true", ""):
                    self.values[name] = "true"
                elif lower == "false":
                    self.values[name] = "false"
                else:
                    raise _Fault(f"expecting boolean value for flag {flag_name}, not: {value}")
            elif not has_value:
                raise _Fault(f"missing a value on flag: {flag_name}")
            elif kind == "string":
                self.values[name] = value
            else:
                self.lists[name].append(value)

    def get(self, name: str) -> str | None:
        """A string flag's value, None when empty (BuildKit treats empty as not given)."""
        return self.values[name] or None

    def true(self, name: str) -> bool:
        return self.values[name] == "true"


# --- commands ------------------------------------------------------------------------------------------


class _Expander:
    """Expands words for one command, turning lexer errors into located ContainerfileErrors."""

    def __init__(self, cmd: Command, lexer: Lexer, env: Mapping[str, str]) -> None:
        self.cmd = cmd
        self.lexer = lexer
        self.env = env

    def fail(self, message: str) -> ContainerfileError:
        return _error(self.cmd.node, self.cmd.filename, message)

    def word(self, s: str) -> str:
        try:
            return self.lexer.expand(s, self.env)
        except ShellError as e:
            raise self.fail(str(e)) from None

    def opt(self, s: str | None) -> str | None:
        return self.word(s) or None if s is not None else None

    def words(self, s: str) -> list[str]:
        try:
            return self.lexer.expand_words(s, self.env)
        except ShellError as e:
            raise self.fail(str(e)) from None


@dataclass
class Command:
    """One instruction; `node` is the parser's view of it, `filename` where it came from."""

    node: Node
    filename: str

    @property
    def keyword(self) -> str:
        return self.node.keyword

    def expand(self, lexer: Lexer, env: Mapping[str, str]) -> Self:
        """A copy with the fields BuildKit expands expanded against env (nothing, for this command)."""
        return self._expand(_Expander(self, lexer, env))

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(self)


@dataclass
class FromCmd(Command):
    image: str
    name: str | None  # the AS name, lowercased
    platform: str | None

    def _expand(self, x: _Expander) -> Self:
        image = x.word(self.image)
        if image == "":
            raise x.fail(f"base name ({self.image}) should not be blank")
        platform = self.platform
        if platform is not None:
            platform = x.word(platform)
            if platform == "":
                raise x.fail(f"empty platform value from expression {self.platform}")
        return dataclasses.replace(self, image=image, platform=platform)


@dataclass
class Mount:
    """One `RUN --mount=...` value, read as BuildKit reads it."""

    type: str = "bind"
    from_: str | None = None
    source: str | None = None
    target: str | None = None
    readonly: bool = False
    cache_id: str | None = None
    sharing: str | None = None
    required: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None  # tmpfs size limit in bytes
    env: str | None = None  # secret mounts: the variable to put the secret in


@dataclass
class RunCmd(Command):
    args: list[str]
    shell_form: bool
    heredocs: list[Heredoc]
    mounts: list[str]  # raw --mount values (after expand(): with their values expanded)
    network: str | None
    security: str | None

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(self, mounts=[_expand_mount(m, x) for m in self.mounts])

    def mount_specs(self) -> list[Mount]:
        """The mounts, read and checked (call on an expanded command: values are taken as they are)."""
        out = []
        for m in self.mounts:
            try:
                out.append(parse_mount(m, expanded=True))
            except _Fault as e:
                raise _error(self.node, self.filename, str(e)) from None
        return out


def _content_lexer() -> Lexer:
    # BuildKit expands here-document bodies with a `\` lexer that leaves quotes alone.
    return Lexer("\\", skip_process_quotes=True)


def _expand_heredocs(docs: list[Heredoc], x: _Expander) -> list[Heredoc]:
    out = []
    for d in docs:
        if d.expand:
            try:
                content = _content_lexer().expand(d.content, x.env)
            except ShellError as e:
                raise x.fail(str(e)) from None
            d = dataclasses.replace(d, content=content)
        out.append(d)
    return out


@dataclass
class CopyCmd(Command):
    sources: list[str]  # paths; here-document sources are in heredocs
    dest: str
    from_: str | None
    chown: str | None
    chmod: str | None
    link: bool
    parents: bool
    exclude: list[str]
    heredocs: list[Heredoc]  # here-document sources, `<<-` tabs already stripped

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(
            self,
            chown=x.opt(self.chown),
            chmod=x.opt(self.chmod),
            sources=[x.word(s) for s in self.sources],
            dest=x.word(self.dest),
            heredocs=_expand_heredocs(self.heredocs, x),
        )


@dataclass
class AddCmd(Command):
    sources: list[str]
    dest: str
    chown: str | None
    chmod: str | None
    link: bool
    parents: bool  # always False: ADD has no --parents in the stable syntax
    exclude: list[str]
    heredocs: list[Heredoc]
    checksum: str | None
    keep_git_dir: bool
    unpack: bool | None

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(
            self,
            chown=x.opt(self.chown),
            chmod=x.opt(self.chmod),
            checksum=x.opt(self.checksum),
            sources=[x.word(s) for s in self.sources],
            dest=x.word(self.dest),
            heredocs=_expand_heredocs(self.heredocs, x),
        )


@dataclass
class EnvCmd(Command):
    env: list[tuple[str, str]]

    def _expand(self, x: _Expander) -> Self:
        # every pair sees the env from before the instruction: ENV a=1 b=$a gives b the old a
        return dataclasses.replace(self, env=[(x.word(k), x.word(v)) for k, v in self.env])


@dataclass
class LabelCmd(Command):
    labels: list[tuple[str, str]]

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(self, labels=[(x.word(k), x.word(v)) for k, v in self.labels])


@dataclass
class ArgCmd(Command):
    args: list[tuple[str, str | None]]  # (name, default or None)

    def expand(self, lexer: Lexer, env: Mapping[str, str], skip: Collection[str] = ()) -> Self:
        """Expand the defaults (never the names); defaults of the names in `skip` (those a
        --build-arg overrides) are left alone, so that their errors do not matter, as in BuildKit."""
        x = _Expander(self, lexer, env)
        args = [(k, v if v is None or k in skip else x.word(v)) for k, v in self.args]
        return dataclasses.replace(self, args=args)


@dataclass
class ExposeCmd(Command):
    ports: list[str]

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(self, ports=[w for p in self.ports for w in x.words(p)])


@dataclass
class VolumeCmd(Command):
    volumes: list[str]

    def _expand(self, x: _Expander) -> Self:
        volumes = [x.word(v) for v in self.volumes]
        if "" in volumes:
            raise x.fail("VOLUME specified can not be an empty string")
        return dataclasses.replace(self, volumes=volumes)


@dataclass
class WorkdirCmd(Command):
    path: str

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(self, path=x.word(self.path))


@dataclass
class UserCmd(Command):
    user: str

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(self, user=x.word(self.user))


@dataclass
class CmdCmd(Command):
    args: list[str]
    shell_form: bool


@dataclass
class EntrypointCmd(Command):
    args: list[str]
    shell_form: bool


@dataclass
class ShellCmd(Command):
    shell: list[str]


@dataclass
class HealthcheckCmd(Command):
    test: list[str] | None  # ["NONE"] | ["CMD", ...] | ["CMD-SHELL", "cmd"]
    interval: int | None  # nanoseconds, None when not given
    timeout: int | None
    start_period: int | None
    start_interval: int | None
    retries: int | None


@dataclass
class OnbuildCmd(Command):
    expression: str  # as stored in the image config's OnBuild list, e.g. "RUN echo hi"


@dataclass
class StopsignalCmd(Command):
    signal: str

    def _expand(self, x: _Expander) -> Self:
        return dataclasses.replace(self, signal=x.word(self.signal))


@dataclass
class MaintainerCmd(Command):
    maintainer: str


# --- per-instruction parsing (BuildKit's instructions/parse.go) -------------------------------------


def _exactly_one(node: Node, name: str) -> str:
    if len(node.args) != 1:
        raise _Fault(f"{name} requires exactly one argument")
    return node.args[0]


def _at_least_one(node: Node, name: str) -> None:
    if not node.args:
        raise _Fault(f"{name} requires at least one argument")


def _command_args(args: list[str], json_form: bool) -> list[str]:
    """BuildKit's handleJSONArgs: the JSON array, or the shell-form text as one string."""
    if not args:
        return []
    if json_form:
        return list(args)
    return [" ".join(args)]


def _kvps(node: Node, name: str) -> list[tuple[str, str]]:
    args = node.args
    if not args:
        raise _Fault(f"{name} requires at least one argument")
    if len(args) % 3:
        raise _Fault(f"Bad input to {name}, too many arguments")
    out = []
    for i in range(0, len(args), 3):
        if not args[i]:
            raise _Fault(f"{name} names can not be blank")
        out.append((args[i], args[i + 1]))
    return out


_STAGE_NAME = re.compile("[a-z][a-z0-9_.-]*")


def _equal_fold_as(s: str) -> bool:
    """Go's strings.EqualFold(s, "as"): 'ſ' (long s) folds to s as well."""
    return len(s) == 2 and s[0] in "aA" and s[1] in "sS\u017f"


def _p_from(node: Node, fl: _Flags, fn: str) -> Command:
    args = node.args
    name = None
    if len(args) == 3 and _equal_fold_as(args[1]):
        name = go_lower(args[2])
        if not _STAGE_NAME.fullmatch(name):
            raise _Fault(
                f"invalid name for build stage: {go_quote(args[2])}, name can't start with a number or contain symbols"
            )
    elif len(args) != 1:
        raise _Fault("FROM requires either one or three arguments")
    fl.add_string("platform")
    fl.parse()
    return FromCmd(node, fn, args[0], name, fl.get("platform"))


_ONBUILD_PREFIX = re.compile("\\A[\t\n\f\r ]*ONBUILD[\t\n\f\r ]*", re.IGNORECASE | re.ASCII)


def _first_word(text: str) -> str:
    return re.split("[\t\v\f\r ]+", text.strip(GO_SPACES), maxsplit=1)[0]


def _p_onbuild(node: Node, fl: _Flags, fn: str) -> Command:
    if node.next is None:
        raise _Fault("ONBUILD requires at least one argument")
    fl.parse()
    trigger = _go_upper(_first_word(node.next.original).strip(GO_SPACES))
    if trigger == "ONBUILD":
        raise _Fault("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if trigger in ("MAINTAINER", "FROM"):
        raise _Fault(f"{trigger} isn't allowed as an ONBUILD trigger")
    expression = _ONBUILD_PREFIX.sub("", node.original, count=1)
    for d in node.heredocs:
        expression += "\n" + d.content + d.name
    return OnbuildCmd(node, fn, expression)


def _p_run(node: Node, fl: _Flags, fn: str) -> Command:
    fl.add_strings("mount")
    fl.add_string("network", "default")
    fl.add_string("security", "sandbox")
    fl.parse()
    mounts = fl.lists["mount"]
    for m in mounts:
        parse_mount(m, expanded=False)
    network = fl.values["network"] if "network" in fl.used else None
    if network is not None and network not in ("default", "none", "host"):
        raise _Fault(f"invalid network mode {go_quote(network)}")
    security = fl.values["security"] if "security" in fl.used else None
    if security is not None and security not in ("sandbox", "insecure"):
        raise _Fault(f"security {go_quote(security)} is not valid")
    args = _command_args(node.args, node.json_form)
    return RunCmd(node, fn, args, not node.json_form, list(node.heredocs), list(mounts), network, security)


def _p_cmd(node: Node, fl: _Flags, fn: str) -> Command:
    fl.parse()
    return CmdCmd(node, fn, _command_args(node.args, node.json_form), not node.json_form)


def _p_entrypoint(node: Node, fl: _Flags, fn: str) -> Command:
    fl.parse()
    return EntrypointCmd(node, fn, _command_args(node.args, node.json_form), not node.json_form)


def _p_shell(node: Node, fl: _Flags, fn: str) -> Command:
    fl.parse()
    args = _command_args(node.args, node.json_form)
    if not args:
        raise _Fault("SHELL requires at least one argument")
    if not node.json_form:
        raise _Fault("SHELL requires the arguments to be in JSON form")
    return ShellCmd(node, fn, args)


def _must_parse_heredoc(word: str) -> Heredoc | None:
    try:
        return parse_heredoc(word)
    except ShellError:
        return None  # BuildKit's MustParseHeredoc: a word that does not lex is a plain path


def _sources_and_dest(node: Node, name: str) -> tuple[list[str], str, list[Heredoc]]:
    srcs, dest = node.args[:-1], node.args[-1]
    if _must_parse_heredoc(dest) is not None:
        raise _Fault(f"{name} cannot accept a heredoc as a destination")
    bodies = {d.name: d for d in node.heredocs}
    paths: list[str] = []
    docs: list[Heredoc] = []
    for src in srcs:
        h = _must_parse_heredoc(src)
        if h is None:
            paths.append(src)
            continue
        body = bodies.get(h.name)
        content = body.content if body is not None else ""
        if h.chomp:
            content = chomp_heredoc_content(content)
        docs.append(Heredoc(h.name, content, h.expand, h.chomp, h.file_descriptor))
    return paths, dest, docs


def _p_copy(node: Node, fl: _Flags, fn: str) -> Command:
    if len(node.args) < 2:
        raise _Fault(
            "COPY requires at least two arguments, but only one was provided. Destination could not be determined."
        )
    fl.add_strings("exclude")
    fl.add_bool("parents")
    fl.add_string("chown")
    fl.add_string("from")
    fl.add_string("chmod")
    fl.add_bool("link")
    fl.parse()
    paths, dest, docs = _sources_and_dest(node, "COPY")
    return CopyCmd(
        node,
        fn,
        paths,
        dest,
        fl.get("from"),
        fl.get("chown"),
        fl.get("chmod"),
        fl.true("link"),
        fl.true("parents"),
        fl.lists["exclude"],
        docs,
    )


def _p_add(node: Node, fl: _Flags, fn: str) -> Command:
    if len(node.args) < 2:
        raise _Fault(
            "ADD requires at least two arguments, but only one was provided. Destination could not be determined."
        )
    fl.add_strings("exclude")
    fl.add_string("chown")
    fl.add_string("chmod")
    fl.add_bool("link")
    fl.add_bool("keep-git-dir")
    fl.add_string("checksum")
    fl.add_bool("unpack")
    fl.parse()
    paths, dest, docs = _sources_and_dest(node, "ADD")
    unpack = fl.true("unpack") if "unpack" in fl.used else None
    return AddCmd(
        node,
        fn,
        paths,
        dest,
        fl.get("chown"),
        fl.get("chmod"),
        fl.true("link"),
        False,
        fl.lists["exclude"],
        docs,
        fl.get("checksum"),
        fl.true("keep-git-dir"),
        unpack,
    )


def _p_env(node: Node, fl: _Flags, fn: str) -> Command:
    fl.parse()
    return EnvCmd(node, fn, _kvps(node, "ENV"))


def _p_label(node: Node, fl: _Flags, fn: str) -> Command:
    fl.parse()
    return LabelCmd(node, fn, _kvps(node, "LABEL"))


def _p_arg(node: Node, fl: _Flags, fn: str) -> Command:
    # BuildKit does not check ARG's flags.
    if not node.args:
        raise _Fault("ARG requires at least one argument")
    pairs: list[tuple[str, str | None]] = []
    for a in node.args:
        if "=" in a:
            k, v = a.split("=", 1)
            if not k:
                raise _Fault("ARG names can not be blank")
            pairs.append((k, v))
        else:
            pairs.append((a, None))
    return ArgCmd(node, fn, pairs)


def _p_expose(node: Node, fl: _Flags, fn: str) -> Command:
    _at_least_one(node, "EXPOSE")
    fl.parse()
    return ExposeCmd(node, fn, sorted(node.args))


def _p_volume(node: Node, fl: _Flags, fn: str) -> Command:
    _at_least_one(node, "VOLUME")
    fl.parse()
    volumes = []
    for v in node.args:
        v = v.strip(GO_SPACES)
        if not v:
            raise _Fault("VOLUME specified can not be an empty string")
        volumes.append(v)
    return VolumeCmd(node, fn, volumes)


def _p_workdir(node: Node, fl: _Flags, fn: str) -> Command:
    path = _exactly_one(node, "WORKDIR")
    fl.parse()
    return WorkdirCmd(node, fn, path)


def _p_user(node: Node, fl: _Flags, fn: str) -> Command:
    user = _exactly_one(node, "USER")
    fl.parse()
    return UserCmd(node, fn, user)


def _p_stopsignal(node: Node, fl: _Flags, fn: str) -> Command:
    # BuildKit does not check STOPSIGNAL's flags.
    return StopsignalCmd(node, fn, _exactly_one(node, "STOPSIGNAL"))


def _p_maintainer(node: Node, fl: _Flags, fn: str) -> Command:
    who = _exactly_one(node, "MAINTAINER")
    fl.parse()
    return MaintainerCmd(node, fn, who)


def _p_healthcheck(node: Node, fl: _Flags, fn: str) -> Command:
    _at_least_one(node, "HEALTHCHECK")
    typ = _go_upper(node.args[0])
    rest = node.args[1:]
    if typ == "NONE":
        # BuildKit does not check the flags of HEALTHCHECK NONE.
        if rest:
            raise _Fault("HEALTHCHECK NONE takes no arguments")
        return HealthcheckCmd(node, fn, ["NONE"], None, None, None, None, None)
    for name in ("interval", "timeout", "start-period", "start-interval", "retries"):
        fl.add_string(name)
    fl.parse()
    if typ != "CMD":
        raise _Fault(f"Unknown type {go_quote(typ)} in HEALTHCHECK (try CMD)")
    cmd = _command_args(rest, node.json_form)
    if not cmd:
        raise _Fault("Missing command after HEALTHCHECK CMD")
    test = (["CMD"] if node.json_form else ["CMD-SHELL"]) + cmd
    durations: list[int | None] = []
    for name in ("interval", "timeout", "start-period", "start-interval"):
        value = fl.values[name]
        if not value:
            durations.append(None)
            continue
        d = parse_duration(value)
        if d != 0 and d < 1_000_000:
            raise _Fault(f"Interval {go_quote(name)} cannot be less than 1ms")
        durations.append(d)
    retries = None
    if fl.values["retries"]:
        retries = _parse_int(fl.values["retries"], 32)
        if retries < 0:
            raise _Fault(f"--retries cannot be negative ({retries})")
    return HealthcheckCmd(node, fn, test, durations[0], durations[1], durations[2], durations[3], retries)


_PARSERS: dict[str, Callable[[Node, _Flags, str], Command]] = {
    "add": _p_add,
    "arg": _p_arg,
    "cmd": _p_cmd,
    "copy": _p_copy,
    "entrypoint": _p_entrypoint,
    "env": _p_env,
    "expose": _p_expose,
    "from": _p_from,
    "healthcheck": _p_healthcheck,
    "label": _p_label,
    "maintainer": _p_maintainer,
    "onbuild": _p_onbuild,
    "run": _p_run,
    "shell": _p_shell,
    "stopsignal": _p_stopsignal,
    "user": _p_user,
    "volume": _p_volume,
    "workdir": _p_workdir,
}


def parse_instruction(node: Node, filename: str) -> Command:
    """The typed command for one parser node; checks keyword, arity and flags but expands nothing."""
    fn = _PARSERS.get(node.keyword)
    if fn is None:
        word = _first_word(node.original)
        names = [n.upper() for n in INSTRUCTIONS]
        raise _error(node, filename, _with_suggestion(f"unknown instruction: {word}", word, names, False))
    try:
        return fn(node, _Flags(node.flags), filename)
    except _Fault as e:
        raise _error(node, filename, str(e)) from None


def parse_all(cf: Containerfile) -> list[Command]:
    """Every instruction of a file, checked; only ARG may come before the first FROM."""
    out: list[Command] = []
    stage = False
    for node in cf.nodes:
        cmd = parse_instruction(node, cf.filename)
        if isinstance(cmd, FromCmd):
            stage = True
        elif not stage and not isinstance(cmd, ArgCmd):
            raise _error(node, cf.filename, "no build stage in current context")
        out.append(cmd)
    return out


# --- Go number and duration parsing --------------------------------------------------------------

_INT = re.compile("[+-]?[0-9]+")


def _parse_int(s: str, bits: int) -> int:
    if not _INT.fullmatch(s):
        raise _Fault(f"strconv.ParseInt: parsing {go_quote(s)}: invalid syntax")
    v = int(s)
    if not -(1 << (bits - 1)) <= v < (1 << (bits - 1)):
        raise _Fault(f"strconv.ParseInt: parsing {go_quote(s)}: value out of range")
    return v


_UNITS = {
    "ns": 1,
    "us": 1000,
    "\u00b5s": 1000,
    "\u03bcs": 1000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_duration(s: str) -> int:
    """Go's time.ParseDuration, in nanoseconds ("1m30s", "1.5h", "-2ms")."""
    orig = s
    invalid = _Fault(f"time: invalid duration {go_quote(orig)}")
    neg = False
    if s[:1] in ("-", "+"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise invalid
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise invalid
        i = 0
        while i < len(s) and "0" <= s[i] <= "9":
            i += 1
        pre = i > 0
        whole = int(s[:i]) if pre else 0
        if whole > (1 << 63):
            raise invalid
        s = s[i:]
        frac, scale, post = 0, 1, False
        if s[:1] == ".":
            s = s[1:]
            i = 0
            while i < len(s) and "0" <= s[i] <= "9":
                if frac <= ((1 << 63) - 1 - 9) // 10:  # Go stops adding digits that would overflow
                    frac = frac * 10 + int(s[i])
                    scale *= 10
                i += 1
            post = i > 0
            s = s[i:]
        if not pre and not post:
            raise invalid
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        if i == 0:
            raise _Fault(f"time: missing unit in duration {go_quote(orig)}")
        unit_name, s = s[:i], s[i:]
        unit = _UNITS.get(unit_name)
        if unit is None:
            raise _Fault(f"time: unknown unit {go_quote(unit_name)} in duration {go_quote(orig)}")
        if whole > (1 << 63) // unit:
            raise invalid
        v = whole * unit
        if frac:
            v += int(float(frac) * (float(unit) / scale))
            if v > (1 << 63):
                raise invalid
        total += v
        if total > (1 << 63):
            raise invalid
    if neg:
        return -total
    if total > (1 << 63) - 1:
        raise invalid
    return total


# --- RUN --mount ---------------------------------------------------------------------------------

_MOUNT_KEYS = (
    "type",
    "from",
    "source",
    "target",
    "readonly",
    "id",
    "sharing",
    "required",
    "size",
    "mode",
    "uid",
    "gid",
    "src",
    "dst",
    "destination",
    "ro",
    "rw",
    "readwrite",
    "env",
)
_MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
_BOOLS = {
    "1": True,
    "t": True,
    "T": True,
    "TRUE": True,
    "true": True,
    "True": True,
    "0": False,
    "f": False,
    "F": False,
    "FALSE": False,
    "false": False,
    "False": False,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?")


def _csv_fields(value: str) -> list[str]:
    """One record of Go's encoding/csv (comma separated, "..." quoting with "" for a quote)."""
    if value == "":
        raise _Fault("failed to parse csv mounts: EOF")
    fields = []
    i = 0
    n = len(value)
    while True:
        if i < n and value[i] == '"':
            buf = []
            i += 1
            while True:
                j = value.find('"', i)
                if j < 0:
                    raise _Fault('failed to parse csv mounts: extraneous or missing " in quoted-field')
                buf.append(value[i:j])
                if j + 1 < n and value[j + 1] == '"':
                    buf.append('"')
                    i = j + 2
                    continue
                i = j + 1
                break
            if i < n and value[i] != ",":
                raise _Fault('failed to parse csv mounts: extraneous or missing " in quoted-field')
            fields.append("".join(buf))
        else:
            j = value.find(",", i)
            j = n if j < 0 else j
            part = value[i:j]
            if '"' in part:
                raise _Fault('failed to parse csv mounts: bare " in non-quoted-field')
            fields.append(part)
            i = j
        if i >= n:
            return fields
        i += 1  # the comma


def _parse_uint(value: str, base: int) -> int | None:
    digits = "01234567" if base == 8 else "0123456789"
    if not value or any(c not in digits for c in value):
        return None
    v = int(value, base)
    return v if v < (1 << 32) else None


def _ram_in_bytes(value: str) -> int | None:
    m = _SIZE.fullmatch(value)
    if not m:
        return None
    mult = 1 << (10 * "kmgtp".find(m.group(2).lower()) + 10) if m.group(2) else 1
    try:
        size = float(m.group(1)) * mult  # "1.2.3" fits the pattern but is no number, as in Go
    except ValueError:
        return None
    return int(size) if size < 2**63 else None


def parse_mount(value: str, expanded: bool = True) -> Mount:
    """Read a `--mount` value.  With expanded=False only what BuildKit checks before expansion is
    checked (the CSV, key=value fields, no variables in from=); otherwise everything."""
    m = Mount()
    ro_auto = True
    for f in _csv_fields(value):
        key, has_value, v = f.partition("=")
        key = go_lower(key)
        if not has_value:
            if key in ("readonly", "ro"):
                m.readonly, ro_auto = True, False
                continue
            if key in ("readwrite", "rw"):
                m.readonly, ro_auto = False, False
                continue
            if key == "required":
                if expanded and m.type not in ("secret", "ssh"):
                    raise _Fault(f"unexpected key '{key}' for mount type '{m.type}'")
                m.required = True
                continue
            raise _Fault(f"invalid field '{f}' must be a key=value pair")
        if not expanded:
            if key == "from" and "$" in v[:-1]:
                raise _Fault("'from' doesn't support variable expansion, define alias stage instead")
            continue
        if key == "type":
            if go_lower(v) not in _MOUNT_TYPES:
                raise _Fault(_with_suggestion(f"unsupported mount type {go_quote(v)}", v, _MOUNT_TYPES, True))
            m.type = go_lower(v)
        elif key == "from":
            m.from_ = v
        elif key in ("source", "src"):
            m.source = v
        elif key in ("target", "dst", "destination"):
            m.target = v
        elif key in ("readonly", "ro", "readwrite", "rw", "required"):
            b = _BOOLS.get(v)
            if b is None:
                raise _Fault(f"invalid value for {key}: {v}")
            if key == "required":
                if m.type not in ("secret", "ssh"):
                    raise _Fault(f"unexpected key '{key}' for mount type '{m.type}'")
                m.required = b
            else:
                m.readonly = b if key in ("readonly", "ro") else not b
                ro_auto = False
        elif key == "id":
            m.cache_id = v
        elif key == "sharing":
            if go_lower(v) not in ("shared", "private", "locked"):
                raise _Fault(f"unsupported sharing value {go_quote(v)}")
            m.sharing = go_lower(v)
        elif key in ("mode", "uid", "gid"):
            num = _parse_uint(v, 8 if key == "mode" else 10)
            if num is None:
                raise _Fault(f"invalid value {v} for {key}")
            setattr(m, key, num)
        elif key == "size":
            size = _ram_in_bytes(v) if m.type == "tmpfs" else None
            if m.type != "tmpfs":
                raise _Fault(f"unexpected key '{key}' for mount type '{m.type}'")
            if size is None:
                raise _Fault(f"invalid value for {key}: {v}")
            m.size = size
        elif key == "env":
            if m.type != "secret":
                raise _Fault(f"unexpected key '{key}' for mount type '{m.type}'")
            m.env = v
        else:
            raise _Fault(_with_suggestion(f"unexpected key '{key}' in '{f}'", key, _MOUNT_KEYS, True))
    if not expanded:
        return m
    file_info = m.type in ("secret", "ssh", "cache")
    for attr in ("mode", "uid", "gid"):
        if getattr(m, attr) is not None and not file_info:
            raise _Fault(f"{attr} not allowed for {go_quote(m.type)} type mounts")
    if ro_auto:
        m.readonly = m.type not in ("cache", "tmpfs")
    if m.sharing is not None and m.type != "cache":
        raise _Fault(f"invalid cache sharing set for {m.type} mount")
    if m.type == "secret":
        if m.from_:
            raise _Fault("secret mount should not have a from")
        if m.sharing:
            raise _Fault("secret mount should not define sharing")
        if not m.source and not m.target and not m.cache_id and not m.env:
            raise _Fault("invalid secret mount. one of source, target required")
        if m.source and m.cache_id:
            raise _Fault("both source and id can't be set")
    return m


def _csv_field(s: str) -> str:
    if s == "" or not any(c in s for c in ',"\r\n'):
        return s
    return '"' + s.replace('"', '""') + '"'


def _expand_mount(value: str, x: _Expander) -> str:
    """The --mount value with each field's value expanded, re-joined as CSV.  (A from= value went
    through the check that it holds no variable, so for it only quotes and escapes change.)"""
    try:
        fields = _csv_fields(value)
    except _Fault as e:
        raise x.fail(str(e)) from None
    out = []
    for f in fields:
        key, has_value, v = f.partition("=")
        if has_value:
            f = key + "=" + x.word(v)
        out.append(_csv_field(f))
    return ",".join(out)
