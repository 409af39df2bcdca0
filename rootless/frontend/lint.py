"""BuildKit's build checks (`docker build --check`), for `rbuild build --check`: no build, findings only.

Rule names and messages are BuildKit's (frontend/dockerfile/linter/ruleset.go); the `# check=skip=A,B`
(or `skip=all`) directive is honoured. Implemented: StageNameCasing, FromAsCasing,
ConsistentInstructionCasing, DuplicateStageName, ReservedStageName, JSONArgsRecommended,
MaintainerDeprecated, WorkdirRelativePath, UndefinedArgInFrom, SecretsUsedInArgOrEnv,
LegacyKeyValueFormat, MultipleInstructionsDisallowed, RedundantTargetPlatform.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from rootless.frontend.containerfile import Containerfile, Node

PLATFORM_ARGS = (
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
)
# BuildKit's secretsRegexp and its allow-list (frontend/dockerfile/dockerfile2llb/convert.go)
_SECRET = re.compile(
    r"(?:_|^)(?:apikey|auth|credential|credentials|key|password|pass|pword|passwd|secret|token)(?:_|$)", re.I
)
_NOT_SECRET = re.compile(r"(?:_|^)(?:public)(?:_|$)", re.I)
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Finding:
    rule: str
    line: int
    message: str


def check(cf: Containerfile) -> list[Finding]:
    """The findings for a parsed Containerfile, in line order, without those its check directive skips."""
    skip = _skipped(cf.check)
    if "all" in skip:
        return []
    out: list[Finding] = []
    add = out.append
    nodes = cf.nodes
    keywords = [n.original.split(None, 1)[0] for n in nodes if n.original.strip()]
    upper = sum(1 for k in keywords if k.isupper())
    lower = sum(1 for k in keywords if k.islower())
    majority = "uppercase" if upper >= lower else "lowercase"
    global_args: set[str] = set(PLATFORM_ARGS)
    stages: set[str] = set()
    in_stage = False
    absolute_workdir = False
    once: dict[str, int] = {}
    for n in nodes:
        word = n.original.split(None, 1)[0] if n.original.strip() else n.keyword
        if (majority == "uppercase" and not word.isupper()) or (majority == "lowercase" and not word.islower()):
            add(Finding("ConsistentInstructionCasing", n.start_line, _casing_msg(word, majority)))
        if n.keyword == "from":
            _check_from(n, word, global_args, stages, add)
            in_stage, absolute_workdir, once = True, False, {}
            continue
        if n.keyword == "arg":
            names = [a.split("=", 1)[0] for a in n.args]
            if not in_stage:
                global_args.update(names)
            for name in names:
                _secret(n, "ARG", name, add)
        elif n.keyword == "env":
            for i in range(0, len(n.args) - 2, 3):
                _secret(n, "ENV", n.args[i], add)
        if n.keyword in ("env", "label") and any(n.args[i + 2] == "" for i in range(0, len(n.args) - 2, 3)):
            kw = n.keyword.upper()
            add(
                Finding(
                    "LegacyKeyValueFormat",
                    n.start_line,
                    f'"{kw} key=value" should be used instead of legacy "{kw} key value" format',
                )
            )
        if n.keyword in ("cmd", "entrypoint") and not n.json_form:
            add(
                Finding(
                    "JSONArgsRecommended",
                    n.start_line,
                    f"JSON arguments recommended for {n.keyword.upper()} to prevent unintended behavior related "
                    "to OS signals",
                )
            )
        if n.keyword in ("cmd", "entrypoint", "healthcheck"):
            if n.keyword in once:
                add(
                    Finding(
                        "MultipleInstructionsDisallowed",
                        once[n.keyword],
                        f"Multiple {n.keyword.upper()} instructions should not be used in the same stage because "
                        "only the last one will be used",
                    )
                )
            once[n.keyword] = n.start_line
        if n.keyword == "maintainer":
            add(
                Finding(
                    "MaintainerDeprecated", n.start_line, "Maintainer instruction is deprecated in favor of using label"
                )
            )
        if n.keyword == "workdir" and n.args:
            path = n.args[0]
            if path.startswith("/") or path.startswith("$"):
                absolute_workdir = True
            elif not absolute_workdir:
                add(
                    Finding(
                        "WorkdirRelativePath",
                        n.start_line,
                        f"Relative workdir {_go_quote(path)} can have unexpected results if the base image changes",
                    )
                )
    out = [f for f in out if f.rule.lower() not in skip]
    return sorted(out, key=lambda f: f.line)


def _check_from(n: Node, word: str, global_args: set[str], stages: set[str], add: Callable[[Finding], None]) -> None:
    args = n.args
    if len(args) >= 3 and args[1].lower() == "as":
        as_word, name = args[1], args[2]
        if (word.isupper() and not as_word.isupper()) or (word.islower() and not as_word.islower()):
            add(Finding("FromAsCasing", n.start_line, f"'{as_word}' and '{word}' keywords' casing do not match"))
        if name != name.lower():
            add(Finding("StageNameCasing", n.start_line, f"Stage name '{name}' should be lowercase"))
        low = name.lower()
        if low in ("scratch", "context"):
            add(
                Finding(
                    "ReservedStageName", n.start_line, f"'{low}' is reserved and should not be used as a stage name"
                )
            )
        if low in stages:
            add(
                Finding(
                    "DuplicateStageName", n.start_line, f'Duplicate stage name "{low}", stage names should be unique'
                )
            )
        stages.add(low)
    texts = list(args[:1]) + [f.split("=", 1)[1] for f in n.flags if f.startswith("--platform=")]
    for text in texts:
        for m in _VAR.finditer(text):
            var = m.group(1) or m.group(2)
            if var not in global_args:
                add(Finding("UndefinedArgInFrom", n.start_line, f"FROM argument '{var}' is not declared"))
    for f in n.flags:
        if f in ("--platform=$TARGETPLATFORM", "--platform=${TARGETPLATFORM}"):
            add(
                Finding(
                    "RedundantTargetPlatform",
                    n.start_line,
                    "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default "
                    "behavior",
                )
            )


def _secret(n: Node, kind: str, name: str, add: Callable[[Finding], None]) -> None:
    if _SECRET.search(name) and not _NOT_SECRET.search(name):
        msg = f'Do not use ARG or ENV instructions for sensitive data ({kind} "{name}")'
        add(Finding("SecretsUsedInArgOrEnv", n.start_line, msg))


def _casing_msg(word: str, majority: str) -> str:
    return f"Command '{word}' should match the case of the command majority ({majority})"


def _go_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _skipped(directive: str | None) -> set[str]:
    """`# check=skip=A,B;error=true`: the lowercased rule names to skip ("all" for every rule)."""
    out: set[str] = set()
    for part in (directive or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key.strip() == "skip":
            out |= {v.strip().lower() for v in value.split(",") if v.strip()}
    return out
