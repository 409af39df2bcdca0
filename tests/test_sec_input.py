"""Hostile Containerfiles and build contexts: what they can make rbuild read, write, show or spend.

The matchers of ${v#pat} / ${v//pat/r} and of .dockerignore patterns run in linear time (checked against
the regular expressions they replace); bind mounts cannot write to the context; ignored files stay
invisible through symlinks; a Containerfile or ignore file in the context cannot lead out of it; hostile
paths give one located error line.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import warnings

import pytest
from conftest import Runner
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_build import flatten

from rootless.build import copyfiles
from rootless.frontend import shell

# --- the regular expressions the matchers replace (the old code, kept here as the oracle) --------------


def _old_shell_regex(pattern: str, greedy: bool, anchored: bool) -> re.Pattern[str]:
    if pattern.startswith("\ufeff"):
        pattern = pattern[1:]
    out = ["^"] if anchored else []
    i, n = 0, len(pattern)
    while i < n:
        tok = pattern[i]
        i += 1
        if tok == "*":
            out.append(".*" if greedy else ".*?")
        elif tok == "?":
            out.append(".")
        elif tok == "\\":
            if i < n and pattern[i] in "}/":
                continue
            tok = pattern[i] if i < n else ""
            i += 1
            if tok not in ("*", "?", "\\") or tok == "":
                raise shell.ShellError("invalid escape")
            out.append("\\" + tok)
        else:
            out.append(re.escape(tok))
    return re.compile("".join(out))


def _old_ignore_regex(pattern: str) -> re.Pattern[str]:
    """The old translation, with Go's end anchor (`$` in Python also matches before a final newline)."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
                continue
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out += re.escape(c)
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("^"):
                    body = "!" + body[1:]
                out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile("^" + out + "(?:/.*)?\\Z")


def test_ignore_class_with_a_closing_bracket_first() -> None:
    rules = copyfiles.patterns_to_rules(["[]x]", "[!]a-z]y"], lambda n: "x")
    assert [copyfiles.ignored(p, rules) for p in ("]", "x", "[]x]", "By", "]y", "by")] == [
        True,
        True,
        False,
        True,
        False,
        False,
    ]
    with pytest.raises(copyfiles.RbuildError, match="^where: invalid pattern"):
        copyfiles.patterns_to_rules(["ok", "[z-a]"], lambda n: "where")


_SHELL_PATTERN = st.text(alphabet="ab*?\\.[$\n", max_size=8)
_SHELL_VALUE = st.text(alphabet="ab.[$\n*", max_size=12)


@settings(max_examples=600, deadline=None)
@given(_SHELL_PATTERN, _SHELL_VALUE, st.booleans())
def test_shell_trims_match_the_regex(pattern: str, value: str, greedy: bool) -> None:
    try:
        rx = _old_shell_regex(pattern, greedy, True)
    except shell.ShellError:
        with pytest.raises(shell.ShellError):
            shell._trim_prefix(pattern, value, greedy)
        return
    m = rx.search(value)
    assert shell._trim_prefix(pattern, value, greedy) == (value[m.end() :] if m else value)
    rev = shell._reverse_pattern(pattern)
    try:
        m = _old_shell_regex(rev, greedy, True).search(value[::-1])
    except shell.ShellError:
        return
    want = (value[::-1][m.end() :] if m else value[::-1])[::-1]
    assert shell._trim_suffix(pattern, value, greedy) == want


