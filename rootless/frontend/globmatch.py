"""Glob patterns matched in linear time: `${v#pat}`, `${v//pat/r}` and .dockerignore / --exclude patterns.

Python's `re` backtracks, so a pattern like `*a*a*a*a*b` against a long value takes exponential time,
where BuildKit's Go regexp cannot hang.  A pattern here is a small automaton (single characters, runs,
optional parts) simulated over the set of states it can be in, never backtracking:
O(len(text) * len(pattern)), and the state sets met are cached as a deterministic automaton, so a
pattern matched against many paths costs one dictionary look-up per character.  The results are those
of the regular expressions the patterns used to be translated to: the leftmost match and, since every
star is greedy, the longest one there (or the shortest, for ${v#pat}).
"""

from __future__ import annotations

from typing import TypeAlias, cast

# A character test: ("=", c) that character, ("!", c) any other, ("[", negate, ranges) a class.
CharTest: TypeAlias = tuple[str, str]
ClassTest: TypeAlias = tuple[str, bool, tuple[tuple[str, str], ...]]
Test: TypeAlias = CharTest | ClassTest
# A node: (kind, test) for CHAR and LOOP, (OPT, nodes to skip + 1), (MATCH, 0).
Node: TypeAlias = tuple[int, Test | int]

_CHAR, _LOOP, _OPT, _MATCH = range(4)
_MAX_STATES = 4096  # cached automaton states per pattern (the cache starts over beyond that)


def _accepts(test: Test, ch: str) -> bool:
    if len(test) == 2:
        kind, c = test
        return ch == c if kind == "=" else ch != c
    _, negate, ranges = test
    return any(lo <= ch <= hi for lo, hi in ranges) != negate


class Pattern:
    """A pattern built node by node (char, loop, optional), then end().

    Nodes: CHAR(test) reads one character; LOOP(test) reads any number of them, then goes on; OPT(k)
    goes on, or skips k nodes; MATCH ends it.
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self._ids: dict[tuple[frozenset[int], bool], int] = {}
        self._states: list[tuple[frozenset[int], bool]] = []
        self._rows: list[dict[str, int]] = []  # per cached state: character -> next state
        self._closures: dict[int, tuple[frozenset[int], bool]] = {}

    def char(self, test: Test) -> None:
        self.nodes.append((_CHAR, test))

    def loop(self, test: Test) -> None:
        self.nodes.append((_LOOP, test))

    def optional(self, size: int) -> None:
        """The next `size` nodes may be skipped."""
        self.nodes.append((_OPT, size + 1))

    def end(self) -> Pattern:
        self.nodes.append((_MATCH, 0))
        return self

    # -- state sets ------------------------------------------------------------------------------------
    def _closure(self, seeds: list[int]) -> tuple[frozenset[int], bool]:
        """The reading nodes reachable from seeds without reading, and whether MATCH is."""
        seen: set[int] = set()
        out: set[int] = set()
        matched = False
        stack = list(seeds)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            kind = self.nodes[i][0]
            if kind == _CHAR:
                out.add(i)
            elif kind == _LOOP:
                out.add(i)
                stack.append(i + 1)
            elif kind == _OPT:
                stack += [i + 1, i + cast(int, self.nodes[i][1])]
            else:
                matched = True
        return frozenset(out), matched

    def _node_closure(self, i: int) -> tuple[frozenset[int], bool]:
        got = self._closures.get(i)
        if got is None:
            got = self._closures[i] = self._closure([i])
        return got

    def _step(self, i: int, ch: str) -> int | None:
        """Where reading node i goes on ch (None: it does not accept ch)."""
        kind, test = self.nodes[i]
        if not _accepts(cast(Test, test), ch):
            return None
        return i if kind == _LOOP else i + 1

    def _intern(self, state: tuple[frozenset[int], bool]) -> int:
        sid = self._ids.get(state)
        if sid is None:
            sid = self._ids[state] = len(self._states)
            self._states.append(state)
            self._rows.append({})
        return sid

    def _start(self) -> int:
        if not self._states:
            self._intern(self._node_closure(0))
        return 0

    def _add(self, sid: int, ch: str) -> int:
        """The state after sid on ch, computed and cached."""
        state = self._states[sid]
        if len(self._states) >= _MAX_STATES:
            self._ids.clear()
            self._states.clear()
            self._rows.clear()
            self._start()  # the start state keeps id 0
            sid = self._intern(state)
        nxt = self._intern(self._closure([n for i in state[0] if (n := self._step(i, ch)) is not None]))
        self._rows[sid][ch] = nxt
        return nxt

    # -- matching ----------------------------------------------------------------------------------------
    def fullmatch(self, text: str) -> bool:
        rows, states = self._rows, self._states  # (cleared in place when the cache starts over)
        sid = self._start()
        for ch in text:
            nxt = rows[sid].get(ch)
            sid = self._add(sid, ch) if nxt is None else nxt
            if not states[sid][0]:
                return False
        return states[sid][1]

    def prefix(self, text: str, longest: bool) -> int | None:
        """The end of the longest (or shortest) prefix of text that matches, or None."""
        sid = self._start()
        found = 0 if self._states[sid][1] else None
        if found is not None and not longest:
            return found
        for pos, ch in enumerate(text, 1):
            nxt = self._rows[sid].get(ch)
            sid = self._add(sid, ch) if nxt is None else nxt
            nodes, matched = self._states[sid]
            if matched:
                found = pos
                if not longest:
                    break
            if not nodes:
                break
        return found

    def search(self, text: str, pos: int = 0) -> tuple[int, int] | None:
        """The leftmost match starting at pos or later, the longest of those: (start, end), or None.

        A node is held by the earliest start that reaches it (a later start can do no better from there)."""
        best: tuple[int, int] | None = None
        threads: list[tuple[int, int]] = []  # (reading node, start of its match), earliest start first
        for j in range(pos, len(text) + 1):
            seeds: list[tuple[int, int]] = []
            if threads:
                ch = text[j - 1]
                seeds = [(n, start) for i, start in threads if (n := self._step(i, ch)) is not None]
            if best is None:
                seeds.append((0, j))
            threads = []
            seen: set[int] = set()
            for node, start in seeds:
                nodes, matched = self._node_closure(node)
                if matched and (best is None or start < best[0] or (start == best[0] and j > best[1])):
                    best = (start, j)
                for n in sorted(nodes - seen):
                    seen.add(n)
                    threads.append((n, start))
            if best is not None:
                threads = [(n, s) for n, s in threads if s <= best[0]]
                if not threads:
                    break
        return best


def parse_class(body: str) -> Test | None:
    """A bracket expression's inside (between [ and ]) as a class test, read the way Python's `re` reads
    it: a leading ! or ^ negates, `a-z` is a range, a `-` that cannot make one is itself.  None when it is
    not valid: empty, or a range running backwards."""
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    ranges: list[tuple[str, str]] = []
    i = 0
    while i < len(body):
        lo = body[i]
        if body[i + 1 : i + 2] != "-":
            ranges.append((lo, lo))
            i += 1
        elif i + 2 < len(body):
            if body[i + 2] < lo:
                return None
            ranges.append((lo, body[i + 2]))
            i += 3
        else:  # a final "-"
            ranges += [(lo, lo), ("-", "-")]
            i += 2
    if not ranges:
        return None
    return ("[", negate, tuple(ranges))
