"""BuildKit's Dockerfile shell lexer: variable expansion and word splitting.

A line-by-line port of moby/buildkit frontend/dockerfile/shell/lex.go, so that `$v`, `${v:-w}`, quotes
and escapes mean in a Containerfile exactly what they mean to `docker build`, quirks included (see the
comments marked "BuildKit:").  Strings are Python str; bytes that were not valid UTF-8 arrive as
surrogate escapes and are read as U+FFFD, the way Go's text/scanner reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from rootless.errors import RbuildError
from rootless.frontend import globmatch

__all__ = ["ShellError", "Lexer", "go_quote", "GO_SPACES"]

# Go's unicode.IsSpace set (str.isspace() also accepts U+001C..U+001F, Go does not).
GO_SPACES = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_SPACE_SET = frozenset(GO_SPACES)
_EOF = ""  # what _peek()/_next() return at the end of the word
_SURROGATES = re.compile("[\ud800-\udfff]")
_NOT_NEWLINE = ("!", "\n")  # Go's `.`
_ASCII_SPACE_RUN = re.compile("[\t\n\v\f\r ]+")


class ShellError(RbuildError):
    """A word that BuildKit's lexer refuses (bad substitution, unterminated quote, ${v:?msg} ...)."""


def go_quote(s: str) -> str:
    """`s` quoted like Go's strconv.Quote; surrogate escapes (undecodable bytes) print as \\xNN."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"' + s + '"'
    out = ['"']
    for c in s:
        o = ord(c)
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\\ufffd")
        elif c.isprintable():
            out.append(c)
        elif c in _C_ESCAPES:
            out.append(_C_ESCAPES[c])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _is_letter(c: str) -> bool:
    return c.isalpha()  # Unicode categories L*, like Go's unicode.IsLetter


def _is_digit(c: str) -> bool:
    return c.isdecimal()  # Unicode category Nd, like Go's unicode.IsDigit


class _Words:
    """BuildKit's wordsStruct: words plus a flag, around a buffer shared by the whole lexer run."""

    __slots__ = ("buf", "words", "in_word")

    def __init__(self, buf: list[str]) -> None:
        self.buf = buf
        self.words: list[str] = []
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if ch in _SPACE_SET:
            if self.in_word and self.buf:
                self.words.append("".join(self.buf))
                self.buf.clear()
                self.in_word = False
        else:
            self.buf.append(ch)
            self.in_word = True

    def add_raw_char(self, ch: str) -> None:
        self.buf.append(ch)
        self.in_word = True

    def add_string(self, s: str) -> None:
        for ch in s:
            self.add_char(ch)

    def add_raw_string(self, s: str) -> None:
        if s:
            self.buf.append(s)
        self.in_word = True

    def get_words(self) -> list[str]:
        if self.buf:
            self.words.append("".join(self.buf))
            self.buf.clear()
            self.in_word = False
        return self.words


