"""The Containerfile parser: BuildKit's Dockerfile parser (frontend 1.20 stable syntax) in Python.

It follows moby/buildkit frontend/dockerfile/parser (parser.go, line_parsers.go, split_command.go,
directives.go) closely enough that `dump()` prints what BuildKit's `Node.Dump()` prints, byte for byte,
quirks included.  Like BuildKit's parser it accepts unknown instructions and any flags; judging those
is `rootless.frontend.instructions`' job.  Input bytes that are not UTF-8 are carried as surrogate escapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rootless.errors import ContainerfileError
from rootless.frontend.shell import GO_SPACES, Lexer, ShellError, go_quote

__all__ = [
    "Heredoc",
    "Node",
    "Containerfile",
    "parse",
    "dump",
    "parse_heredoc",
    "chomp_heredoc_content",
    "go_lower",
    "quote_instruction",
]

MAX_LINE = 65536  # bufio.MaxScanTokenSize: a line, newline included, must fit in it


@dataclass
class Heredoc:
    """A here-document attached to RUN, COPY or ADD (`<<EOF` ... `EOF`)."""

    name: str
    content: str  # the body lines with their original line endings; tabs are not yet stripped for <<-
    expand: bool  # False when any part of the delimiter word was quoted
    chomp: bool  # <<- : leading tabs are stripped from the body (and allowed before the delimiter)
    file_descriptor: int  # the N of N<<EOF, 0 when absent


@dataclass
class Node:
    """One instruction, as BuildKit's parser sees it."""

    keyword: str  # lowercase, e.g. "run"
    args: list[str]  # exactly what the dump shows (ENV/LABEL as key,value,sep triples)
    flags: list[str]  # raw, e.g. ["--from=build", "--chown=1:1"]
    original: str  # the instruction text, continuation lines joined as BuildKit does
    start_line: int  # 1-based
    end_line: int  # last line, here-document bodies included
    json_form: bool  # exec (JSON array) form
    heredocs: list[Heredoc] = field(default_factory=list)
    next: Node | None = None  # ONBUILD's nested instruction


@dataclass
class Containerfile:
    nodes: list[Node]
    filename: str
    escape: str
    syntax: str | None
    warnings: list[str]
    check: str | None = None  # the `# check=` directive, for the linter


# --- small Go-compatible helpers ------------------------------------------------------------------

_ASCII_WS_SPLIT = re.compile("[\t\v\f\r ]+")  # BuildKit's reWhitespace
_DIRECTIVE = re.compile("#[\t\n\f\r ]*([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.+?)[\t\n\f\r ]*\\Z", re.DOTALL)
_HEREDOC = re.compile("([0-9]*)<<(-?)([^<]*)\\Z", re.DOTALL)
_LEADING_TABS = re.compile("^\t+", re.MULTILINE)
_SPACE_SET = frozenset(GO_SPACES)
_ASCII_SPACE_RUN = re.compile("[\t\n\v\f\r ]+")
_WORDS_SPECIAL = re.compile("['\"\\\\`\x1c-\x1f]")


def _word_regex(escape: str) -> re.Pattern[str]:
    sp = re.escape(GO_SPACES)
    e = re.escape(escape)
    return re.compile(f"(?:[^{sp}'\"{e}]|{e}.|'[^']*(?:'|\\Z)|\"(?:[^\"{e}]|{e}.)*(?:\"|\\Z))+", re.DOTALL)


_WORD_RE = {"\\": _word_regex("\\"), "`": _word_regex("`")}
_LEXER_SPECIAL = re.compile("['\"\\\\$\x1c-\x1f]")  # what the shell lexer may change (escape \\)
_SIMPLE_FLAG = re.compile("--[^\t\n\v\f\r '\"\\\\`]*")
_SPACE_BYTES = frozenset(b"\t\n\v\f\r \x85\xa0")  # unicode.IsSpace(rune(b)) for one byte
_NOT_STRINGS = "when using JSON array syntax, arrays must be comprised of strings only"


def go_lower(s: str) -> str:
    """Go's strings.ToLower (one rune per rune; undecodable bytes become U+FFFD)."""
    if s.isascii():
        return s.lower()
    out = []
    for c in s:
        if "\ud800" <= c <= "\udfff":
            out.append("\ufffd")
            continue
        lc = c.lower()
        out.append(lc if len(lc) == 1 else ("i" if c == "\u0130" else c))
    return "".join(out)


