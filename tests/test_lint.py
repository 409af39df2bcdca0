"""rbuild build --check (issue 18): BuildKit's build checks, FILE:LINE: Rule: message, exit 1, nothing built.

Expected results after BuildKit's rules (frontend/dockerfile/linter/ruleset.go: names and messages) and
the `# check=skip=` directive (frontend/dockerfile/docs/reference.md, "check"). buildah 1.28 has no
--check: no differential test.
"""

from __future__ import annotations

from conftest import Runner

BAD = """\
FROM busybox as Build
MAINTAINER someone
ARG GITHUB_TOKEN
ENV DB_PASSWORD=x
ENV legacy value
WORKDIR relative/dir
CMD echo one
CMD echo two
run true
FROM $UNDECLARED AS build
FROM --platform=$TARGETPLATFORM scratch AS context
"""

JSON_CMD = "JSON arguments recommended for CMD to prevent unintended behavior related to OS signals"


def check(rb: Runner, text: str) -> tuple[int, list[str], str]:
    ctx = rb.context({"Containerfile": text})
    res = rb.run("build", "--check", "-t", "localhost/never-built", ctx, check=False)
    images = rb.run("images", "--format", "json").stdout
    assert "never-built" not in images
    return res.returncode, res.stdout.splitlines(), res.stderr


def test_check_reports_each_rule_with_file_and_line(rb: Runner) -> None:
    code, lines, _ = check(rb, BAD)
    assert code == 1
    got = [ln.split(":", 1)[1] for ln in lines]  # drop the file name (relative to the cwd)
    assert all(ln.split(":", 1)[0].endswith("Containerfile") for ln in lines), lines
    assert got == [
        "1: FromAsCasing: 'as' and 'FROM' keywords' casing do not match",
        "1: StageNameCasing: Stage name 'Build' should be lowercase",
        "2: MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label",
        '3: SecretsUsedInArgOrEnv: Do not use ARG or ENV instructions for sensitive data (ARG "GITHUB_TOKEN")',
        '4: SecretsUsedInArgOrEnv: Do not use ARG or ENV instructions for sensitive data (ENV "DB_PASSWORD")',
        '5: LegacyKeyValueFormat: "ENV key=value" should be used instead of legacy "ENV key value" format',
        '6: WorkdirRelativePath: Relative workdir "relative/dir" can have unexpected results if the base image changes',
        "7: JSONArgsRecommended: " + JSON_CMD,
        "7: MultipleInstructionsDisallowed: Multiple CMD instructions should not be used in the same stage because "
        "only the last one will be used",
        "8: JSONArgsRecommended: " + JSON_CMD,
        "9: ConsistentInstructionCasing: Command 'run' should match the case of the command majority (uppercase)",
        '10: DuplicateStageName: Duplicate stage name "build", stage names should be unique',
        "10: UndefinedArgInFrom: FROM argument 'UNDECLARED' is not declared",
        "11: ReservedStageName: 'context' is reserved and should not be used as a stage name",
        "11: RedundantTargetPlatform: Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this "
        "is the default behavior",
    ]


def test_check_clean_file_and_skip_directive(rb: Runner) -> None:
    code, lines, err = check(rb, 'ARG BASE=busybox\nFROM $BASE AS build\nWORKDIR /app\nCMD ["sh"]\n')
    assert (code, lines) == (0, []) and "no findings" in err
    code, lines, _ = check(rb, "# check=skip=JSONArgsRecommended,StageNameCasing\nFROM busybox AS Build\nCMD sh\n")
    assert (code, lines) == (0, [])
    code, lines, _ = check(rb, "# check=skip=all\nfrom busybox AS Build\nCMD sh\n")
    assert (code, lines) == (0, [])


def test_check_of_a_broken_file_is_one_error(rb: Runner) -> None:
    ctx = rb.context({"Containerfile": "FROM busybox\nNOTANINSTRUCTION x\n"})
    res = rb.run("build", "--check", ctx, check=False)
    assert res.returncode == 125
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Containerfile:2" in lines[0], res.stderr
