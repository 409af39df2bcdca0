"""BuildKit's shell lexer: the shared expansion and word-splitting tables, and lex_test.go's cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from rootless.errors import RbuildError
from rootless.frontend.shell import Lexer, ShellError, go_quote

SHELL_DIR = Path(__file__).parent / "conformance" / "buildkit" / "shell"
ENV_VAR_TEST_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


def _env_var_cases() -> list[tuple[int, str, str]]:
    cases = []
    for n, line in enumerate((SHELL_DIR / "envVarTest").read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#") or not line.strip():
            continue
        platform, source, expected = (f.strip() for f in line.strip().split("|"))
        if platform in ("A", "U"):
            cases.append((n, source, expected))
    return cases


def _words_cases() -> list[tuple[int, str, list[str], dict[str, str]]]:
    cases = []
    env: dict[str, str] = {}
    for n, line in enumerate((SHELL_DIR / "wordsTest").read_text(encoding="utf-8").split("\n"), 1):
        if line.startswith("#") or not line:
            continue
        if line.startswith("ENV "):
            name, value = line[3:].lstrip(" ").split("=", 1)
            env[name] = value
            continue
        test, expected = line.split("|")
        cases.append((n, test.strip(), expected.lstrip(" ").split(","), dict(env)))
    return cases


ENV_VAR_CASES = _env_var_cases()
WORDS_CASES = _words_cases()


def test_tables_are_all_read() -> None:
    assert len(ENV_VAR_CASES) == 228
    assert len(WORDS_CASES) == 24


@pytest.mark.parametrize(("line", "source", "expected"), ENV_VAR_CASES, ids=[str(c[0]) for c in ENV_VAR_CASES])
def test_env_var_table(line: int, source: str, expected: str) -> None:
    lexer = Lexer("\\")
    if expected == "error":
        with pytest.raises(ShellError):
            lexer.expand(source, ENV_VAR_TEST_ENV)
    else:
        assert lexer.expand(source, ENV_VAR_TEST_ENV) == expected


@pytest.mark.parametrize(("line", "source", "expected", "env"), WORDS_CASES, ids=[str(c[0]) for c in WORDS_CASES])
def test_words_table(line: int, source: str, expected: list[str], env: dict[str, str]) -> None:
    try:
        got = Lexer("\\").expand_words(source, env)
    except ShellError:
        got = ["error"]
    assert got == expected


# lex_test.go TestProcessWithMatches: (input, env, expected or None for an error, matched, unmatched)
MATCH_CASES: list[tuple[str, dict[str, str], str | None, set[str], set[str]]] = [
    ("x", {"DUMMY": "dummy"}, "x", set(), set()),
    ("x ${UNUSED}", {"DUMMY": "dummy"}, "x ", set(), {"UNUSED"}),
    ("x ${FOO}", {"FOO": "y"}, "x y", {"FOO"}, set()),
    ("${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx  ccc", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx bbb ccc", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO:-}", {"FOO": "xxx", "BAR": ""}, "xxx", {"FOO"}, set()),
    ("${FOO:-}", {}, "", set(), {"FOO"}),
    ("${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa bbb ", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa  ", {"FOO", "BAR"}, {"BAZ"}),
    ("${FOO?aaa}", {"FOO": "xxx", "BAR": ""}, "xxx", {"FOO"}, set()),
    ("${BAR?bbb}", {"FOO": "xxx", "BAR": ""}, "", {"BAR"}, set()),
    ("${BAZ?ccc}", {"FOO": "xxx", "BAR": ""}, None, set(), set()),
    ("${FOO:?aaa}", {"FOO": "xxx", "BAR": ""}, "xxx", {"FOO"}, set()),
    ("${BAR:?bbb}", {"FOO": "xxx", "BAR": ""}, None, set(), set()),
    ("${BAZ:?ccc}", {"FOO": "xxx", "BAR": ""}, None, set(), set()),
    ("${BAZ:?}", {"FOO": "xxx", "BAR": ""}, None, set(), set()),
    ("${FOO=aaa}", {"FOO": "xxx", "BAR": ""}, None, set(), set()),
    ("${FOO=:aaa}", {"FOO": "xxx", "BAR": ""}, None, set(), set()),
    ("${FOO=}", {}, None, set(), set()),
    ("${FOO#()[]{\\}^$.\\*\\?|\\\\}", {"FOO": "()[]{}^$.*?|\\x"}, "x", {"FOO"}, set()),
    ("${FOO%%\\**}", {"FOO": "xx**"}, "xx", {"FOO"}, set()),
    ("${FOO#*x*y}", {"FOO": "xxyy"}, "y", {"FOO"}, set()),
    ("${FOO#*}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": "x"}, "xyy", {"FOO", "BAR"}, set()),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy", {"FOO", "BAR"}, set()),
    ("${FOO#}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO##*x}", {"FOO": "xxyy"}, "yy", {"FOO"}, set()),
    ("${FOO##}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO#?\\?}", {"FOO": "???y"}, "?y", {"FOO"}, set()),
    ("${ABC:-.}${FOO%x}${ABC:-.}", {"FOO": "xxyy"}, ".xxyy.", {"FOO"}, {"ABC"}),
    ("${FOO%%\\**\\*}", {"FOO": "a***yy*"}, "a", {"FOO"}, set()),
    ("${FOO%}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO%%$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy", {"FOO", "BAR"}, set()),
    ("${FOO:#}", {}, None, set(), set()),
    ("${FOO:##}", {}, None, set(), set()),
    ("${FOO:%}", {}, None, set(), set()),
    ("${FOO:%%}", {}, None, set(), set()),
    (
        "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
        {"FOO": "/foo*/*/*.txt", "NEEDLE": "\\*/"},
        "/foo.*/*.txt - /foo..*.txt",
        {"FOO", "NEEDLE"},
        set(),
    ),
    (
        "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
        {"FOO": "/tmp/tmp/bar.txt", "NEEDLE": "/tmp"},
        "/tmp/bar.txt - /bar.txt",
        {"FOO", "NEEDLE"},
        set(),
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
        {"FOO": "/a/foo/b/c.txt", "NEEDLE": "/?/", "REPLACEMENT": "/"},
        "/foo/b/c.txt - /foo/c.txt",
        {"FOO", "NEEDLE", "REPLACEMENT"},
        set(),
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT}",
        {"FOO": "http://google.de", "NEEDLE": "http://", "REPLACEMENT": "https://"},
        "https://google.de",
        {"FOO", "NEEDLE", "REPLACEMENT"},
        set(),
    ),
    ("${FOO//\\//\\/}", {"FOO": "/tmp/foo.txt"}, "\\/tmp\\/foo.txt", {"FOO"}, set()),
    ("${FOO/$BAR/ww}", {"FOO": "xxyy", "BAR": ""}, "wwxxyy", {"FOO", "BAR"}, set()),
    ("${FOO//ww}", {"FOO": "xxyy"}, None, set(), set()),
    ("${FOO//}", {"FOO": "xxyy"}, None, set(), set()),
    ("${FOO///}", {"FOO": "xxyy"}, "xxyy", {"FOO"}, set()),
    ("${FOO///}", {}, "", set(), {"FOO"}),
]


@pytest.mark.parametrize(("word", "env", "expected", "matched", "unmatched"), MATCH_CASES)
def test_process_with_matches(
    word: str, env: dict[str, str], expected: str | None, matched: set[str], unmatched: set[str]
) -> None:
    lexer = Lexer("\\")
    if expected is None:
        with pytest.raises(ShellError):
            lexer.expand(word, env)
        return
    result, got_matched, got_unmatched = lexer.expand_with_matches(word, env)
    assert (result, got_matched, got_unmatched) == (expected, matched, unmatched)


@pytest.mark.parametrize(
    ("envs", "expected"),
    [
        (
            {"VERSION": "v1.2.3", "TARGETOS": "linux", "TARGETARCH": "arm", "TARGETVARIANT": "v7"},
            "something-v1.2.3.linux-arm-v7.tar.gz",
        ),
        (
            {"VERSION": "v1.2.3", "TARGETOS": "linux", "TARGETARCH": "arm64", "TARGETVARIANT": ""},
            "something-v1.2.3.linux-arm64.tar.gz",
        ),
        ({"VERSION": "v1.2.3", "TARGETOS": "linux", "TARGETARCH": "arm64"}, "something-v1.2.3.linux-arm64.tar.gz"),
    ],
)
def test_platform_style_name(envs: dict[str, str], expected: str) -> None:
    word = "something-${VERSION}.${TARGETOS}-${TARGETARCH}${TARGETVARIANT:+-${TARGETVARIANT}}.tar.gz"
    assert Lexer().expand(word, envs) == expected


def test_mandatory_variables_messages() -> None:
    lexer = Lexer()
    assert lexer.expand("${VAR:?message here$ARG}", {"VAR": "plain", "ARG": "x"}) == "plain"
    for env in ({"VAR": "", "ARG": "x"}, {"ARG": "x"}):
        with pytest.raises(ShellError, match="VAR: message herex"):
            lexer.expand("${VAR:?message here$ARG}", env)
    assert lexer.expand("${VAR?message here$ARG}", {"VAR": "", "ARG": "x"}) == ""
    with pytest.raises(ShellError, match="VAR: message herex"):
        lexer.expand("${VAR?message here$ARG}", {"ARG": "x"})
    with pytest.raises(ShellError, match="VAR: is not allowed to be unset"):
        lexer.expand("${VAR?}", {})
    with pytest.raises(ShellError, match="VAR: is not allowed to be empty"):
        lexer.expand("${VAR:?}", {"VAR": ""})


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("${}", "bad substitution"),
        ("${:-x}", "bad substitution"),
        ("${v", "unsupported modifier"),
        ("${v:=x}", "unsupported modifier (:=) in substitution"),
        ("${v:x}", "unsupported modifier (:x) in substitution"),
        ("${v:#x}", "unsupported modifier (:#) in substitution"),
        ("${v:-x", "syntax error: missing '}'"),
        ("${v/a", "syntax error: missing '/' in ${}"),
        ("${v/a/b", "syntax error: missing '}'"),
        ("${", "syntax error: missing '}'"),
        ("'abc", "matching single-quote"),
        ('"abc', "matching double-quote"),
        ("${v#\\x}", "invalid pattern (\\x) in substitution: invalid escape '\\x'"),
    ],
)
def test_errors(word: str, message: str) -> None:
    with pytest.raises(ShellError) as e:
        Lexer().expand(word, {"v": "abc"})
    assert message in str(e.value)
    assert str(e.value).startswith(f"failed to process {go_quote(word)}: ")
    assert isinstance(e.value, RbuildError)


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("${v#a*}", "bcabc"),
        ("${v##a*}", ""),
        ("${v%b*}", "abca"),
        ("${v%%b*}", "a"),
        ("${v/b/X}", "aXcabc"),
        ("${v//b/X}", "aXcaXc"),
        ("${v//?/.}", "......"),
        ("${v/*/Z}", "Z"),
        ("${v//x*/Z}", "abcabc"),
        ("${v#\\*}", "abcabc"),
        ("${s//\\//-}", "-a-b"),
    ],
)
def test_pattern_operators(word: str, expected: str) -> None:
    assert Lexer().expand(word, {"v": "abcabc", "s": "/a/b"}) == expected


def test_positional_and_special_parameters_are_empty() -> None:
    lexer = Lexer()
    for p in ("1", "9", "0", "@", "*", "#", "?", "-", "$", "!"):
        assert lexer.expand(f"[${p}][${{{p}}}][${{{p}:-d}}]", {}) == "[][][d]"


def test_backtick_escape() -> None:
    lexer = Lexer("`")
    assert lexer.expand("a`$b\\c", {"b": "x"}) == "a$b\\c"
    assert lexer.expand('"`"q"', {}) == '"q'
    assert lexer.expand_words("a` b c", {}) == ["a b", "c"]


def test_quoted_expansions_stay_whole() -> None:
    env = {"x": "a  b", "e": ""}
    lexer = Lexer()
    assert lexer.expand_words("$x", env) == ["a", "b"]
    assert lexer.expand_words('"$x"', env) == ["a  b"]
    assert lexer.expand_words("'$x' $e ''", env) == ["$x"]
    assert lexer.expand_words(" lead  trail ", env) == ["lead", "trail"]


def test_words_buffer_is_shared_with_nested_substitutions() -> None:
    # BuildKit's ProcessWords resets its word buffer when a ${v:-w} is read: what the enclosing word
    # held before it is lost (only EXPOSE and here-document detection split words this way).
    assert Lexer().expand_words("ab${u:-c}d e", {}) == ["cd", "e"]
    assert Lexer().expand("ab${u:-c}d e", {}) == "abcd e"


def test_modes_used_for_heredoc_detection() -> None:
    raw = Lexer("\\", raw_quotes=True, raw_escapes=True, skip_unset_env=True)
    assert raw.expand_words("RUN <<'EOF' \"x y\" a\\ b $U ${U:-d} ${U/a/b}", {}) == [
        "RUN",
        "<<'EOF'",
        '"x y"',
        "a\\ b",
        "$U",
        "${U:-d}",
        "${U/a/b}",
    ]
    skip_quotes = Lexer("\\", skip_process_quotes=True)
    assert skip_quotes.expand("'$a' \"$a\" \\$a \\t", {"a": "1"}) == "'1' \"1\" $a t"


def test_non_ascii_and_odd_input() -> None:
    lexer = Lexer()
    assert lexer.expand("\ufeff$a", {"a": "1"}) == "1"  # a BOM at the start is skipped, like text/scanner
    assert lexer.expand("x\udcff", {}) == "x\ufffd"  # an undecodable byte reads as U+FFFD
    assert lexer.expand("${é}", {"é": "ok"}) == "ok"  # Unicode letters make names
    assert lexer.expand_words("a\u00a0b\u2003c", {}) == ["a", "b", "c"]  # Go's unicode.IsSpace
    assert lexer.expand_words("a\x1cb", {}) == ["a\x1cb"]  # ... which does not include U+001C


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("abc", '"abc"'),
        ('a"b\\c', '"a\\"b\\\\c"'),
        ("\x00\x07\x1b\x7f", '"\\x00\\a\\x1b\\x7f"'),
        ("\t\n\r\v\f\b", '"\\t\\n\\r\\v\\f\\b"'),
        ("♥ é", '"♥ é"'),
        ("\u00a0\u200b", '"\\u00a0\\u200b"'),
        ("\U0001f600\U000e0001", '"\U0001f600\\U000e0001"'),
        ("\udcff\udc80", '"\\xff\\x80"'),
    ],
)
def test_go_quote(s: str, expected: str) -> None:
    assert go_quote(s) == expected