@settings(max_examples=600, deadline=None)
@given(_SHELL_PATTERN, _SHELL_VALUE, st.integers(min_value=0, max_value=12))
def test_shell_search_matches_the_regex(pattern: str, value: str, pos: int) -> None:
    try:
        rx = _old_shell_regex(pattern, True, False)
    except shell.ShellError:
        return
    pos = min(pos, len(value))
    m = rx.search(value, pos)
    assert shell._shell_pattern(pattern).search(value, pos) == (m.span() if m else None)


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet="ab/*?[]!^-\\.", max_size=9), st.text(alphabet="ab/.-[]\n\\^!", max_size=10))
def test_ignore_patterns_match_the_regex(pattern: str, path: str) -> None:
    # (the old translation read "[]", "[!]" and "[^]" wrongly: a "]" first in a class is a member, as in Go)
    assume(not any(s in pattern for s in ("[]", "[!]", "[^]")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "possible nested set" and the like
        try:
            rx = _old_ignore_regex(pattern)
        except re.error:
            rx = None
    got = copyfiles._compile(pattern)
    if rx is None:
        assert got is None
        return
    assert got is not None and got.fullmatch(path) == bool(rx.match(path))


_HANG = r"""
import sys
from rootless.build import copyfiles
from rootless.frontend.shell import Lexer
v = "a" * 5000
env = {"V": v}
lex = Lexer()
for word in ("${V##*a*a*a*a*a*a*a*b}", "${V#*a*a*a*a*a*a*a*b}", "${V%%*a*a*a*a*a*a*a*b}", "${V%*a*a*a*a*a*a*a*b}",
             "${V//*a*a*a*a*a*a*a*b/x}", "${V/*a*a*a*a*a*a*a*b/x}"):
    assert lex.expand(word, env) == v, word
assert lex.expand("${V//a/b}", env) == "b" * 5000
rules = copyfiles.patterns_to_rules(["*a*a*a*a*a*a*a*b", "**a**a**a**a**a**a**b", "**/*a*a*a*a*a*a*b/**"],
                                    lambda n: "x")
assert not copyfiles.ignored("a" * 4000, rules)
assert not copyfiles.ignored("a/" * 2000 + "\n", rules)
print("done")
"""


def test_crafted_patterns_finish() -> None:
    """A hang guard, not a timing: the old regexes took hours on these; 20 s is plenty for linear work."""
    res = subprocess.run(
        [sys.executable, "-c", _HANG],
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr


# --- helpers for the builds --------------------------------------------------------------------------------


def cf(busybox: str, body: str) -> str:
    return f"FROM oci:{busybox}\n{body}"


def one_error(res: subprocess.CompletedProcess, *needles: str, status: int = 125) -> str:
    """The build failed with exactly one `Error:` line holding needles, and no traceback or exception name."""
    assert res.returncode == status, (res.returncode, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert not re.search(r"\b[A-Z][A-Za-z]*(Error|Exception)\b", errors[0]), errors[0]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def layout_bytes(layout: str) -> bytes:
    """Every blob of an OCI layout, layers decompressed: where a leaked secret would be."""
    import gzip

    out = b""
    blobs = os.path.join(layout, "blobs", "sha256")
    for name in os.listdir(blobs):
        with open(os.path.join(blobs, name), "rb") as f:
            data = f.read()
        out += gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return out


def symlinks(rb: Runner, ctx: str, links: dict[str, str]) -> None:
    for name, target in links.items():
        path = os.path.join(ctx, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)
    rb.own(ctx)


# --- 7: .dockerignore'd files stay invisible through symlinks ----------------------------------------------

SECRETS = {
    ".env": "AWS_SECRET=hunter2\n",
    "secrets/key": "topsecret\n",
    "secrets/pub": "public\n",
    "dir/ok": "ok\n",
    "pubdir/ok": "ok\n",
    "pubdir/secret": "topsecret2\n",
    ".dockerignore": ".env\nsecrets\n!secrets/pub\npubdir/secret\n",
}
SECRET_LINKS = {
    "env-link": ".env",
    "sec-link": "secrets",
    "abs-link": "/.env",
    "dir/link": "../.env",
    "dir/sec": "../secrets",
    "pub-link": "pubdir",
}


def secret_context(rb: Runner, busybox: str, body: str) -> str:
    ctx = rb.context({"Containerfile": cf(busybox, body), **SECRETS})
    symlinks(rb, ctx, SECRET_LINKS)
    return ctx


@pytest.mark.parametrize(
    "body",
    [
        "COPY env-link /x\n",
        "COPY abs-link /x\n",
        "COPY sec-link/key /x\n",
        "COPY sec-l*/key /x\n",
        "COPY sec-link/k* /x/\n",
        "COPY dir/sec/key /x\n",
        "COPY env-l* /x/\n",
        "COPY --parents sec-link/key /x/\n",
        "ADD env-link /x\n",
        "RUN --mount=type=bind,source=env-link,target=/s cat /s\n",
        "RUN --mount=type=bind,source=dir/sec/key,target=/s cat /s\n",
    ],
)
def test_a_symlink_cannot_reach_an_ignored_file(rb: Runner, busybox: str, body: str) -> None:
    ctx = secret_context(rb, busybox, body)
    res = rb.run("build", "--no-cache", ctx, check=False)
    one_error(res, "Containerfile:2:")
    assert "hunter2" not in res.stderr and "topsecret" not in res.stderr


def test_copy_and_bind_of_the_context_keep_symlinks_and_hide_ignored_targets(rb: Runner, busybox: str) -> None:
    probe = (
        "RUN --mount=type=bind,target=/ctx sh -c 'cat /ctx/env-link /ctx/abs-link /ctx/sec-link/key "
        "/ctx/dir/link /ctx/dir/sec/key; test ! -e /ctx/env-link && test ! -e /ctx/sec-link/key && "
        "test ! -e /ctx/dir/link && cat /ctx/sec-link/pub /ctx/dir/ok > /seen'\n"
        "RUN --mount=type=bind,source=dir,target=/d,rw sh -c 'cat /d/link /d/sec/key; test ! -e /d/link'\n"
        "RUN --mount=type=bind,source=pub-link,target=/pl sh -c 'cat /pl/secret; test ! -e /pl/secret && "
        "cat /pl/ok > /seen-pl'\n"
    )
    ctx = secret_context(
        rb,
        busybox,
        "COPY . /all/\nCOPY dir/ /d/\nCOPY sec-link/pub /p\nCOPY sec-link/p* /g/\n"
        "COPY pub-link/ /pl/\nCOPY pub-link/* /pg/\n" + probe,
    )
    out = rb.mkdir()
    res = rb.run("build", "-t", "symsecret", ctx)
    assert "hunter2" not in res.stderr and "topsecret" not in res.stderr
    rb.run("push", "symsecret", f"oci:{out}/l")
    data = layout_bytes(f"{out}/l")
    assert b"hunter2" not in data and b"topsecret" not in data
    tree = flatten(f"{out}/l")
    assert tree["seen"] == ("file", b"public\nok\n")
    for link, target in (
        ("all/env-link", b".env"),
        ("all/sec-link", b"secrets"),
        ("all/dir/link", b"../.env"),
        ("d/link", b"../.env"),
        ("d/sec", b"../secrets"),
    ):
        assert tree[link] == ("symlink", target)  # copied as links, not followed
    assert tree["p"] == ("file", b"public\n") and tree["g/pub"] == ("file", b"public\n")
    assert tree["pl/ok"] == tree["pg/ok"] == tree["seen-pl"] == ("file", b"ok\n")
    assert "pl/secret" not in tree and "pg/secret" not in tree
    assert {k for k in tree if k.startswith(("all/secrets", "all/.env"))} == {"all/secrets", "all/secrets/pub"}


# --- 2: binds of context files cannot write to the host -----------------------------------------------------


def test_rw_file_bind_writes_to_a_throwaway_copy(rb: Runner, busybox: str) -> None:
    run = (
        "RUN --mount=type=bind,source=config,target=/cfg,rw --mount=type=bind,source=run.sh,target=/r.sh,rw "
        "--mount=type=bind,source=ro,target=/ro sh -c '"
        "echo hijacked >> /cfg && chmod 4755 /cfg /r.sh && echo more > /r.sh && "
        "grep -q hijacked /cfg && test -u /cfg && cat /r.sh > /seen-r && "  # the step sees its own writes
        '! chmod 4755 /ro 2>/dev/null && ! sh -c "echo x >> /ro" 2>/dev/null && '
        'grep " /ro " /proc/self/mountinfo > /ro-mount\'\n'
    )
    ctx = rb.context(
        {
            "Containerfile": cf(busybox, run),
            "config": "[core]\n\tbare = false\n",
            "run.sh": "#!/bin/sh\necho hi\n",
            "ro": "read only\n",
        }
    )
    os.chmod(os.path.join(ctx, "run.sh"), 0o755)
    before = {
        n: (os.lstat(os.path.join(ctx, n)), open(os.path.join(ctx, n), "rb").read()) for n in ("config", "run.sh", "ro")
    }
    out = rb.mkdir()
    rb.run("build", "-t", "rwfile", ctx)
    for name, (was, data) in before.items():
        now = os.lstat(os.path.join(ctx, name))
        assert open(os.path.join(ctx, name), "rb").read() == data, name
        assert (now.st_mode, now.st_uid, now.st_ino) == (was.st_mode, was.st_uid, was.st_ino), name
        assert not now.st_mode & (stat.S_ISUID | stat.S_ISGID)
    rb.run("push", "rwfile", f"oci:{out}/l")
    tree = flatten(f"{out}/l")
    assert tree["seen-r"] == ("file", b"more\n")
    assert "cfg" not in tree and "r.sh" not in tree  # mount points and written copies leave no trace
    options = tree["ro-mount"][1].split()[5].split(b",")  # the bind's own flags
    assert b"ro" in options and b"nosuid" in options and b"nodev" in options


@pytest.mark.parametrize(
    "body,needle",
    [
        ("RUN ln -s /nonexistent /x\nRUN --mount=type=tmpfs,target=/x/y true\n", "/x is a symbolic link to nothing"),
        ("RUN ln -s /nonexistent /x\nRUN --mount=type=bind,source=f,target=/x true\n", "/x is a symbolic link"),
        ("RUN ln -s /nope /c\nRUN --mount=type=cache,target=/c/d true\n", "/c is a symbolic link to nothing"),
        ("RUN --mount=type=tmpfs,target=/etc/passwd/y true\n", "/etc/passwd is not a directory"),
        ("RUN ln -s /b /a && ln -s /a /b\nRUN --mount=type=tmpfs,target=/a/x true\n", "too many levels of symbolic"),
        ("RUN --mount=type=bind,source=fifo,target=/f true\n", "only a directory or a regular file"),
    ],
)
def test_bad_mount_targets_are_one_located_error(rb: Runner, busybox: str, body: str, needle: str) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, body), "f": "f\n"})
    os.mkfifo(os.path.join(ctx, "fifo"))
    rb.own(ctx)
    line = body.count("\n") + 1
    one_error(rb.run("build", "--no-cache", ctx, check=False), f"Containerfile:{line}:", needle)


# --- 9: the Containerfile and ignore files of the context stay in it; a file outside is never quoted ---------

CREDENTIALS = "[default]\naws_secret_access_key=hunter2hunter2\n"


def _leaks(res: subprocess.CompletedProcess) -> bool:
    return "hunter2" in res.stderr.lower() or "hunter2" in res.stdout.lower() or "default" in res.stderr.lower()


@pytest.mark.parametrize("name", ["Containerfile", "Dockerfile", ".dockerignore", ".containerignore"])
def test_context_files_cannot_lead_out_of_the_context(rb: Runner, busybox: str, name: str) -> None:
    secret = rb.write(os.path.join(rb.mkdir(), "credentials"), CREDENTIALS, 0o600)
    files = (
        {"f": "f\n"}
        if name in ("Containerfile", "Dockerfile")
        else {"Containerfile": cf(busybox, "COPY f /f\n"), "f": "f\n"}
    )
    ctx = rb.context(files)
    symlinks(rb, ctx, {name: secret})
    res = rb.run("build", ctx, check=False)
    one_error(res, name, "symbolic link out of the build context")
    assert not _leaks(res)
    if name in ("Containerfile", "Dockerfile"):
        res = rb.run("parse", ctx, check=False)
        one_error(res, name, "symbolic link out of the build context")
        assert not _leaks(res)


def test_a_symlink_inside_the_context_is_followed(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"build/Containerfile.real": cf(busybox, "COPY f /f\n"), "f": "f\n", "real.ignore": "f\n"})
    symlinks(rb, ctx, {"Containerfile": "build/Containerfile.real", ".dockerignore": "real.ignore"})
    one_error(rb.run("build", ctx, check=False), "Containerfile:2:", "f: no such file")  # f is ignored


