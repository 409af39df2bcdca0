"""The Containerfile parser against BuildKit's parser fixtures and its parser_*_test.go rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rootless.errors import ContainerfileError
from rootless.frontend.containerfile import (
    MAX_LINE,
    Containerfile,
    Heredoc,
    Node,
    chomp_heredoc_content,
    dump,
    parse,
    parse_heredoc,
)

PARSER_DIR = Path(__file__).parent / "conformance" / "buildkit" / "parser"
POSITIVE = sorted(p.name for p in (PARSER_DIR / "testfiles").iterdir())
NEGATIVE = sorted(p.name for p in (PARSER_DIR / "testfiles-negative").iterdir())


def dumps(text: str | bytes) -> str:
    return dump(parse(text, "Containerfile"))


def error(text: str | bytes) -> ContainerfileError:
    with pytest.raises(ContainerfileError) as e:
        parse(text, "Containerfile")
    return e.value


# --- the shared fixtures -----------------------------------------------------------------------------


def test_fixture_sets_are_present() -> None:
    assert len(POSITIVE) == 12 and len(NEGATIVE) == 2


@pytest.mark.parametrize("name", POSITIVE)
def test_parser_fixture(name: str) -> None:
    data = (PARSER_DIR / "testfiles" / name / "Dockerfile").read_bytes()
    expected = (PARSER_DIR / "testfiles" / name / "result").read_bytes().decode("utf-8")
    assert dump(parse(data, "Dockerfile")) == expected


@pytest.mark.parametrize("name", NEGATIVE)
def test_negative_fixture(name: str) -> None:
    data = (PARSER_DIR / "testfiles-negative" / name / "Dockerfile").read_bytes()
    with pytest.raises(ContainerfileError) as e:
        parse(data, "Dockerfile")
    assert str(e.value).startswith("Dockerfile:1: ")


# --- directives --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "escape", "syntax", "check"),
    [
        ("FROM a\n", "\\", None, None),
        ("# escape=`\nFROM a\n", "`", None, None),
        ("#escape = `\nFROM a\n", "`", None, None),
        ("  # ESCAPE=`\nFROM a\n", "`", None, None),
        ("# escape=\\\nFROM a\n", "\\", None, None),
        ("# syntax=docker/dockerfile:1\n# escape=`\nFROM a\n", "`", "docker/dockerfile:1", None),
        ("# check=skip=JSONArgsRecommended;error=true\nFROM a\n", "\\", None, "skip=JSONArgsRecommended;error=true"),
        ("# comment\n# escape=`\nFROM a\n", "\\", None, None),  # a comment ends the directives
        ("\n# escape=`\nFROM a\n", "\\", None, None),  # so does a blank line
        ("FROM a\n# escape=`\n", "\\", None, None),  # and an instruction
        ("# foo=bar\n# escape=`\nFROM a\n", "\\", None, None),  # an unknown directive is a comment
        ("#!/bin/sh\n# escape=`\nFROM a\n", "\\", None, None),  # a shebang line is a comment
        ("\ufeff# escape=`\nFROM a\n", "`", None, None),  # after a BOM
        ("# escape=`\r\nFROM a\r\n", "`", None, None),  # CRLF
    ],
)
def test_directives(text: str, escape: str, syntax: str | None, check: str | None) -> None:
    cf = parse(text.encode(), "Containerfile")
    assert (cf.escape, cf.syntax, cf.check) == (escape, syntax, check)


@pytest.mark.parametrize(
    ("text", "syntax", "check"),
    [
        ("# syntax = dockerfile:experimental // opts\nFROM busybox\n", "dockerfile:experimental", None),
        ("#!/bin/sh\n# syntax = x\n# check = skip=all // opts\nFROM b\n", "x", "skip=all"),
        ("#!/bin/sh\n\n# syntax = x\nFROM b\n", None, None),
        ("//syntax=foo\n//key=value\n", "foo", None),
        ('{"syntax": "foo"}', "foo", None),
        ('{"syntax": "foo"', None, None),
        ("\ufeff# syntax = myfrontend\nFROM busybox\n", "myfrontend", None),
    ],
)
def test_frontend_directives(text: str, syntax: str | None, check: str | None) -> None:
    # BuildKit's frontend reads syntax and check with DetectSyntax/ParseDirective (directives_test.go)
    cf = parse(text.encode())
    assert (cf.syntax, cf.check) == (syntax, check)


def test_syntax_directive_is_noted_in_warnings() -> None:
    cf = parse("# syntax=docker/dockerfile:1.7\nFROM a\n")
    assert any("ignoring the syntax directive" in w and "docker/dockerfile:1.7" in w for w in cf.warnings)
    assert parse("FROM a\n").warnings == []


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("# escape=`\n# escape=\\\nFROM a\n", "only one escape parser directive can be used", 2),
        ("# syntax=a\n# syntax=b\nFROM a\n", "only one syntax parser directive can be used", 2),
        ("# check=a\n# CHECK=b\nFROM a\n", "only one check parser directive can be used", 2),
        ("# escape=x\nFROM a\n", "invalid escape token 'x' does not match ` or \\", 1),
    ],
)
def test_directive_errors(text: str, message: str, line: int) -> None:
    e = error(text)
    assert message in str(e)
    assert e.line == line and e.filename == "Containerfile"


def test_backtick_escape_changes_continuation_and_words() -> None:
    assert (
        dumps("# escape=`\nFROM a\nRUN dir c:\\ `\n  && echo hi\nENV A=b` c\n")
        == '(from "a")\n(run "dir c:\\\\   && echo hi")\n(env "A" "b` c" "=")\n'
    )


# --- lines, continuations, comments --------------------------------------------------------------------


def test_continuations_skip_comment_and_blank_lines_and_warn() -> None:
    text = "FROM a\nRUN one \\\n# comment\n\n   two \\\n  # indented comment\n  three\nRUN x\n"
    cf = parse(text)
    assert dump(cf) == '(from "a")\n(run "one    two   three")\n(run "x")\n'
    run = cf.nodes[1]
    assert (run.start_line, run.end_line) == (2, 7)
    assert run.original == "RUN one    two   three"
    assert any("Empty continuation line found in: RUN one    two   three" in w for w in cf.warnings)
    assert cf.warnings[-1] == "Empty continuation lines will become errors in a future release."


def test_line_numbers() -> None:
    text = "\n\n# c\nFROM a\n\nRUN a \\\n  b\n\nCOPY <<EOF /x\nbody\nEOF\nRUN c\n"
    cf = parse(text)
    assert [(n.keyword, n.start_line, n.end_line) for n in cf.nodes] == [
        ("from", 4, 4),
        ("run", 6, 7),
        ("copy", 9, 11),
        ("run", 12, 12),
    ]


def test_crlf_and_bom() -> None:
    cf = parse(b"\xef\xbb\xbfFROM a\r\nRUN a \\\r\n  b\r\nENV x=y\r\n")
    assert dump(cf) == '(from "a")\n(run "a   b")\n(env "x" "y" "=")\n'


def test_whitespace_and_comments_around_instructions() -> None:
    assert dumps("   FROM   a  \n\t# comment\n  RUN   x  ") == '(from "a")\n(run "x")\n'
    assert dumps("FROM a # not a comment\n") == '(from "a" "#" "not" "a" "comment")\n'


def test_continuation_at_end_of_file_and_lone_escape() -> None:
    assert dumps("FROM a\nRUN x \\") == '(from "a")\n(run "x")\n'
    assert dumps("FROM a\nRUN x \\\n") == '(from "a")\n(run "x")\n'
    assert dumps("FROM a\n\\\nRUN x\n") == '(from "a")\n(run "x")\n'
    assert dumps("FROM a\nRUN x \\\\\n") == '(from "a")\n(run "x \\\\\\\\")\n'  # escaped escape


@pytest.mark.parametrize(
    "text", [b"", b"\n\n", b"# just a comment\n", b"  \n# a\n\t\n", b"\xef\xbb\xbf", b"# syntax=docker/dockerfile:1\n"]
)
def test_no_instructions_is_an_error(text: bytes) -> None:
    assert "file with no instructions" in str(error(text))


def test_line_length_limit() -> None:
    ok = b"FROM a\nLABEL x=" + b"a" * (MAX_LINE - 9) + b"\n"
    assert len(ok.split(b"\n")[1]) == MAX_LINE - 1
    assert len(parse(ok).nodes) == 2
    e = error(b"FROM a\nLABEL x=" + b"a" * (MAX_LINE - 8) + b"\n")
    assert "dockerfile line greater than max allowed size of 65535" in str(e) and e.line == 2
    e = error(b"FROM a\nLABEL x=" + b"a" * (MAX_LINE - 8))  # a last line without newline
    assert e.line == 2
    assert "greater than max allowed size" in str(error(b"a" * (MAX_LINE + 5)))


# --- instructions, arguments and the dump format ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FOO bar", '(foo "")'),
        ("foo", '(foo "")'),
        ("from A AS b", '(from "A" "AS" "b")'),
        ("ONBUILD RUN echo test", '(onbuild (run "echo test"))'),
        ("ONBUILD ONBUILD RUN x", '(onbuild (onbuild (run "x")))'),
        ("ONBUILD --a=b COPY --from=x a b", '(onbuild ["--a=b"] (copy ["--from=x"] "a" "b"))'),
        ("ONBUILD", "(onbuild)"),
        ("CMD", "(cmd)"),
        ("RUN", "(run)"),
        ("HEALTHCHECK NONE", '(healthcheck "NONE")'),
        ("ENV", "(env)"),
        ('ARG a b=c "d e"=f', '(arg "a" "b=c" "\\"d e\\"=f")'),
        ("EXPOSE 80  443/udp", '(expose "80" "443/udp")'),
        ("VOLUME /a /b", '(volume "/a" "/b")'),
        ('VOLUME ["/a", "/b"]', '(volume "/a" "/b")'),
        ("USER  me:grp  ", '(user "me:grp")'),
        ("MAINTAINER A <a@b>", '(maintainer "A <a@b>")'),
        ("STOPSIGNAL SIGKILL", '(stopsignal "SIGKILL")'),
        ("WORKDIR /a b", '(workdir "/a b")'),
        ('SHELL ["/bin/sh", "-c"]', '(shell "/bin/sh" "-c")'),
        ('LABEL a=b "c d"="e f" g=\'h\'', '(label "a" "b" "=" "\\"c d\\"" "\\"e f\\"" "=" "g" "\'h\'" "=")'),
        ("ENV A B C", '(env "A" "B C" "")'),
        ('ENV A="unterminated', '(env "A" "\\"unterminated" "=")'),
        ('RUN\techo\t"x"', '(run "echo\\t\\"x\\"")'),
        ("COPY a\xa0b c", '(copy "a\\u00a0b" "c")'),
        ("FROM a\x00b", '(from "a\\x00b")'),
    ],
)
def test_dump(text: str, expected: str) -> None:
    assert dumps(text) == expected + "\n"


def test_invalid_utf8_is_kept_byte_for_byte_in_the_dump() -> None:
    assert dumps(b"FROM \xff\xfeimage\n") == '(from "\\xff\\xfeimage")\n'
    assert dumps(b'RUN ["\xff"]\n') == '(run "\ufffd")\n'  # encoding/json replaces bad bytes


def test_node_fields() -> None:
    cf = parse('FROM a\nCOPY --from=b --chown=1:1 x /y\nCMD ["a"]\nONBUILD RUN x\n', "F")
    copy, cmd, onbuild = cf.nodes[1:]
    assert copy == Node(
        "copy", ["x", "/y"], ["--from=b", "--chown=1:1"], "COPY --from=b --chown=1:1 x /y", 2, 2, False, [], None
    )
    assert cmd.json_form and cmd.args == ["a"]
    assert onbuild.next is not None and onbuild.next.keyword == "run" and onbuild.next.original == "RUN x"
    assert isinstance(cf, Containerfile) and cf.filename == "F"


# --- JSON (exec) form ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "items"),
    [
        ("[]", []),
        ('[""]', [""]),
        ('["a"]', ["a"]),
        ('["a","b"]', ["a", "b"]),
        ('[ "a", "b" ]', ["a", "b"]),
        ('[\t"a",\t"b"\t]', ["a", "b"]),
        ('\t[\t"a",\t"b"\t]\t', ["a", "b"]),
        (
            '["abc 123", "♥", "☃", "\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0000"]',
            ["abc 123", "♥", "☃", '" \\ / \b \f \n \r \t \x00'],
        ),
        ('["\\ud83d\\ude00", "\\ud800", "\\udc00x"]', ["\U0001f600", "\ufffd", "\ufffdx"]),
    ],
)
def test_json_arrays_of_strings(array: str, items: list[str]) -> None:
    node = parse("CMD " + array).nodes[0]
    assert node.json_form and node.args == items


@pytest.mark.parametrize(
    "array",
    [
        '["a",42,"b"]',
        '["a",123.456,"b"]',
        '["a",{},"b"]',
        '["a",{"c": "d"},"b"]',
        '["a",["c"],"b"]',
        '["a",true,"b"]',
        '["a",false,"b"]',
        '["a",null,"b"]',
        "[[" * 50 + "]]" * 50,
    ],
)
def test_json_array_with_non_strings_is_an_error(array: str) -> None:
    e = error("FROM a\nRUN " + array)
    assert "when using JSON array syntax, arrays must be comprised of strings only" in str(e)
    assert e.line == 2


@pytest.mark.parametrize(
    "text",
    [
        '["a"',
        "['a']",
        '["a"] b',
        '["a",]',
        '["a" "b"]',
        "[NaN]",
        '["\t"]',
        '["\\x"]',
        '["a"]]',
        "[01]",
        '["a"],',
        "[" * 10001 + "]" * 10001,
    ],
)
def test_invalid_json_falls_back_to_shell_form(text: str) -> None:
    node = parse("RUN " + text).nodes[0]
    assert not node.json_form and node.args == [text]


def test_json_form_for_list_instructions_and_healthcheck() -> None:
    assert (
        dumps('COPY ["a b", "c"]\nCOPY [ "x" y\nHEALTHCHECK CMD ["a", "b"]\n')
        == '(copy "a b" "c")\n(copy "[" "\\"x\\"" "y")\n(healthcheck "CMD" "a" "b")\n'
    )
    assert parse('HEALTHCHECK CMD ["a"]').nodes[0].json_form


# --- flags -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "flags", "args"),
    [
        ("COPY --a=b --c x y", ["--a=b", "--c"], ["x", "y"]),
        ("COPY --a=b -- --c x", ["--a=b"], ["--c", "x"]),
        ("COPY -- x y", [], ["x", "y"]),
        ("COPY x --a=b y", [], ["x", "--a=b", "y"]),
        ("COPY -a x y", [], ["-a", "x", "y"]),
        ('RUN --mount=type=bind,source="a b" x', ["--mount=type=bind,source=a b"], ["x"]),
        ("RUN --a='q\\'x' y", ["--a=q'x"], ["y"]),
        ("RUN --a=b\\ c y", ["--a=b c"], ["y"]),
        ('RUN --a="" y', ["--a="], ["y"]),
        ("RUN --", [], []),
        ("RUN --a", ["--a"], []),
        ("FROM --platform=linux/amd64 a AS b", ["--platform=linux/amd64"], ["a", "AS", "b"]),
        ("RUN --a=é x", ["--a=Ã©"], ["x"]),  # BuildKit reads flag bytes as runes (Latin-1)
    ],
)
def test_flags(text: str, flags: list[str], args: list[str]) -> None:
    node = parse(text).nodes[0]
    assert (node.flags, node.args) == (flags, args)


def test_flag_dump_format() -> None:
    assert (
        dumps('COPY --user=me --doit=true foo /tmp/\nCMD --doit [ "a", "b" ]\n')
        == '(copy ["--user=me" "--doit=true"] "foo" "/tmp/")\n(cmd ["--doit"] "a" "b")\n'
    )


# --- here-documents (parser_heredoc_test.go) ------------------------------------------------------------

HEREDOC_FILE = """
FROM alpine:3.6

