"""Typed instructions: BuildKit's instruction-level checks (instructions/parse_test.go, bflag_test.go)
and its dispatcher's expansion rules."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from rootless.errors import ContainerfileError
from rootless.frontend import instructions as ins
from rootless.frontend.containerfile import Heredoc, parse
from rootless.frontend.shell import Lexer


def cmds(text: str) -> list[ins.Command]:
    return [ins.parse_instruction(n, "Containerfile") for n in parse(text, "Containerfile").nodes]


def one(text: str) -> ins.Command:
    c = cmds(text)
    assert len(c) == 1
    return c[0]


def fails(text: str) -> ContainerfileError:
    with pytest.raises(ContainerfileError) as e:
        cmds(text)
    return e.value


def expanded(text: str, env: Mapping[str, str], escape: str = "\\") -> ins.Command:
    return one(text).expand(Lexer(escape), env)


# --- arity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["MAINTAINER", "WORKDIR", "USER", "STOPSIGNAL"])
def test_exactly_one_argument(keyword: str) -> None:
    assert f"{keyword} requires exactly one argument" in str(fails(keyword))


@pytest.mark.parametrize("keyword", ["ENV", "LABEL", "ONBUILD", "HEALTHCHECK", "EXPOSE", "VOLUME", "ARG", "SHELL"])
def test_at_least_one_argument(keyword: str) -> None:
    assert f"{keyword} requires at least one argument" in str(fails(keyword))


@pytest.mark.parametrize("keyword", ["ADD", "COPY"])
def test_no_destination(keyword: str) -> None:
    for text in (f"{keyword} arg1", f'{keyword} ["arg1"]', f"{keyword} --chown=1 \t\n"):
        assert (
            f"{keyword} requires at least two arguments, but only one was provided. Destination could not "
            "be determined." in str(fails(text))
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ENV =x", "ENV names can not be blank"),
        ("LABEL =x", "LABEL names can not be blank"),
        ("ARG =x", "ARG names can not be blank"),
        ("FROM a b", "FROM requires either one or three arguments"),
        ("FROM a to b", "FROM requires either one or three arguments"),
        ("FROM", "FROM requires either one or three arguments"),
        ("FROM a AS 1b", 'invalid name for build stage: "1b", name can\'t start with a number or contain symbols'),
        ("FROM a AS b$c", "invalid name for build stage"),
        ("SHELL sh -c", "SHELL requires the arguments to be in JSON form"),
        ("SHELL []", "SHELL requires at least one argument"),
        ('VOLUME ["/a", " "]', "VOLUME specified can not be an empty string"),
        ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
        ("HEALTHCHECK CONNECT TCP 7000", 'Unknown type "CONNECT" in HEALTHCHECK (try CMD)'),
        ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
        ("HEALTHCHECK --interval=5 CMD x", 'time: missing unit in duration "5"'),
        ("HEALTHCHECK --timeout=1x CMD x", 'time: unknown unit "x" in duration "1x"'),
        ("HEALTHCHECK --start-period=abc CMD x", 'time: invalid duration "abc"'),
        ("HEALTHCHECK --start-interval=10us CMD x", 'Interval "start-interval" cannot be less than 1ms'),
        ("HEALTHCHECK --interval=-1s CMD x", 'Interval "interval" cannot be less than 1ms'),
        ("HEALTHCHECK --retries=-1 CMD x", "--retries cannot be negative (-1)"),
        ("HEALTHCHECK --retries=x CMD x", 'strconv.ParseInt: parsing "x": invalid syntax'),
        ("HEALTHCHECK --retries=2147483648 CMD x", "value out of range"),
        ("ONBUILD ONBUILD RUN touch foobar", "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"),
        ("ONBUILD FROM scratch", "FROM isn't allowed as an ONBUILD trigger"),
        ("ONBUILD maintainer docker.io", "MAINTAINER isn't allowed as an ONBUILD trigger"),
        ("COPY <<EOF <<EOF2\nx\nEOF\ny\nEOF2\n", "COPY cannot accept a heredoc as a destination"),
        ("RUN --network=bridge x", 'invalid network mode "bridge"'),
        ("RUN --security=weak x", 'security "weak" is not valid'),
    ],
)
def test_instruction_errors(text: str, message: str) -> None:
    assert message in str(fails(text))


# --- unknown instructions and flags -------------------------------------------------------------------


def test_unknown_instruction() -> None:
    e = fails("FROM a\n\nfoo bar\n")
    assert str(e) == 'Containerfile:3: unknown instruction: foo (did you mean from?) in "foo bar"'
    assert str(fails("BOGUS x")) == 'Containerfile:1: unknown instruction: BOGUS in "BOGUS x"'
    assert "unknown instruction: RUNN (did you mean RUN?)" in str(fails("RUNN x"))
    assert "unknown instruction: copyy (did you mean copy?)" in str(fails("copyy a b"))
    assert "unknown instruction: Expos (did you mean expose?)" in str(fails("Expos 80"))
    assert str(fails("FROM a\n\\")).startswith("Containerfile:2: unknown instruction: ")  # an empty line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MAINTAINER --boo joe@example.com", "unknown flag: --boo"),
        ("COPY --form=a b c", "unknown flag: --form (did you mean from?)"),
        ("COPY --chmon=1 b c", "unknown flag: --chmon (did you mean chmod?)"),
        ('CMD --doit [ "a", "b" ]', "unknown flag: --doit"),
        ("ADD --parents a b", "unknown flag: --parents"),
        ("RUN --device=x a", "unknown flag: --device"),
        ("ONBUILD --x RUN a", "unknown flag: --x"),
        ("COPY --chown=1 --chown=2 a b", "duplicate flag specified: --chown"),
        ("COPY --link --link a b", "duplicate flag specified: --link"),
        ("FROM --platform=a --platform=b c", "duplicate flag specified: --platform"),
        ("COPY --chown a b", "missing a value on flag: --chown"),
        ("RUN --mount x", "missing a value on flag: --mount"),
        ("COPY --link= a b", "missing a value on flag: --link"),
        ("COPY --link=yes a b", "expecting boolean value for flag --link, not: yes"),
    ],
)
def test_flag_errors(text: str, message: str) -> None:
    assert message in str(fails(text))


def test_flags_that_may_repeat_and_bools() -> None:
    c = one("COPY --exclude=*.md --exclude=tmp --link=TRUE --parents=false a b")
    assert isinstance(c, ins.CopyCmd)
    assert (c.exclude, c.link, c.parents) == (["*.md", "tmp"], True, False)
    r = one("RUN --mount=type=cache,target=/a --mount=type=tmpfs,target=/b --network=none --security=insecure x")
    assert isinstance(r, ins.RunCmd)
    assert (r.mounts, r.network, r.security) == (["type=cache,target=/a", "type=tmpfs,target=/b"], "none", "insecure")
    assert isinstance(c := one("COPY --link --parents a b"), ins.CopyCmd) and c.link and c.parents


def test_flags_buildkit_does_not_check() -> None:
    # BuildKit never parses the flags of ARG, STOPSIGNAL and HEALTHCHECK NONE.
    assert isinstance(one("ARG --anything x"), ins.ArgCmd)
    assert isinstance(one("STOPSIGNAL --anything 9"), ins.StopsignalCmd)
    assert isinstance(one("HEALTHCHECK --anything NONE"), ins.HealthcheckCmd)


def test_errors_name_file_line_and_instruction() -> None:
    e = fails("FROM a\nRUN ok\nCOPY --form=build \\\n  /a /b\n")
    assert (e.filename, e.line) == ("Containerfile", 3)
    assert str(e) == 'Containerfile:3: unknown flag: --form (did you mean from?) in "COPY --form=build   /a /b"'
    long = fails("LABEL " + "x=y " * 100 + "z")
    assert str(long).endswith('..."')


# --- what each instruction holds ------------------------------------------------------------------------


def test_from() -> None:
    c = one("FROM --platform=linux/arm64 alpine:3 AS Build-1.x")
    assert isinstance(c, ins.FromCmd)
    assert (c.image, c.name, c.platform) == ("alpine:3", "build-1.x", "linux/arm64")
    c = one("from scratch as base")
    assert isinstance(c, ins.FromCmd) and (c.image, c.name, c.platform) == ("scratch", "base", None)


def test_arg() -> None:
    c = one('ARG a b= c=d e="f g"')
    assert isinstance(c, ins.ArgCmd)
    assert c.args == [("a", None), ("b", ""), ("c", "d"), ("e", '"f g"')]


def test_env_and_label() -> None:
    c = one("ENV a=1 b=\"2 3\"\t c='x'")
    assert isinstance(c, ins.EnvCmd) and c.env == [("a", "1"), ("b", '"2 3"'), ("c", "'x'")]
    c = one("ENV key value with spaces")
    assert isinstance(c, ins.EnvCmd) and c.env == [("key", "value with spaces")]
    c = one('LABEL "com.example.vendor"="ACME Inc" version=1.0')
    assert isinstance(c, ins.LabelCmd) and c.labels == [('"com.example.vendor"', '"ACME Inc"'), ("version", "1.0")]


def test_run_cmd_entrypoint_shell() -> None:
    r = one("RUN echo $HOME && ls")
    assert isinstance(r, ins.RunCmd) and (r.args, r.shell_form) == (["echo $HOME && ls"], True)
    r = one('RUN ["echo", "$HOME"]')
    assert isinstance(r, ins.RunCmd) and (r.args, r.shell_form) == (["echo", "$HOME"], False)
    c = one('CMD ["a", "b"]')
    assert isinstance(c, ins.CmdCmd) and (c.args, c.shell_form) == (["a", "b"], False)
    e = one("ENTRYPOINT /bin/app --flag")
    assert isinstance(e, ins.EntrypointCmd) and (e.args, e.shell_form) == (["/bin/app --flag"], True)
    e = one("ENTRYPOINT []")
    assert isinstance(e, ins.EntrypointCmd) and (e.args, e.shell_form) == ([], False)
    s = one('SHELL ["powershell", "-command"]')
    assert isinstance(s, ins.ShellCmd) and s.shell == ["powershell", "-command"]


def test_run_heredoc() -> None:
    r = one("RUN <<EOF\n#!/bin/sh\necho hi\nEOF\n")
    assert isinstance(r, ins.RunCmd)
    assert r.args == ["<<EOF"] and r.heredocs == [Heredoc("EOF", "#!/bin/sh\necho hi\n", True, False, 0)]


def test_copy_and_add() -> None:
    c = one("COPY --from=build --chown=1:2 --chmod=0755 a b /dst/")
    assert isinstance(c, ins.CopyCmd)
    assert (c.sources, c.dest, c.from_, c.chown, c.chmod, c.link, c.exclude, c.heredocs) == (
        ["a", "b"],
        "/dst/",
        "build",
        "1:2",
        "0755",
        False,
        [],
        [],
    )
    a = one("ADD --checksum=sha256:abc --keep-git-dir --unpack=false --link http://x/y.tgz /d")
    assert isinstance(a, ins.AddCmd)
    assert (a.sources, a.dest, a.checksum, a.keep_git_dir, a.unpack, a.link, a.parents) == (
        ["http://x/y.tgz"],
        "/d",
        "sha256:abc",
        True,
        False,
        True,
        False,
    )
    assert isinstance(a := one("ADD a b"), ins.AddCmd) and a.unpack is None and a.checksum is None
    c = one('COPY ["with space", "/d"]')
    assert isinstance(c, ins.CopyCmd) and c.sources == ["with space"]


def test_copy_heredoc_sources() -> None:
    c = one("COPY a <<-EOF <<'RAW' /dst\n\tx $v\n\tEOF\n$v\nRAW\n")
    assert isinstance(c, ins.CopyCmd)
    assert c.sources == ["a"] and c.dest == "/dst"
    assert c.heredocs == [Heredoc("EOF", "x $v\n", True, True, 0), Heredoc("RAW", "$v\n", False, False, 0)]


def test_expose_volume_user_workdir_stopsignal_maintainer() -> None:
    assert isinstance(c := one("EXPOSE 8080 443/tcp 80"), ins.ExposeCmd) and c.ports == ["443/tcp", "80", "8080"]
    assert isinstance(c := one('VOLUME ["/a", " /b "]'), ins.VolumeCmd) and c.volumes == ["/a", "/b"]
    assert isinstance(c := one("USER app:app"), ins.UserCmd) and c.user == "app:app"
    assert isinstance(c := one("WORKDIR /srv/my app"), ins.WorkdirCmd) and c.path == "/srv/my app"
    assert isinstance(c := one("STOPSIGNAL SIGTERM"), ins.StopsignalCmd) and c.signal == "SIGTERM"
    assert isinstance(c := one("MAINTAINER me <m@e>"), ins.MaintainerCmd) and c.maintainer == "me <m@e>"


def test_healthcheck() -> None:
    h = one("HEALTHCHECK NONE")
    assert isinstance(h, ins.HealthcheckCmd) and h.test == ["NONE"] and h.interval is None
    h = one(
        "HEALTHCHECK --interval=1m30s --timeout=3s --start-period=0s --start-interval=5ms --retries=0 "
        "CMD curl -f http://localhost/"
    )
    assert isinstance(h, ins.HealthcheckCmd)
    assert h.test == ["CMD-SHELL", "curl -f http://localhost/"]
    assert (h.interval, h.timeout, h.start_period, h.start_interval, h.retries) == (
        90_000_000_000,
        3_000_000_000,
        0,
        5_000_000,
        0,
    )
    h = one('HEALTHCHECK cmd ["/bin/check", "-q"]')
    assert isinstance(h, ins.HealthcheckCmd) and h.test == ["CMD", "/bin/check", "-q"]
    assert h.interval is None and h.retries is None


def test_onbuild() -> None:
    o = one("ONBUILD   RUN echo $x  ")
    assert isinstance(o, ins.OnbuildCmd) and o.expression == "RUN echo $x  "
    o = one("onbuild COPY <<EOF /a\nhello\nEOF\n")
    assert isinstance(o, ins.OnbuildCmd) and o.expression == "COPY <<EOF /a\nhello\nEOF"
    o = one("ONBUILD BOGUS x")  # BuildKit checks the trigger only when it fires
    assert isinstance(o, ins.OnbuildCmd) and o.expression == "BOGUS x"


def test_parse_all() -> None:
    cf = parse("ARG V=1\nFROM a:$V\nRUN x\n")
    assert [type(c).__name__ for c in ins.parse_all(cf)] == ["ArgCmd", "FromCmd", "RunCmd"]
    with pytest.raises(ContainerfileError) as e:
        ins.parse_all(parse("ARG V=1\nRUN x\nFROM a\n", "F"))
    assert str(e.value) == 'F:2: no build stage in current context in "RUN x"'


# --- expansion ----------------------------------------------------------------------------------------------


def test_from_expands_with_meta_args() -> None:
    f = expanded("FROM --platform=$P ${IMG:-alpine}:$TAG AS b", {"P": "linux/amd64", "TAG": "3"})
    assert isinstance(f, ins.FromCmd) and (f.image, f.platform, f.name) == ("alpine:3", "linux/amd64", "b")
    with pytest.raises(ContainerfileError, match=r"base name \(\$NOPE\) should not be blank"):
        expanded("FROM $NOPE", {})
    with pytest.raises(ContainerfileError, match=r"empty platform value from expression \$P"):
        expanded("FROM --platform=$P a", {})


def test_env_sees_values_from_before_the_instruction() -> None:
    e = expanded('ENV a=1 b=$a $k=x c="$a $b"', {"a": "old", "k": "key"})
    assert isinstance(e, ins.EnvCmd)
    assert e.env == [("a", "1"), ("b", "old"), ("key", "x"), ("c", "old ")]
    e = expanded("ENV PATH $PATH:/x", {"PATH": "/bin"})
    assert isinstance(e, ins.EnvCmd) and e.env == [("PATH", "/bin:/x")]


def test_label_and_arg_expand() -> None:
    lab = expanded('LABEL v=$V "n"="a b"', {"V": "1"})
    assert isinstance(lab, ins.LabelCmd) and lab.labels == [("v", "1"), ("n", "a b")]
    arg = one('ARG $N A=$V B="${V}-x" C=${bad')
    assert isinstance(arg, ins.ArgCmd)
    out = arg.expand(Lexer(), {"V": "1"}, skip={"C"})
    assert out.args == [("$N", None), ("A", "1"), ("B", "1-x"), ("C", "${bad")]
    with pytest.raises(ContainerfileError, match=r'failed to process "\$\{bad"'):
        arg.expand(Lexer(), {"V": "1"})


def test_copy_expands_paths_chown_chmod_but_not_from() -> None:
    c = expanded(
        "COPY --from=$S --chown=$U:$G --chmod=$MODE $SRC/a 'b'c ${DST}/",
        {"S": "x", "U": "1", "G": "2", "MODE": "0755", "SRC": "/src", "DST": "/dst"},
    )
    assert isinstance(c, ins.CopyCmd)
    assert (c.from_, c.chown, c.chmod, c.sources, c.dest) == ("$S", "1:2", "0755", ["/src/a", "bc"], "/dst/")
    c = expanded('COPY ["$SRC/a b", "$DST"]', {"SRC": "/s", "DST": "/d"})
    assert isinstance(c, ins.CopyCmd) and (c.sources, c.dest) == (["/s/a b"], "/d")
    with pytest.raises(ContainerfileError, match="matching double-quote"):
        expanded('COPY "a b" /d', {})  # the shell form splits at white space first, as BuildKit does
    c = expanded("COPY --chown=$EMPTY a b", {})
    assert isinstance(c, ins.CopyCmd) and c.chown is None
    a = expanded("ADD --checksum=$SUM --chmod=$M $URL /", {"SUM": "sha256:1", "M": "644", "URL": "http://h/f"})
    assert isinstance(a, ins.AddCmd) and (a.checksum, a.chmod, a.sources) == ("sha256:1", "644", ["http://h/f"])


def test_heredoc_bodies_expand_only_with_unquoted_delimiter() -> None:
    c = expanded('COPY <<A <<"B" <<-C /d\n$v \'$v\' "$v" \\$v \\t\nA\n$v\nB\n\t${v}\nC\n', {"v": "1"})
    assert isinstance(c, ins.CopyCmd)
    assert [h.content for h in c.heredocs] == ["1 '1' \"1\" $v t\n", "$v\n", "1\n"]


def test_shell_commands_are_not_expanded() -> None:
    env = {"x": "1"}
    for text in (
        "RUN echo $x",
        'RUN ["echo", "$x"]',
        "CMD echo $x",
        'ENTRYPOINT ["$x"]',
        'SHELL ["$x"]',
        "HEALTHCHECK CMD echo $x",
        "ONBUILD RUN echo $x",
        "MAINTAINER $x",
    ):
        c = one(text)
        assert c.expand(Lexer(), env) == c


def test_run_mounts_expand_values() -> None:
    r = expanded('RUN --mount=type=cache,target=$T,id="$ID",from=stage$ x $T', {"T": "/c", "ID": "a,b"})
    assert isinstance(r, ins.RunCmd)
    assert r.mounts == ['type=cache,target=/c,"id=a,b",from=stage$'] and r.args == ["x $T"]
    assert r.mount_specs() == [ins.Mount(type="cache", target="/c", cache_id="a,b", from_="stage$")]
    with pytest.raises(ContainerfileError, match="'from' doesn't support variable expansion"):
        one("RUN --mount=type=bind,from=${STAGE},target=/a x")


def test_expose_splits_words() -> None:
    e = expanded("EXPOSE $PORTS '9000'", {"PORTS": "80/tcp  443"})
    assert isinstance(e, ins.ExposeCmd) and e.ports == ["80/tcp", "443", "9000"]


def test_single_word_instructions_expand() -> None:
    env = {"d": "/srv", "u": "app", "s": "SIGINT", "e": ""}
    assert isinstance(w := expanded("WORKDIR $d/x", env), ins.WorkdirCmd) and w.path == "/srv/x"
    assert isinstance(u := expanded("USER ${u}:${u}", env), ins.UserCmd) and u.user == "app:app"
    assert isinstance(s := expanded("STOPSIGNAL $s", env), ins.StopsignalCmd) and s.signal == "SIGINT"
    assert isinstance(v := expanded('VOLUME ["$d", "/x"]', env), ins.VolumeCmd) and v.volumes == ["/srv", "/x"]
    with pytest.raises(ContainerfileError, match="VOLUME specified can not be an empty string"):
        expanded("VOLUME $e", env)


def test_backtick_escape_in_expansion() -> None:
    cf = parse("# escape=`\nFROM a\nWORKDIR C:\\dir`$x\n")
    w = ins.parse_instruction(cf.nodes[1], "F").expand(Lexer(cf.escape), {"x": "1"})
    assert isinstance(w, ins.WorkdirCmd) and w.path == "C:\\dir$x"


def test_expansion_errors_are_located() -> None:
    with pytest.raises(ContainerfileError) as e:
        cmds("FROM a\nENV a=${b:?must_be_set}\n")[1].expand(Lexer(), {})
    assert (
        str(e.value) == 'Containerfile:2: failed to process "${b:?must_be_set}": b: must_be_set '
        'in "ENV a=${b:?must_be_set}"'
    )


def test_expand_returns_a_new_command() -> None:
    c = one("WORKDIR $d")
    out = c.expand(Lexer(), {"d": "/x"})
    assert out is not c and isinstance(c, ins.WorkdirCmd) and c.path == "$d"


# --- helpers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("1ns", 1),
        ("1.5h", 5_400_000_000_000),
        ("1m30s", 90_000_000_000),
        ("-2ms", -2_000_000),
        ("+3us", 3000),
        ("4µs", 4000),
        ("4μs", 4000),
        (".5s", 500_000_000),
        ("1.s", 1_000_000_000),
        ("2h45m0.5s", 9_900_500_000_000),
    ],
)
def test_parse_duration(text: str, ns: int) -> None:
    assert ins.parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "1", ".s", "s", "1x", "-", "1e3s", "9999999999999999999h"])
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        ins.parse_duration(text)


@pytest.mark.parametrize(
    ("value", "mount"),
    [
        ("target=/a", ins.Mount(target="/a", readonly=True)),
        (
            "type=cache,target=/a,id=x,sharing=LOCKED,mode=0700,uid=1,gid=2",
            ins.Mount(type="cache", target="/a", cache_id="x", sharing="locked", mode=0o700, uid=1, gid=2),
        ),
        ("type=tmpfs,dst=/t,size=64m", ins.Mount(type="tmpfs", target="/t", size=64 << 20)),
        (
            "type=secret,id=tok,env=TOKEN,required",
            ins.Mount(type="secret", cache_id="tok", env="TOKEN", required=True, readonly=True),
        ),
        ("type=bind,from=b,source=/s,target=/t,rw", ins.Mount(from_="b", source="/s", target="/t")),
        ('"type=bind","target=/a,b",ro=false', ins.Mount(target="/a,b")),
    ],
)
def test_parse_mount(value: str, mount: ins.Mount) -> None:
    assert ins.parse_mount(value) == mount


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("type=volume,target=/a", 'unsupported mount type "volume"'),
        ("type=cahce,target=/a", 'unsupported mount type "cahce" (did you mean cache?)'),
        ("targte=/a", "unexpected key 'targte' in 'targte=/a' (did you mean target?)"),
        ("target", "invalid field 'target' must be a key=value pair"),
        ("type=bind,target=/a,mode=0700", 'mode not allowed for "bind" type mounts'),
        ("type=cache,target=/a,mode=9", "invalid value 9 for mode"),
        ("type=bind,target=/a,sharing=locked", "invalid cache sharing set for bind mount"),
        ("type=secret,from=x,id=a", "secret mount should not have a from"),
        ("type=secret", "invalid secret mount. one of source, target required"),
        ("type=bind,required", "unexpected key 'required' for mount type 'bind'"),
        ("type=cache,size=1g", "unexpected key 'size' for mount type 'cache'"),
        ('target="/a', 'failed to parse csv mounts: bare " in non-quoted-field'),
        ('"target=/a', 'failed to parse csv mounts: extraneous or missing " in quoted-field'),
        ("", "failed to parse csv mounts: EOF"),
    ],
)
def test_parse_mount_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        ins.parse_mount(value)
    assert message in str(e.value)


def test_mount_errors_are_located() -> None:
    r = one("RUN --mount=type=nope,target=/x true")
    with pytest.raises(ContainerfileError, match='Containerfile:1: unsupported mount type "nope"'):
        assert isinstance(r, ins.RunCmd)
        r.mount_specs()


@pytest.mark.parametrize(
    ("value", "options", "case_sensitive", "expected"),
    [
        ("form", ["from", "chown", "chmod"], True, "from"),
        ("from", ["from", "chown"], True, None),
        ("zzzzzz", ["from"], True, None),
        ("RUNN", ["RUN", "COPY"], False, "RUN"),
        ("runn", ["RUN", "COPY"], False, "run"),
        ("Runn", ["RUN", "COPY"], False, "run"),
    ],
)
def test_suggest(value: str, options: list[str], case_sensitive: bool, expected: str | None) -> None:
    assert ins.suggest(value, options, case_sensitive) == expected


# instructions/parse_heredoc_test.go
@pytest.mark.parametrize(
    ("text", "sources", "dest", "docs"),
    [
        ("COPY /foo /bar", ["/foo"], "/bar", []),
        ("COPY <<EOF /bar\nEOF", [], "/bar", [("EOF", "", True)]),
        ("COPY <<EOF /bar\nTESTING\nEOF", [], "/bar", [("EOF", "TESTING\n", True)]),
        ("COPY <<-EOF /bar\n\tTESTING\nEOF", [], "/bar", [("EOF", "TESTING\n", True)]),
        ("COPY <<'EOF' /bar\nTESTING\nEOF", [], "/bar", [("EOF", "TESTING\n", False)]),
        (
            "COPY <<EOF1 <<EOF2 /bar\nthis is the first file\nEOF1\nthis is the second file\nEOF2",
            [],
            "/bar",
            [("EOF1", "this is the first file\n", True), ("EOF2", "this is the second file\n", True)],
        ),
        ("COPY <<EOF foo.txt /bar\nthis is inline\nEOF", ["foo.txt"], "/bar", [("EOF", "this is inline\n", True)]),
        ('COPY <<EOF /quotes\n"quotes"\nEOF', [], "/quotes", [("EOF", '"quotes"\n', True)]),
    ],
)
def test_copy_heredoc_table(text: str, sources: list[str], dest: str, docs: list[tuple[str, str, bool]]) -> None:
    c = one(text)
    assert isinstance(c, ins.CopyCmd)
    assert (c.sources, c.dest, [(h.name, h.content, h.expand) for h in c.heredocs]) == (sources, dest, docs)


@pytest.mark.parametrize(
    ("text", "shell", "args", "docs"),
    [
        ('RUN ["ls", "/"]', False, ["ls", "/"], []),
        ('RUN ["<<EOF"]', False, ["<<EOF"], []),
        ("RUN ls /", True, ["ls /"], []),
        ("RUN <<EOF\nls /\nwhoami\nEOF", True, ["<<EOF"], [("EOF", "ls /\nwhoami\n", False)]),
        (
            'RUN <<\'EOF\' | python\nprint("hello")\nprint("world")\nEOF',
            True,
            ["<<'EOF' | python"],
            [("EOF", 'print("hello")\nprint("world")\n', False)],
        ),
        ("RUN <<-EOF\n\techo test\nEOF", True, ["<<-EOF"], [("EOF", "\techo test\n", True)]),
    ],
)
def test_run_heredoc_table(text: str, shell: bool, args: list[str], docs: list[tuple[str, str, bool]]) -> None:
    r = one(text)
    assert isinstance(r, ins.RunCmd)
    assert (r.shell_form, r.args, [(h.name, h.content, h.chomp) for h in r.heredocs]) == (shell, args, docs)


def test_copy_heredoc_destination_is_refused() -> None:
    assert "COPY cannot accept a heredoc as a destination" in str(fails("COPY /foo <<EOF\nEOF"))