def test_a_named_file_outside_the_context_is_read_but_never_quoted(rb: Runner, busybox: str) -> None:
    secret = rb.write(os.path.join(rb.mkdir(), "credentials"), CREDENTIALS, 0o600)
    ctx = rb.context({"f": "f\n", "skip": "s\n"})
    symlinks(rb, ctx, {"Containerfile": secret})
    for named in (os.path.join(ctx, "Containerfile"), secret):  # -f names it: the user's choice, read
        res = rb.run("build", "-f", named, ctx, check=False)
        one_error(res, f"{named}:1: not a valid Containerfile", "outside the build context")
        assert not _leaks(res)
    # its warnings wait until it has proved to be a Containerfile: this one is not
    warned = rb.write(os.path.join(rb.mkdir(), "Containerfile"), cf(busybox, "RUN echo \\\n\n hunter2\nBOGUS x\n"))
    res = rb.run("build", "-f", warned, ctx, check=False)
    one_error(res, f"{warned}:5: not a valid Containerfile")
    assert not _leaks(res) and "BOGUS" not in res.stderr
    # a real Containerfile out there builds, with the ignore file beside it (also outside, also named by -f)
    outside = rb.mkdir()
    rb.write(os.path.join(outside, "Containerfile"), cf(busybox, "COPY . /all/\n"))
    rb.write(os.path.join(outside, "Containerfile.dockerignore"), "skip\n")
    out = rb.mkdir()
    rb.run("build", "-t", "outside", "-f", os.path.join(outside, "Containerfile"), ctx)
    rb.run("push", "outside", f"oci:{out}/l")
    tree = flatten(f"{out}/l")
    assert "all/f" in tree and "all/skip" not in tree