def _go_trim_space(s: str) -> str:
    return s.strip(GO_SPACES)


def _fix_runes(s: str) -> str:
    """Undecodable bytes read as U+FFFD, as Go's utf8.DecodeRune reads them."""
    if s.isascii():
        return s
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s)


def quote_instruction(text: str, limit: int = 120) -> str:
    """An instruction's text for an error message: quoted, and shortened when very long."""
    text = _go_trim_space(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return go_quote(text)


def _err(message: str, filename: str, line: int, text: str | None = None) -> ContainerfileError:
    if text is not None:
        message = f"{message} in {quote_instruction(text)}"
    return ContainerfileError(message, filename, max(line, 1))


class _ParseError(Exception):
    """A fault found while reading one instruction; located by the caller."""


# --- JSON arrays (Go's encoding/json rules) -----------------------------------------------------

_JSON_WS = " \t\n\r"
_JSON_ESC = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_HEX4 = re.compile("[0-9a-fA-F]{4}")
_MAX_DEPTH = 10000  # encoding/json's maxNestingDepth


class _NotJSON(Exception):
    pass


def _json_string(s: str, i: int) -> tuple[str, int]:
    """Decode the JSON string starting at s[i] == '"'; return it and the index after it."""
    out = []
    i += 1
    n = len(s)
    while True:
        j = i
        while j < n and s[j] not in '"\\' and s[j] >= " ":
            j += 1
        out.append(s[i:j])
        if j >= n or s[j] < " ":
            raise _NotJSON
        if s[j] == '"':
            return _fix_runes("".join(out)), j + 1
        # backslash
        if j + 1 >= n:
            raise _NotJSON
        c = s[j + 1]
        if c in _JSON_ESC:
            out.append(_JSON_ESC[c])
            i = j + 2
            continue
        if c != "u" or not _HEX4.fullmatch(s, j + 2, j + 6):
            raise _NotJSON
        r = int(s[j + 2 : j + 6], 16)
        i = j + 6
        if 0xD800 <= r < 0xDC00 and s.startswith("\\u", i) and _HEX4.fullmatch(s, i + 2, i + 6):
            r2 = int(s[i + 2 : i + 6], 16)
            if 0xDC00 <= r2 < 0xE000:
                r = 0x10000 + ((r - 0xD800) << 10) + (r2 - 0xDC00)
                i += 6
        out.append("\ufffd" if 0xD800 <= r < 0xE000 else chr(r))


def _json_skip_value(s: str, i: int) -> int:
    """Validate one JSON value at s[i] (after white space), iteratively; return the index after it."""
    n = len(s)
    stack: list[str] = []  # "]" or "}" for each open container
    while True:
        while i < n and s[i] in _JSON_WS:
            i += 1
        if i >= n:
            raise _NotJSON
        c = s[i]
        if c == "[" or c == "{":
            if len(stack) + 2 > _MAX_DEPTH:  # the enclosing top-level array counts too
                raise _NotJSON
            i += 1
            while i < n and s[i] in _JSON_WS:
                i += 1
            close = "]" if c == "[" else "}"
            if i < n and s[i] == close:
                i += 1
            else:
                stack.append(close)
                if close == "}":
                    i = _json_object_key(s, i)
                continue
        elif c == '"':
            i = _json_string(s, i)[1]
        elif c in "-0123456789":
            m = _JSON_NUMBER.match(s, i)
            if not m:
                raise _NotJSON
            i = m.end()
        elif s.startswith("true", i):
            i += 4
        elif s.startswith("false", i):
            i += 5
        elif s.startswith("null", i):
            i += 4
        else:
            raise _NotJSON
        # after a value: close containers or move to the next element
        while stack:
            while i < n and s[i] in _JSON_WS:
                i += 1
            if i >= n:
                raise _NotJSON
            if s[i] == stack[-1]:
                stack.pop()
                i += 1
                continue
            if s[i] != ",":
                raise _NotJSON
            i += 1
            if stack[-1] == "}":
                while i < n and s[i] in _JSON_WS:
                    i += 1
                i = _json_object_key(s, i)
            break
        if not stack:
            return i


def _json_object_key(s: str, i: int) -> int:
    """Read `"key" :` at s[i]; return the index of the value."""
    if i >= len(s) or s[i] != '"':
        raise _NotJSON
    i = _json_string(s, i)[1]
    while i < len(s) and s[i] in _JSON_WS:
        i += 1
    if i >= len(s) or s[i] != ":":
        raise _NotJSON
    return i + 1


def _parse_json_array(rest: str) -> list[str] | None:
    """BuildKit's parseJSON: the strings of a JSON array, None when `rest` is not valid JSON.

    A valid array with a non-string element raises _ParseError, as BuildKit refuses it.
    """
    rest = rest.lstrip(GO_SPACES)
    if not rest.startswith("["):
        return None
    s = rest
    n = len(s)
    items: list[str] = []
    non_string = False
    try:
        i = 1
        while i < n and s[i] in _JSON_WS:
            i += 1
        if i < n and s[i] == "]":
            i += 1
        else:
            while True:
                while i < n and s[i] in _JSON_WS:
                    i += 1
                if i < n and s[i] == '"':
                    text, i = _json_string(s, i)
                    items.append(text)
                else:
                    non_string = True
                    i = _json_skip_value(s, i)
                while i < n and s[i] in _JSON_WS:
                    i += 1
                if i >= n:
                    raise _NotJSON
                if s[i] == "]":
                    i += 1
                    break
                if s[i] != ",":
                    raise _NotJSON
                i += 1
        while i < n and s[i] in _JSON_WS:
            i += 1
        if i != n:
            raise _NotJSON
    except _NotJSON:
        return None
    if non_string:
        raise _ParseError(_NOT_STRINGS)
    return items


# --- line parsers (BuildKit's line_parsers.go) ------------------------------------------------------


class _Parsed:
    """What a line parser returns: the arguments, the JSON attribute, ONBUILD's nested node."""

    __slots__ = ("args", "json", "child")

    def __init__(self, args: list[str], json: bool = False, child: Node | None = None) -> None:
        self.args = args
        self.json = json
        self.child = child


def _parse_ignore(rest: str, escape: str) -> _Parsed:
    return _Parsed([""])  # BuildKit keeps one empty argument for an unknown instruction


def _parse_sub_command(rest: str, escape: str) -> _Parsed:
    if rest == "":
        return _Parsed([])
    return _Parsed([], child=_node_from_line(rest, escape))


def _parse_words(rest: str, escape: str) -> list[str]:
    """Split on white space, keeping quotes and escapes (BuildKit's parseWords)."""
    if rest.isascii() and not _WORDS_SPECIAL.search(rest):
        return [w for w in _ASCII_SPACE_RUN.split(rest) if w]
    if not rest.endswith(escape):  # no escape to drop at the very end: a regex reads the same words
        return [_fix_runes(w) for w in _WORD_RE[escape].findall(rest)]
    return _parse_words_loop(rest, escape)


def _parse_words_loop(rest: str, escape: str) -> list[str]:
    """parseWords, character by character, exactly as BuildKit walks the line."""
    words: list[str] = []
    in_spaces, in_word, in_quote = 0, 1, 2
    phase = in_spaces
    word: list[str] = []
    quote = ""
    blank_ok = False
    n = len(rest)
    pos = 0
    ch = ""
    while pos <= n:
        if pos != n:
            ch = rest[pos]
        if phase == in_spaces:
            if pos == n:
                break
            if ch in _SPACE_SET:
                pos += 1
                continue
            phase = in_word
        if pos == n:
            if blank_ok or word:
                words.append(_fix_runes("".join(word)))
            break
        if phase == in_word:
            if ch in _SPACE_SET:
                phase = in_spaces
                if blank_ok or word:
                    words.append(_fix_runes("".join(word)))
                word = []
                blank_ok = False
                pos += 1
                continue
            if ch == "'" or ch == '"':
                quote = ch
                blank_ok = True
                phase = in_quote
            if ch == escape:
                if pos + 1 == n:
                    pos += 1
                    continue  # an escape at the very end is dropped
                word.append(ch)
                pos += 1
                ch = rest[pos]
            word.append(ch)
            pos += 1
            continue
        # in_quote
        if ch == quote:
            phase = in_word
        if ch == escape and quote != "'":
            if pos + 1 == n:
                phase = in_word
                pos += 1
                continue
            pos += 1
            word.append(ch)
            ch = rest[pos]
        word.append(ch)
        pos += 1
    return words


def _parse_name_val(rest: str, key: str, escape: str) -> _Parsed:
    words = _parse_words(rest, escape)
    if not words:
        return _Parsed([])
    if "=" not in words[0]:
        parts = _ASCII_WS_SPLIT.split(rest, 1)
        if len(parts) < 2:
            raise _ParseError(f"{key} must have two arguments")
        return _Parsed([parts[0], parts[1], ""])
    args: list[str] = []
    for w in words:
        if "=" not in w:
            raise _ParseError(f"Syntax error - can't find = in {go_quote(w)}. Must be of the form: name=value")
        k, v = w.split("=", 1)
        args += [k, v, "="]
    return _Parsed(args)


def _parse_env(rest: str, escape: str) -> _Parsed:
    return _parse_name_val(rest, "ENV", escape)


def _parse_label(rest: str, escape: str) -> _Parsed:
    return _parse_name_val(rest, "LABEL", escape)


def _parse_name_or_name_val(rest: str, escape: str) -> _Parsed:
    return _Parsed(_parse_words(rest, escape))


def _parse_strings_whitespace_delimited(rest: str, escape: str) -> _Parsed:
    if rest == "":
        return _Parsed([])
    return _Parsed(_ASCII_WS_SPLIT.split(rest))


def _parse_string(rest: str, escape: str) -> _Parsed:
    return _Parsed([rest] if rest else [])


def _parse_maybe_json(rest: str, escape: str) -> _Parsed:
    if rest == "":
        return _Parsed([])
    items = _parse_json_array(rest)
    if items is not None:
        return _Parsed(items, json=True)
    return _Parsed([rest])


def _parse_maybe_json_to_list(rest: str, escape: str) -> _Parsed:
    items = _parse_json_array(rest)
    if items is not None:
        return _Parsed(items, json=True)
    return _parse_strings_whitespace_delimited(rest, escape)


def _parse_health_config(rest: str, escape: str) -> _Parsed:
    # BuildKit looks at bytes here: the first "space" byte ends the type word.
    b = rest.encode("utf-8", "surrogateescape")
    sep = 0
    while sep < len(b) and b[sep] not in _SPACE_BYTES:
        sep += 1
    nxt = sep
    while nxt < len(b) and b[nxt] in _SPACE_BYTES:
        nxt += 1
    if sep == 0:
        return _Parsed([])
    typ = b[:sep].decode("utf-8", "surrogateescape")
    cmd = _parse_maybe_json(b[nxt:].decode("utf-8", "surrogateescape"), escape)
    return _Parsed([typ] + cmd.args, json=cmd.json)


_DISPATCH = {
    "add": _parse_maybe_json_to_list,
    "arg": _parse_name_or_name_val,
    "cmd": _parse_maybe_json,
    "copy": _parse_maybe_json_to_list,
    "entrypoint": _parse_maybe_json,
    "env": _parse_env,
    "expose": _parse_strings_whitespace_delimited,
    "from": _parse_strings_whitespace_delimited,
    "healthcheck": _parse_health_config,
    "label": _parse_label,
    "maintainer": _parse_string,
    "onbuild": _parse_sub_command,
    "run": _parse_maybe_json,
    "shell": _parse_maybe_json,
    "stopsignal": _parse_string,
    "user": _parse_string,
    "volume": _parse_maybe_json_to_list,
    "workdir": _parse_string,
}

_HEREDOC_KEYWORDS = frozenset(("add", "copy", "run"))


def _extract_builder_flags(line: str, escape: str) -> tuple[str, list[str]]:
    """Leading `--flag[=value]` words, then the rest of the line (BuildKit's extractBuilderFlags).

    BuildKit walks bytes here and turns each byte into a rune, so a non-ASCII flag value comes out
    Latin-1-decoded; this does the same so that the dump matches.
    """
    if line[:1] not in ("-", "\udc85", "\udca0"):  # a flag, or a lone byte Go counts as a space
        return line, []
    if line.isascii():
        fast = _simple_flags(line)
        if fast is not None:
            return fast
    b = line.encode("utf-8", "surrogateescape")
    n = len(b)
    esc = ord(escape)
    words: list[str] = []
    in_spaces, in_word, in_quote = 0, 1, 2
    phase = in_spaces
    word: list[str] = []
    quote = 0
    blank_ok = False
    pos = 0
    ch = 0
    while pos <= n:
        if pos != n:
            ch = b[pos]
        if phase == in_spaces:
            if pos == n:
                break
            if ch in _SPACE_BYTES:
                pos += 1
                continue
            if ch != 0x2D or pos + 1 == n or b[pos + 1] != 0x2D:
                return b[pos:].decode("utf-8", "surrogateescape"), words
            phase = in_word
        if pos == n:
            w = "".join(word)
            if w != "--" and (blank_ok or w):
                words.append(w)
            break
        if phase == in_word:
            if ch in _SPACE_BYTES:
                phase = in_spaces
                w = "".join(word)
                if w == "--":
                    return b[pos:].decode("utf-8", "surrogateescape"), words
                if blank_ok or w:
                    words.append(w)
                word = []
                blank_ok = False
                pos += 1
                continue
            if ch == 0x27 or ch == 0x22:
                quote = ch
                blank_ok = True
                phase = in_quote
                pos += 1
                continue
            if ch == esc:
                if pos + 1 == n:
                    pos += 1
                    continue
                pos += 1
                ch = b[pos]
            word.append(chr(ch))
            pos += 1
            continue
        # in_quote
        if ch == quote:
            phase = in_word
            pos += 1
            continue
        if ch == esc:
            if pos + 1 == n:
                phase = in_word
                pos += 1
                continue
            pos += 1
            ch = b[pos]
        word.append(chr(ch))
        pos += 1
    return "", words


def _simple_flags(line: str) -> tuple[str, list[str]] | None:
    """extractBuilderFlags for the usual ASCII line without quotes or escapes; None otherwise."""
    words: list[str] = []
    pos = 0
    n = len(line)
    while True:
        m = _SIMPLE_FLAG.match(line, pos)
        if m is None:
            return None
        end = m.end()
        if end < n and line[end] not in "\t\n\v\f\r ":
            return None  # a quote or an escape inside the word
        word = m.group()
        if word == "--":
            return line[end:], words
        words.append(word)
        ws = _ASCII_SPACE_RUN.match(line, end)
        pos = ws.end() if ws else end
        if pos == n:
            return "", words
        if not line.startswith("--", pos):
            return line[pos:], words


def _split_command(line: str, escape: str) -> tuple[str, list[str], str]:
    cmdline = _ASCII_WS_SPLIT.split(_go_trim_space(line), 1)
    args = ""
    flags: list[str] = []
    if len(cmdline) == 2:
        args, flags = _extract_builder_flags(cmdline[1], escape)
    return cmdline[0], flags, _go_trim_space(args)


def _node_from_line(line: str, escape: str) -> Node:
    cmd, flags, rest = _split_command(line, escape)
    keyword = go_lower(cmd)
    parsed = _DISPATCH.get(keyword, _parse_ignore)(rest, escape)
    return Node(keyword, parsed.args, flags, line, 0, 0, parsed.json, [], parsed.child)


def _can_contain_heredoc(node: Node) -> bool:
    if node.keyword == "onbuild" and node.next is not None:
        node = node.next
    return node.keyword in _HEREDOC_KEYWORDS and not node.json_form


# --- here-documents ---------------------------------------------------------------------------------


def parse_heredoc(word: str) -> Heredoc | None:
    """The here-document a word such as `<<EOF`, `3<<-"EOF"` opens, None for other words.

    Raises ShellError when the delimiter cannot be lexed.  The returned body is empty.
    """
    m = _HEREDOC.match(word)
    if not m:
        return None
    fd = min(int(m.group(1)), 2**64 - 1) if m.group(1) else 0
    rest = m.group(3)
    if not rest:
        return None
    if rest.isascii() and not _LEXER_SPECIAL.search(rest) and not _ASCII_SPACE_RUN.search(rest):
        return Heredoc(rest, "", True, m.group(2) == "-", fd)  # the lexer would give it back unchanged
    plain = Lexer("\\", skip_unset_env=True).expand_words(rest, {})
    if len(plain) != 1:
        return None
    raw = Lexer("\\", raw_quotes=True, skip_unset_env=True).expand_words(rest, {})
    if len(raw) != len(plain):
        raise ShellError(f"internal lexing of heredoc produced inconsistent results: {rest}")
    name = plain[0]
    quotes = name.count("'") + name.count('"')
    raw_quotes = raw[0].count("'") + raw[0].count('"')
    return Heredoc(name, "", quotes == raw_quotes, m.group(2) == "-", fd)


def _heredocs_from_line(line: str) -> list[Heredoc]:
    if line.isascii() and not _LEXER_SPECIAL.search(line):
        words = [w for w in _ASCII_SPACE_RUN.split(line) if w]
    else:
        try:
            words = Lexer("\\", raw_quotes=True, raw_escapes=True, skip_unset_env=True).expand_words(line, {})
        except ShellError:
            return []
    docs = []
    for w in words:
        h = parse_heredoc(w)
        if h is not None:
            docs.append(h)
    return docs


def chomp_heredoc_content(content: str) -> str:
    """The body of a `<<-` here-document with each line's leading tabs removed."""
    return _LEADING_TABS.sub("", content)


# --- the parser -------------------------------------------------------------------------------------


class _Directives:
    """Parser directives (`# escape=`, `# syntax=`, `# check=`): only at the very top of the file."""

    def __init__(self) -> None:
        self.escape = "\\"
        self.continuation = _continuation_regex("\\")
        self.done = False
        self.seen: dict[str, str] = {}

    def feed(self, line: str) -> bool:
        """Look at one line; True when it is a directive.  Raises _ParseError for a bad one."""
        if self.done:
            return False
        m = _DIRECTIVE.match(line)
        if not m:
            self.done = True
            return False
        key = m.group(1).lower()
        if key not in ("escape", "syntax", "check"):
            self.done = True
            return False
        if key in self.seen:
            raise _ParseError(f"only one {key} parser directive can be used")
        value = m.group(2)
        self.seen[key] = value
        if key == "escape":
            if value not in ("`", "\\"):
                raise _ParseError(f"invalid escape token '{value}' does not match ` or \\")
            self.escape = value
            self.continuation = _continuation_regex(value)
        return True


_SLASH_DIRECTIVE = re.compile(_DIRECTIVE.pattern.replace("#", "//", 1), re.DOTALL)


def _frontend_directive(key: str, data: bytes, any_format: bool) -> str | None:
    """A `syntax` or `check` directive as BuildKit's frontend reads it (DetectSyntax/ParseDirective):
    a first `#!` line is skipped, and only the value's first word counts; `syntax` may also be
    written `//syntax=` or as a JSON document's "syntax" key."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", "surrogateescape")
    first, nl, rest = text.partition("\n")
    if first.startswith("#!"):
        text = rest
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    for rx in (_DIRECTIVE, _SLASH_DIRECTIVE) if any_format else (_DIRECTIVE,):
        seen: set[str] = set()
        for ln in lines:
            m = rx.match(ln)
            if not m:
                break
            name = m.group(1).lower()
            if name not in ("escape", "syntax", "check") or name in seen:
                break
            seen.add(name)
            if name == key:
                return m.group(2).split(" ", 1)[0]
    if any_format and text.lstrip(" \t\r\n").startswith("{"):
        import json  # only for this rare form

        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            return None
        value = doc.get(key) if isinstance(doc, dict) else None
        return value if isinstance(value, str) else None
    return None


def _continuation_regex(escape: str) -> re.Pattern[str]:
    e = re.escape(escape)
    return re.compile(f"([^{e}]){e}[ \t]*\\Z|^{e}[ \t]*\\Z", re.DOTALL)


def _is_comment(line: str) -> bool:
    return line.lstrip(GO_SPACES).startswith("#")


def _split_lines(data: bytes) -> tuple[list[str], int | None]:
    """The lines as bufio.Scanner with BuildKit's scanLines yields them (newline kept), decoded,
    and the index of the first line too long to read (None when all fit)."""
    raw = data.split(b"\n")
    last = raw.pop()
    tokens = [r + b"\n" for r in raw]
    if last:
        tokens.append(last)
    too_long = None
    for i, t in enumerate(tokens):
        if len(t) > MAX_LINE or (len(t) == MAX_LINE and not t.endswith(b"\n")):
            too_long = i
            break
    if too_long is not None:
        tokens = tokens[:too_long]
    if tokens and tokens[0].startswith(b"\xef\xbb\xbf"):
        tokens[0] = tokens[0][3:]
    if data.isascii():
        return [t.decode("ascii") for t in tokens], too_long
    return [t.decode("utf-8", "surrogateescape") for t in tokens], too_long


def parse(data: bytes | str, filename: str = "Containerfile") -> Containerfile:
    """Parse a Containerfile; raises ContainerfileError (FILE:LINE: message) for what BuildKit refuses."""
    if isinstance(data, str):
        text = data
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = text.encode("utf-8", "replace")
    lines, too_long = _split_lines(data)
    d = _Directives()
    nodes: list[Node] = []
    warnings: list[str] = []
    empty_continuations = False
    current = 0  # lines consumed so far
    i = 0
    n = len(lines)

    def process(raw: str, strip_left: bool) -> str:
        token = raw.rstrip("\r\n")
        if strip_left:
            token = token.lstrip(GO_SPACES)
        if not d.done:
            try:
                d.feed(token)
            except _ParseError as e:
                raise _err(str(e), filename, current + 1, token) from None
        return "" if _is_comment(token) else token

    def trim_continuation(s: str) -> tuple[str, bool]:
        if not s.endswith((d.escape, " ", "\t")):
            return s, True
        m = d.continuation.search(s)
        if m is None:
            return s, True
        return s[: m.start()] + (m.group(1) or ""), False

    while i < n:
        raw = lines[i]
        i += 1
        text = process(raw, True)
        current += 1
        start = current
        line, eol = trim_continuation(text)
        if eol and line == "":
            continue
        parts = [line]
        has_empty = False
        while not eol and i < n:
            raw = lines[i]
            i += 1
            text = process(raw, False)
            current += 1
            if _is_comment(raw):
                continue
            if not text.lstrip(GO_SPACES):
                has_empty = True
                continue
            text, eol = trim_continuation(text)
            parts.append(text)
        line = "".join(parts)
        if has_empty:
            empty_continuations = True
            warnings.append(f"{filename}:{current}: Empty continuation line found in: {line}")
        try:
            node = _node_from_line(line, d.escape)
        except _ParseError as e:
            raise _err(str(e), filename, start, line) from None
        if "<<" in line and _can_contain_heredoc(node):
            try:
                docs = _heredocs_from_line(line)
            except ShellError as e:
                raise _err(str(e), filename, start, line) from None
            for doc in docs:
                body = []
                terminated = False
                while i < n:
                    raw = lines[i]
                    i += 1
                    current += 1
                    candidate = raw.rstrip("\r\n")
                    if doc.chomp:
                        candidate = candidate.lstrip("\t")
                    if candidate == doc.name:
                        terminated = True
                        break
                    body.append(raw)
                if not terminated:
                    raise _err(f"unterminated heredoc {doc.name}", filename, start, line)
                doc.content = "".join(body)
                node.heredocs.append(doc)
        node.start_line = start
        node.end_line = current
        if node.next is not None:
            node.next.start_line = start
            node.next.end_line = current
        nodes.append(node)
    if empty_continuations:
        warnings.append("Empty continuation lines will become errors in a future release.")
    if too_long is not None:  # (BuildKit reports "file with no instructions" first, when that is also true)
        raise _err(f"dockerfile line greater than max allowed size of {MAX_LINE - 1}", filename, too_long + 1)
    if not nodes:
        raise _err("file with no instructions", filename, current)
    syntax = _frontend_directive("syntax", data, True)
    if syntax is not None:
        warnings.insert(
            0,
            f"{filename}: ignoring the syntax directive {go_quote(syntax)}: "
            "rbuild has its own parser (BuildKit's stable Dockerfile syntax)",
        )
    return Containerfile(nodes, filename, d.escape, syntax, warnings, _frontend_directive("check", data, False))


def _dump_node(node: Node) -> str:
    s = node.keyword
    if node.flags:
        s += " [" + " ".join(go_quote(f) for f in node.flags) + "]"
    if node.next is not None:
        s += " (" + _dump_node(node.next) + ")"
    for a in node.args:
        s += " " + go_quote(a)
    return _go_trim_space(s)


def dump(cf: Containerfile) -> str:
    """The syntax tree in BuildKit's dump format: one `(keyword ["--flag"] "arg" ...)` line per node."""
    return "".join("(" + _dump_node(node) + ")\n" for node in cf.nodes)