class _Run:
    """One pass of the lexer over one word (BuildKit's shellWord)."""

    __slots__ = ("lex", "src", "pos", "env", "raw_escapes", "words_buf", "matched", "unmatched", "collect")

    def __init__(self, lex: Lexer, word: str, env: Mapping[str, str], collect: bool) -> None:
        self.lex = lex
        self.collect = collect  # whether words are wanted (ProcessWords) or only the text
        if _SURROGATES.search(word):
            word = _SURROGATES.sub("\ufffd", word)
        if word.startswith("\ufeff"):  # text/scanner skips a BOM at the very start
            word = word[1:]
        self.src = word
        self.pos = 0
        self.env = env
        self.raw_escapes = lex.raw_escapes
        # BuildKit: one words buffer shared by nested ${...} processing (see process_stop_on).
        self.words_buf: list[str] = []
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()

    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else _EOF

    def next(self) -> str:
        if self.pos < len(self.src):
            self.pos += 1
            return self.src[self.pos - 1]
        return _EOF

    def get_env(self, name: str) -> tuple[str, bool]:
        if name in self.env:
            self.matched.add(name)
            return self.env[name], True
        self.unmatched.add(name)
        return "", False

    def process_stop_on(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        """Read up to `stop` (or the end when stop is _EOF); the text and its words."""
        result: list[str] = []
        # BuildKit: the words buffer is shared with the caller and reset here, so a nested
        # ${v:-w} forgets what the enclosing word had collected so far.
        self.words_buf.clear()
        words = _Words(self.words_buf) if self.collect else None
        saved = self.raw_escapes
        self.raw_escapes = raw_escapes
        escape = self.lex.escape
        quotes = not self.lex.skip_process_quotes
        try:
            src = self.src
            n = len(src)
            while self.pos < n:
                ch = src[self.pos]
                if stop and ch == stop:
                    self.pos += 1
                    return "".join(result), words.get_words() if words else []
                if ch == "$":
                    tmp = self.process_dollar()
                    result.append(tmp)
                    if words:
                        words.add_string(tmp)
                elif quotes and ch == "'":
                    tmp = self.process_single_quote()
                    result.append(tmp)
                    if words:
                        words.add_raw_string(tmp)
                elif quotes and ch == '"':
                    tmp = self.process_double_quote()
                    result.append(tmp)
                    if words:
                        words.add_raw_string(tmp)
                elif ch == escape:
                    self.pos += 1
                    if self.raw_escapes:
                        if words:
                            words.add_raw_char(ch)
                        result.append(ch)
                    ch = self.next()
                    if ch == _EOF:
                        break
                    if words:
                        words.add_raw_char(ch)
                    result.append(ch)
                else:
                    self.pos += 1
                    if words:
                        words.add_char(ch)
                    result.append(ch)
            if stop:
                raise ShellError(f"unexpected end of statement while looking for matching {stop}")
            return "".join(result), words.get_words() if words else []
        finally:
            self.raw_escapes = saved

    def process_single_quote(self) -> str:
        raw = self.lex.raw_quotes
        result = []
        ch = self.next()
        if raw:
            result.append(ch)
        while True:
            ch = self.next()
            if ch == _EOF:
                raise ShellError("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                if raw:
                    result.append(ch)
                return "".join(result)
            result.append(ch)

    def process_double_quote(self) -> str:
        raw = self.lex.raw_quotes
        escape = self.lex.escape
        result = []
        ch = self.next()
        if raw:
            result.append(ch)
        while True:
            p = self.peek()
            if p == _EOF:
                raise ShellError("unexpected end of statement while looking for matching double-quote")
            if p == '"':
                ch = self.next()
                if raw:
                    result.append(ch)
                return "".join(result)
            if p == "$":
                result.append(self.process_dollar())
                continue
            ch = self.next()
            if ch == escape:
                if self.raw_escapes:
                    result.append(ch)
                p = self.peek()
                if p == _EOF:
                    continue  # BuildKit ignores an escape at the end of the word
                if p in ('"', "$", escape):
                    ch = self.next()
            result.append(ch)

    def process_dollar(self) -> str:
        self.next()
        skip_unset = self.lex.skip_unset_env
        if self.peek() != "{":
            name = self.process_name()
            if not name:
                return "$"
            value, found = self.get_env(name)
            if not found and skip_unset:
                return "$" + name
            return value
        self.next()
        p = self.peek()
        if p == _EOF:
            raise ShellError("syntax error: missing '}'")
        if p in ("{", "}", ":"):
            raise ShellError("syntax error: bad substitution")
        name = self.process_name()
        ch = self.next()
        chs = ch or "\ufffd"  # Go's string(rune(EOF))
        if ch == "}":
            value, found = self.get_env(name)
            if not found and skip_unset:
                return "${" + name + "}"
            return value
        if ch in (":", "+", "-", "?", "#", "%"):
            null_is_unset = False
            if ch == ":":
                null_is_unset = True
                ch = self.next()
                chs += ch or "\ufffd"
            raw = ch in ("#", "%")
            if null_is_unset and raw:
                raise ShellError(f"unsupported modifier ({chs}) in substitution")
            try:
                word, _ = self.process_stop_on("}", raw)
            except ShellError:
                if self.peek() == _EOF:
                    raise ShellError("syntax error: missing '}'") from None
                raise
            value, found = self.get_env(name)
            if skip_unset and not found:
                return "${" + name + chs + word + "}"
            if ch == "-":
                return word if not found or (null_is_unset and value == "") else value
            if ch == "+":
                return "" if not found or (null_is_unset and value == "") else word
            if ch == "?":
                if not found:
                    raise ShellError(f"{name}: {word or 'is not allowed to be unset'}")
                if null_is_unset and value == "":
                    raise ShellError(f"{name}: {word or 'is not allowed to be empty'}")
                return value
            if ch in ("#", "%"):
                greedy = False
                if word and word[0] == ch:
                    greedy = True
                    word = word[1:]
                if ch == "%":
                    return _trim_suffix(word, value, greedy)
                return _trim_prefix(word, value, greedy)
            raise ShellError(f"unsupported modifier ({chs}) in substitution")
        if ch == "/":
            replace_all = self.peek() == "/"
            if replace_all:
                self.next()
            try:
                pattern, _ = self.process_stop_on("/", True)
            except ShellError:
                if self.peek() == _EOF:
                    raise ShellError("syntax error: missing '/' in ${}") from None
                raise
            try:
                replacement, _ = self.process_stop_on("}", True)
            except ShellError:
                if self.peek() == _EOF:
                    raise ShellError("syntax error: missing '}'") from None
                raise
            value, found = self.get_env(name)
            if skip_unset and not found:
                return "${" + name + "/" + pattern + "/" + replacement + "}"
            rx = _shell_pattern(pattern)
            if replace_all:
                return _go_replace_all(rx, value, replacement)
            m = rx.search(value)
            if m:
                value = value[: m[0]] + replacement + value[m[1] :]
            return value
        raise ShellError(f"unsupported modifier ({chs}) in substitution")

    def process_name(self) -> str:
        src = self.src
        n = len(src)
        start = self.pos
        if start < n:
            ch = src[start]
            if _is_digit(ch):
                end = start
                while end < n and _is_digit(src[end]):
                    end += 1
                self.pos = end
                return src[start:end]
            if ch in "@*#?-$!0":
                self.pos += 1
                return ch
        end = start
        while end < n:
            ch = src[end]
            if not (ch == "_" or _is_letter(ch) or _is_digit(ch)):
                break
            end += 1
        self.pos = end
        return src[start:end]


def _shell_pattern(pattern: str) -> globmatch.Pattern:
    """BuildKit's convertShellPatternToRegex, as a linear-time automaton: `?` one character, `*` any run
    (neither crosses a newline, as Go's `.` does not), `\\` escapes * ? and \\; the rest is literal."""
    if pattern.startswith("\ufeff"):
        pattern = pattern[1:]
    out = globmatch.Pattern()
    i = 0
    n = len(pattern)
    while i < n:
        tok = pattern[i]
        i += 1
        if tok == "*":
            out.loop(_NOT_NEWLINE)
            continue
        if tok == "?":
            out.char(_NOT_NEWLINE)
            continue
        if tok == "\\":
            if i < n and pattern[i] in "}/":
                continue  # the escape that kept } or / inside ${} is not part of the pattern
            tok = pattern[i] if i < n else ""
            i += 1
            if tok not in ("*", "?", "\\") or tok == "":
                shown = tok or "\ufffd"
                raise ShellError(f"invalid pattern ({pattern}) in substitution: invalid escape '\\{shown}'")
        out.char(("=", tok))
    return out.end()


def _reverse_pattern(pattern: str) -> str:
    """Reverse a pattern without separating an escape from the character it escapes."""
    last = len(pattern) - 1
    out = [""] * len(pattern)
    i = 0
    while i <= last:
        tok = pattern[i]
        o = last - i
        if tok == "\\" and i != last:
            out[o - 1] = tok
            out[o] = pattern[i + 1]
            i += 2
        else:
            out[o] = tok
            i += 1
    return "".join(out)


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    end = _shell_pattern(pattern).prefix(value, longest=greedy)
    return value if end is None else value[end:]


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # BuildKit finds the shortest rightmost match by reversing both sides; so does this.
    return _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)[::-1]


def _go_replace_all(rx: globmatch.Pattern, src: str, template: str) -> str:
    """Go's Regexp.ReplaceAllString: $name/${name} template expansion, Go's empty-match rules."""
    out = []
    last_end = 0
    search = 0
    n = len(src)
    while search <= n:
        m = rx.search(src, search)
        if m is None:
            break
        a, b = m
        out.append(src[last_end:a])
        if b > last_end or a == 0:
            out.append(_go_expand(template, src[a:b]))
        last_end = b
        search = search + 1 if search + 1 > b else b  # always advance at least one character
    out.append(src[last_end:])
    return "".join(out)


def _go_expand(template: str, whole: str) -> str:
    """Expand a Go regexp replacement template for a pattern without groups ($0 is the match)."""
    if "$" not in template:
        return template
    out = []
    i = 0
    n = len(template)
    while i < n:
        j = template.find("$", i)
        if j < 0:
            break
        out.append(template[i:j])
        i = j + 1
        if i < n and template[i] == "$":
            out.append("$")
            i += 1
            continue
        brace = i < n and template[i] == "{"
        k = i + 1 if brace else i
        e = k
        while e < n and (template[e] == "_" or _is_letter(template[e]) or _is_digit(template[e])):
            e += 1
        if e == k or (brace and (e >= n or template[e] != "}")):
            out.append("$")
            continue
        name = template[k:e]
        i = e + 1 if brace else e
        if name == "0":
            out.append(whole)
    out.append(template[i:])
    return "".join(out)


class Lexer:
    """BuildKit's shell.Lex: expands one word (ProcessWord) or splits it into words (ProcessWords)."""

    __slots__ = ("escape", "raw_quotes", "raw_escapes", "skip_process_quotes", "skip_unset_env")

    def __init__(
        self,
        escape: str = "\\",
        *,
        raw_quotes: bool = False,
        raw_escapes: bool = False,
        skip_process_quotes: bool = False,
        skip_unset_env: bool = False,
    ) -> None:
        self.escape = escape
        self.raw_quotes = raw_quotes
        self.raw_escapes = raw_escapes
        self.skip_process_quotes = skip_process_quotes
        self.skip_unset_env = skip_unset_env

    def _run(self, word: str, env: Mapping[str, str], collect: bool = True) -> tuple[str, list[str], _Run]:
        run = _Run(self, word, env, collect)
        try:
            result, words = run.process_stop_on(_EOF, self.raw_escapes)
        except ShellError as e:
            raise ShellError(f"failed to process {go_quote(word)}: {e}") from None
        except RecursionError:
            raise ShellError(f"failed to process {go_quote(word)}: substitutions nested too deeply") from None
        return result, words, run

    def expand(self, word: str, env: Mapping[str, str]) -> str:
        """The word with quotes, escapes and variables processed (BuildKit's ProcessWord)."""
        if word.isascii() and not self._special(word):
            return word  # nothing the lexer would change
        return self._run(word, env, False)[0]

    def expand_words(self, word: str, env: Mapping[str, str]) -> list[str]:
        """The expanded word split on unquoted white space (BuildKit's ProcessWords)."""
        if word.isascii() and not self._special(word):
            return [w for w in _ASCII_SPACE_RUN.split(word) if w]
        return self._run(word, env)[1]

    def expand_with_matches(self, word: str, env: Mapping[str, str]) -> tuple[str, set[str], set[str]]:
        """Like expand, plus the variable names found in env and those that were not."""
        result, _, run = self._run(word, env, False)
        return result, run.matched, run.unmatched

    def _special(self, word: str) -> bool:
        """Whether an ASCII word holds anything the lexer acts on."""
        if "$" in word or self.escape in word:
            return True
        return not self.skip_process_quotes and ("'" in word or '"' in word)
