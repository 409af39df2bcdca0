"""`rbuild completion bash|zsh|fish`: each script loaded in the real shell and asked for completions.

Every subcommand and flag of the argument parser must come back (the scripts are made from it, so a new
flag is completed without anyone editing a script); `--help` shows examples for build, run and push.
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import shutil
import subprocess
import tempfile
import time

import pytest

from rootless.cli import completion
from rootless.cli.main import build_parser, main


def _script(shell: str) -> str:
    return completion.script(shell, build_parser(None))


def _bash(words: list[str]) -> list[str]:
    """What the bash script offers for the command line `words` (the last word is being completed)."""
    with tempfile.NamedTemporaryFile("w", suffix=".bash") as f:
        f.write(_script("bash"))
        f.flush()
        arr = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
        prog = f"""source {f.name}
COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}
_rbuild
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
        res = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, check=True)
    return [ln for ln in res.stdout.splitlines() if ln]


def test_bash_subcommands_and_flags() -> None:
    assert _bash(["rbuild", "bu"]) == ["build", "bud"]
    assert _bash(["rbuild", "--root", "/tmp/x", "ru"]) == ["run"]
    assert _bash(["rbuild", "build", "--no"]) == ["--no-cache"]
    assert _bash(["rbuild", "build", "--format", ""]) == ["oci", "docker"]
    assert _bash(["rbuild", "history", "--format", "j"]) == ["json"]
    assert _bash(["rbuild", "save", "--format", ""]) == ["docker-archive", "oci-archive"]
    assert _bash(["rbuild", "completion", ""]) == ["bash", "zsh", "fish"]
    assert set(_bash(["rbuild", "run", "-"])) >= {"-i", "-t", "--rm", "-e", "-v", "--workdir", "--user", "--name"}
    assert _bash(["rbuild", "-"]) == [
        "-h",
        "--help",
        "--version",
        "--root",
        "--log-level",
        "--storage-driver",
        "--isolation",
    ]


def test_bash_knows_every_flag_of_the_parser() -> None:
    """The drift check: every subcommand, and every flag each one has, is completed."""
    parser = build_parser(None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(_bash(["rbuild", ""])) == set(sub.choices)
    for name, p in sub.choices.items():
        flags = {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
        assert set(_bash(["rbuild", name, "-"])) == flags, name


def test_bash_completes_files_for_values(tmp_path: object) -> None:
    d = tempfile.mkdtemp()
    try:
        open(os.path.join(d, "Containerfile.dev"), "w").close()
        assert _bash(["rbuild", "build", "-f", os.path.join(d, "Contai")]) == [os.path.join(d, "Containerfile.dev")]
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".fish") as f:
        f.write(_script("fish"))
        f.flush()

        def ask(line: str) -> list[str]:
            res = subprocess.run(
                ["fish", "--no-config", "-c", f"source {f.name}; complete -C '{line}'"],
                capture_output=True,
                text=True,
                check=True,
            )
            return [ln.split("\t")[0] for ln in res.stdout.splitlines()]

        assert ask("rbuild bu") == ["bud", "build"]
        assert ask("rbuild build --no") == ["--no-cache"]
        assert ask("rbuild history --format ") == ["json", "table"]
        assert "--interactive" in ask("rbuild run --")


def _read(fd: int, want: bytes, timeout: float = 10) -> bytes:
    out = b""
    end = time.monotonic() + timeout
    while want not in out and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
    return out


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_in_a_terminal() -> None:
    """zsh completes only in its line editor: a real pty, Tab pressed."""
    home = tempfile.mkdtemp()
    script = os.path.join(home, "_rbuild")
    with open(script, "w") as f:
        f.write(_script("zsh"))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        ["zsh", "-f", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={"PATH": "/usr/bin:/bin", "HOME": home, "TERM": "dumb"},
        start_new_session=True,
    )
    os.close(slave)
    try:
        os.write(
            master, f"autoload -U compinit && compinit -u -d {home}/.zcd && source {script} && echo LOADED\n".encode()
        )
        assert b"LOADED" in _read(master, b"LOADED\r\n")
        os.write(master, b"rbuild histo\t")
        assert b"rbuild history " in _read(master, b"history ")
        os.write(master, b"\x15rbuild build --format \t")
        assert b"docker  oci" in _read(master, b"docker  oci")
    finally:
        os.close(master)
        proc.kill()
        proc.wait()
        shutil.rmtree(home)


@pytest.mark.parametrize(
    "command,example", [("build", "rbuild build -t"), ("run", "rbuild run -it"), ("push", "rbuild push")]
)
def test_help_has_examples(command: str, example: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and example in out


def test_completion_command_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    assert capsys.readouterr().out == _script("bash")
    assert main(["completion", "tcsh"]) == 125