# --- 14: hostile paths and values are one located error line ------------------------------------------------

HOSTILE = [
    # (Containerfile body, files, symlinks, line, needle)
    ("COPY l* /x/\n", {}, {"link": "missing"}, 2, "link is a symbolic link to nothing"),
    ("COPY a/x /x\n", {}, {"a": "b", "b": "a"}, 2, "too many levels of symbolic links"),
    ("COPY a/* /x/\n", {}, {"a": "b", "b": "a"}, 2, "too many levels of symbolic links"),
    ("RUN --mount=type=bind,source=a/x,target=/t true\n", {}, {"a": "b", "b": "a"}, 2, "too many levels"),
    ("COPY f /etc/passwd/x\n", {"f": "f"}, {}, 2, "COPY: cannot create directory /etc/passwd"),
    ("COPY d /etc/passwd/\n", {"d/x": "x"}, {}, 2, "cannot create directory /etc/passwd"),
    ("WORKDIR /etc/passwd\nRUN true\n", {}, {}, 2, "WORKDIR /etc/passwd: cannot create directory"),
    ("COPY <<.. /x/\nhi\n..\n", {}, {}, 2, "COPY failed: Is a directory: /"),
    ('COPY f "/a\x00b"\n', {"f": "f"}, {}, 2, "NUL byte"),
    ('ENV A="a\x00b"\nRUN true\n', {}, {}, 2, "NUL byte"),
    ('ARG A="a\x00b"\nRUN true\n', {}, {}, 3, "NUL byte"),
    ('WORKDIR "/a\x00b"\n', {}, {}, 2, "NUL byte"),
    ('RUN --mount=type=bind,source="a\x00",target=/t true\n', {}, {}, 2, "NUL byte"),
    ("RUN --mount=type=tmpfs,target=/t,size=1.1.1 true\n", {}, {}, 2, "invalid value for size"),
    ("RUN --mount=type=tmpfs,target=/t,size=" + "9" * 400 + " true\n", {}, {}, 2, "invalid value for size"),
    ("ARG U=\u00b2\nCOPY --chown=$U f /x\n", {"f": "f"}, {}, 3, "unable to find user \u00b2"),
    ("COPY --chown=99999999999999999999 f /x\n", {"f": "f"}, {}, 2, "ids must be below 4294967295"),
    ("USER 4294967295\nRUN true\n", {}, {}, 3, "ids must be below 4294967295"),
    ("ADD http://[::1 /x\n", {}, {}, 2, "cannot download"),
    ("COPY f /x\n", {"f": "f", ".dockerignore": "ok\n[z-a]\n"}, {}, 2, ".dockerignore:2: invalid pattern '[z-a]'"),
    ("COPY --exclude=[z-a] f /x\n", {"f": "f"}, {}, 2, "COPY --exclude: invalid pattern"),
]


