"""Property tests: whatever the input, the parser, the instruction checks and the lexer either succeed
or raise the project's own error (ContainerfileError / ShellError), never anything else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rootless.errors import ContainerfileError
from rootless.frontend.containerfile import dump, parse
from rootless.frontend.instructions import RunCmd, parse_instruction
from rootless.frontend.shell import Lexer, ShellError

# Pieces that steer random text into the parser's and lexer's interesting corners.
TOKENS = [
    "FROM",
    "RUN",
    "COPY",
    "ADD",
    "ENV",
    "LABEL",
    "ARG",
    "ONBUILD",
    "HEALTHCHECK",
    "CMD",
    "SHELL",
    "EXPOSE",
    "VOLUME",
    "USER",
    "WORKDIR",
    "STOPSIGNAL",
    "MAINTAINER",
    "ENTRYPOINT",
    "from",
    "bogus",
    "AS",
    "NONE",
    " ",
    "  ",
    "\t",
    "\n",
    "\n",
    "\r\n",
    "\\",
    "\\\n",
    "`",
    "#",
    "# escape=`\n",
    "# escape=\\\n",
    "# syntax=x\n",
    "# check=skip=all\n",
    "<<",
    "<<-",
    "3<<",
    "EOF",
    "\nEOF\n",
    "'",
    '"',
    "$",
    "${",
    "}",
    ":-",
    ":+",
    ":?",
    "?",
    "%",
    "%%",
    "##",
    "/",
    "//",
    "*",
    "[",
    "]",
    ",",
    "=",
    "--",
    "--mount=",
    "--from=",
    "--chown=",
    "--chmod=",
    "--link",
    "--network=",
    "--security=",
    "--interval=",
    "--retries=",
    "--platform=",
    "type=cache",
    "type=secret",
    "target=/t",
    "from=x",
    "a",
    "b",
    "x y",
    "1",
    "1s",
    "\xa0",
    "é",
    "\x00",
    "\ufeff",
    "\u2028",
    "{",
    "true",
    "null",
    '["a"]',
    '["a", 1]',
    "[[",
    "]]",
]

source = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
words = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(TOKENS), max_size=15).map("".join))
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_everything(data: bytes | str) -> None:
    try:
        cf = parse(data, "Containerfile")
    except ContainerfileError:
        return
    assert dump(cf).count("\n") == len(cf.nodes)
    lexer = Lexer(cf.escape)
    for node in cf.nodes:
        try:
            cmd = parse_instruction(node, "Containerfile")
            cmd = cmd.expand(lexer, {"a": "x y", "b": "", "PATH": "/bin"})
            if isinstance(cmd, RunCmd):
                cmd.mount_specs()
        except ContainerfileError:
            pass


@FUZZ
@given(source)
def test_parser_on_containerfile_like_text(text: str) -> None:
    _check_everything(text)


@FUZZ
@given(st.binary(max_size=200))
def test_parser_on_arbitrary_bytes(data: bytes) -> None:
    _check_everything(data)


@FUZZ
@given(st.text(max_size=200))
def test_parser_on_arbitrary_text(text: str) -> None:
    _check_everything(text)


@FUZZ
@given(words, st.sampled_from(["\\", "`"]), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_lexer_raises_only_shell_errors(
    word: str, escape: str, raw_quotes: bool, raw_escapes: bool, skip_quotes: bool, skip_unset: bool
) -> None:
    lexer = Lexer(
        escape,
        raw_quotes=raw_quotes,
        raw_escapes=raw_escapes,
        skip_process_quotes=skip_quotes,
        skip_unset_env=skip_unset,
    )
    env = {"a": "x  y", "b": "", "c": "*?"}
    for fn in (lexer.expand, lexer.expand_words):
        try:
            fn(word, env)
        except ShellError:
            pass


@FUZZ
@given(words)
def test_expand_is_words_joined_when_nothing_is_quoted(word: str) -> None:
    # Without quotes, escapes or substitutions, splitting then joining is splitting the expansion.
    # (A leading BOM is skipped once per lexer pass, as Go's text/scanner does, so it is left out here.)
    if any(c in word for c in "'\"\\$") or word.startswith("\ufeff"):
        return
    lexer = Lexer()
    assert lexer.expand_words(word, {}) == lexer.expand_words(lexer.expand(word, {}), {})