ENV NAME=me

RUN ls

USER <<INVALID
INVALID

RUN <<EMPTY
EMPTY

RUN 3<<EMPTY2
EMPTY2

RUN "<<NOHEREDOC"

RUN <<INDENT
\tfoo
\tbar
INDENT

RUN <<-UNINDENT
\tbaz
\tquux
UNINDENT

RUN <<-UNINDENT2
\tbaz
\tquux
\tUNINDENT2

RUN <<-EXPAND
\texpand $NAME
EXPAND

RUN <<-'NOEXPAND'
\tdon't expand $NAME
NOEXPAND

RUN <<COPY
echo hello world
echo foo bar
COPY

RUN <<COMMENT
# internal comment
echo hello world
echo foo bar # trailing comment
COMMENT

RUN --mount=type=cache,target=/foo <<MOUNT
echo hello
MOUNT

COPY <<FILE1 <<FILE2 /dest
content 1
FILE1
content 2
FILE2

COPY <<X <<Y /dest
Y
X
X
Y
\t"""

HEREDOC_EXPECTED: list[list[Heredoc]] = [
    [],
    [],
    [],
    [],  # ENV, RUN ls, USER <<INVALID, INVALID
    [Heredoc("EMPTY", "", True, False, 0)],
    [Heredoc("EMPTY2", "", True, False, 3)],
    [],
    [Heredoc("INDENT", "\tfoo\n\tbar\n", True, False, 0)],
    [Heredoc("UNINDENT", "\tbaz\n\tquux\n", True, True, 0)],
    [Heredoc("UNINDENT2", "\tbaz\n\tquux\n", True, True, 0)],
    [Heredoc("EXPAND", "\texpand $NAME\n", True, True, 0)],
    [Heredoc("NOEXPAND", "\tdon't expand $NAME\n", False, True, 0)],
    [Heredoc("COPY", "echo hello world\necho foo bar\n", True, False, 0)],
    [Heredoc("COMMENT", "# internal comment\necho hello world\necho foo bar # trailing comment\n", True, False, 0)],
    [Heredoc("MOUNT", "echo hello\n", True, False, 0)],
    [Heredoc("FILE1", "content 1\n", True, False, 0), Heredoc("FILE2", "content 2\n", True, False, 0)],
    [Heredoc("X", "Y\n", True, False, 0), Heredoc("Y", "X\n", True, False, 0)],
]


def test_parse_extracts_heredocs() -> None:
    cf = parse(HEREDOC_FILE)
    assert len(cf.nodes) == len(HEREDOC_EXPECTED) + 1
    for node, expected in zip(cf.nodes[1:], HEREDOC_EXPECTED, strict=True):
        assert node.heredocs == expected, node.original


def test_json_form_has_no_heredocs() -> None:
    cf = parse('FROM a\nRUN ["whoami"]\nRUN ["<<EOF"]\nRUN ["<<\'EOF\'"]\n')
    assert all(n.heredocs == [] for n in cf.nodes)


def test_heredoc_only_on_run_copy_add_and_onbuild() -> None:
    cf = parse("FROM a\nADD <<A /a\na\nA\nONBUILD RUN <<B\nb\nB\nLABEL x=<<C\nRUN y\n")
    assert [len(n.heredocs) for n in cf.nodes] == [0, 1, 1, 0, 0]
    assert cf.nodes[2].heredocs[0].content == "b\n"


def test_heredoc_keeps_line_endings_and_needs_exact_delimiter() -> None:
    cf = parse(b"FROM a\r\nRUN <<EOF\r\nline\r\n EOF\r\nEOF\r\nRUN <<-E\n\t\tx\n\t\tE\n")
    assert cf.nodes[1].heredocs[0].content == "line\r\n EOF\r\n"
    assert cf.nodes[2].heredocs[0] == Heredoc("E", "\t\tx\n", True, True, 0)
    assert chomp_heredoc_content("\thello\n\t\tworld\n x\n") == "hello\nworld\n x\n"


def test_heredoc_with_shebang_and_several_per_line() -> None:
    cf = parse("FROM a\nRUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\nRUN cat <<A 3<<B > /x\na\nA\nb\nB\n")
    assert cf.nodes[1].heredocs[0].content.startswith("#!")
    assert [(h.name, h.file_descriptor) for h in cf.nodes[2].heredocs] == [("A", 0), ("B", 3)]


@pytest.mark.parametrize(
    ("word", "name", "expand", "chomp", "fd"),
    [
        ("<<EOF", "EOF", True, False, 0),
        ("<<'EOF'", "EOF", False, False, 0),
        ('<<"EOF"', "EOF", False, False, 0),
        ("<<-EOF", "EOF", True, True, 0),
        ("<<-'EOF'", "EOF", False, True, 0),
        ('<<-"EOF"', "EOF", False, True, 0),
        ("12<<EOF", "EOF", True, False, 12),
        ("<<E'O'F", "EOF", False, False, 0),
        ("<<$X", "$X", True, False, 0),
    ],
)
def test_parse_heredoc_helper(word: str, name: str, expand: bool, chomp: bool, fd: int) -> None:
    assert parse_heredoc(word) == Heredoc(name, "", expand, chomp, fd)


@pytest.mark.parametrize("word", ["", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "a<<EOF", "<<a b"])
def test_not_heredocs(word: str) -> None:
    assert parse_heredoc(word) is None


def test_heredocs_in_quotes_are_not_heredocs() -> None:
    cf = parse("FROM a\nRUN '<<EOF'\nRUN \"<<EOF\"\n")
    assert [n.heredocs for n in cf.nodes] == [[], [], []]


def test_unterminated_heredoc() -> None:
    e = error("FROM a\nRUN <<EOF\necho\n")
    assert "unterminated heredoc" in str(e) and e.line == 2
    assert 'in "RUN <<EOF"' in str(e)
    assert "unterminated heredoc" in str(error("FROM a\nCOPY <<A <<B /x\na\nA\nb\n"))


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("FROM a\nENV x", "ENV must have two arguments", 2),
        ("FROM a\nLABEL x", "LABEL must have two arguments", 2),
        ("FROM a\nENV a=b c", 'Syntax error - can\'t find = in "c". Must be of the form: name=value', 2),
        ('FROM a\n\nRUN a \\\n b [1]\nCMD ["a", 1]', "when using JSON array syntax", 5),
    ],
)
def test_parse_errors(text: str, message: str, line: int) -> None:
    e = error(text)
    assert message in str(e)
    assert str(e).startswith(f"Containerfile:{line}: ")


def test_error_quotes_the_instruction() -> None:
    assert (
        str(error('FROM a\nCMD ["a", [1]]\n'))
        == "Containerfile:2: when using JSON array syntax, arrays must be comprised of strings only in "
        '"CMD [\\"a\\", [1]]"'
    )


def test_str_input_is_accepted() -> None:
    assert dump(parse("FROM a\n")) == dump(parse(b"FROM a\n")) == '(from "a")\n'


# --- the `rbuild parse` command --------------------------------------------------------------------------


def _has_parse_command() -> bool:
    try:
        from rootless.cli import main as cli
    except ImportError:
        return False
    return "parse" in cli.build_parser().format_help()


@pytest.mark.skipif(not _has_parse_command(), reason="the `rbuild parse` subcommand is not wired yet")
def test_cli_parse(tmp_path: Path) -> None:
    src = PARSER_DIR / "testfiles" / "env" / "Dockerfile"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    run = subprocess.run(
        [sys.executable, "-m", "rootless", "parse", "-f", str(src)], capture_output=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == (PARSER_DIR / "testfiles" / "env" / "result").read_bytes()
    run = subprocess.run(
        [sys.executable, "-m", "rootless", "parse", "-f", "-"],
        input=b"FOO bar\n",
        capture_output=True,
        env=env,
        cwd=tmp_path,
    )
    assert (run.returncode, run.stdout) == (0, b'(foo "")\n')
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM a\nRUN <<EOF\nx\n")
    run = subprocess.run([sys.executable, "-m", "rootless", "parse"], capture_output=True, env=env, cwd=tmp_path)
    assert run.returncode == 1 and run.stdout == b""
    lines = run.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Containerfile:2: unterminated heredoc" in lines[0]