@pytest.mark.parametrize("body,files,links,line,needle", HOSTILE)
def test_hostile_input_is_one_located_error(
    rb: Runner, busybox: str, body: str, files: dict[str, str], links: dict[str, str], line: int, needle: str
) -> None:
    ctx = rb.context({"Containerfile": cf(busybox, body), **files})
    symlinks(rb, ctx, links)
    res = rb.run("build", "--no-cache", ctx, check=False)
    error = one_error(res, needle)
    assert "/tmp/rbuild-" not in error and "merged" not in error  # no host path of the build's own
    if ".dockerignore:" not in needle:
        assert f"Containerfile:{line}: " in error, error


def test_add_of_an_archive_with_ids_and_times_out_of_range(rb: Runner, busybox: str) -> None:
    import io
    import tarfile

    for name, attrs in (("uid", {"uid": 2**40}), ("mtime", {"mtime": 2**70}), ("dirmtime", {"mtime": 2**70})):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            ti = tarfile.TarInfo("entry")
            ti.type = tarfile.DIRTYPE if name == "dirmtime" else tarfile.REGTYPE
            for k, v in attrs.items():
                setattr(ti, k, v)
            tf.addfile(ti, None if ti.isdir() else io.BytesIO(b""))
        ctx = rb.context({"Containerfile": cf(busybox, "ADD evil.tar /x/\n"), "evil.tar": buf.getvalue()})
        one_error(rb.run("build", ctx, check=False), "Containerfile:2: ADD: archive evil.tar is damaged")


def test_ignore_file_names_are_bytes(rb: Runner, busybox: str) -> None:
    """A .dockerignore that is not UTF-8 still ignores the file it names (and is no traceback)."""
    ctx = rb.context({"Containerfile": cf(busybox, "COPY . /all/\n"), "keep": "k\n", ".dockerignore": b"\xff*\n"})
    with open(os.path.join(ctx.encode(), b"\xffsecret"), "wb") as f:
        f.write(b"hunter2\n")
    rb.own(ctx)
    out = rb.mkdir()
    rb.run("build", "-t", "bytesignore", ctx)
    rb.run("push", "bytesignore", f"oci:{out}/l")
    assert b"hunter2" not in layout_bytes(f"{out}/l") and "all/keep" in flatten(f"{out}/l")
