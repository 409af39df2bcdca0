"""--build-arg-file and BuildKit's automatic platform ARGs with --platform (issue 18).

buildah 1.28 has neither --build-arg-file nor BuildKit's scoping of the platform ARGs, so these are
expected-result tests: --build-arg-file follows buildah's documentation of the flag (KEY=VALUE lines,
blank lines and # comments skipped, --build-arg wins); the platform ARGs follow BuildKit's
frontend/dockerfile/docs/reference.md, "Automatic platform ARGs in the global scope": defined in the
global scope (usable in FROM), and inside a stage only once an `ARG NAME` without a value names them.
"""

from __future__ import annotations

import json
import os

from conftest import Runner


def results(rb: Runner, ctx: str, *flags: str) -> list[str]:
    res = rb.run("build", "--no-cache", *flags, ctx)
    return [ln.strip() for ln in res.stderr.splitlines() if ln.startswith("RESULT=")]


def one_error(rb: Runner, *argv: str) -> str:
    res = rb.run(*argv, check=False)
    assert res.returncode == 125, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_build_arg_file(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f'FROM oci:{busybox}\nARG A B C\nRUN echo "RESULT=$A|$B|$C"\n'})
    argfile = rb.write(os.path.join(rb.mkdir(), "argfile.conf"), "# comment\n\nA=one\n  B=two words = x\nC=from file\n")
    assert results(rb, ctx, "--build-arg-file", argfile) == ["RESULT=one|two words = x|from file"]
    assert results(rb, ctx, "--build-arg-file", argfile, "--build-arg", "C=flag") == ["RESULT=one|two words = x|flag"]


def test_build_arg_file_bad_line_names_file_and_line(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n"})
    argfile = rb.write(os.path.join(rb.mkdir(), "args"), "A=1\n# ok\nJUSTAKEY\n")
    assert one_error(rb, "build", "--build-arg-file", argfile, ctx) == (
        f"Error: {argfile}:3: a build argument must be KEY=VALUE, not 'JUSTAKEY'"
    )
    assert "cannot read" in one_error(rb, "build", "--build-arg-file", "/nonexistent/args", ctx)


def test_platform_args_scoping(rb: Runner, busybox: str) -> None:
    """In the global scope without a declaration (FROM --platform=$BUILDPLATFORM), in a stage only when declared."""
    ctx = rb.context(
        {
            "Containerfile": f"FROM --platform=$BUILDPLATFORM oci:{busybox}\n"
            'RUN echo "RESULT=undeclared[$TARGETARCH$BUILDPLATFORM]"\n'
            "ARG TARGETPLATFORM TARGETOS TARGETARCH TARGETVARIANT BUILDPLATFORM BUILDOS BUILDARCH BUILDVARIANT\n"
            'RUN echo "RESULT=$TARGETPLATFORM|$TARGETOS|$TARGETARCH|$TARGETVARIANT|'
            '$BUILDPLATFORM|$BUILDOS|$BUILDARCH|$BUILDVARIANT"\n'
        }
    )
    assert results(rb, ctx) == ["RESULT=undeclared[]", "RESULT=linux/amd64|linux|amd64||linux/amd64|linux|amd64|"]


def test_platform_flag_sets_target_args_and_image_platform(rb: Runner, busybox: str) -> None:
    """The cross-compiling pattern: build stages on $BUILDPLATFORM, the result FROM scratch for the target."""
    ctx = rb.context(
        {
            "Containerfile": f"FROM --platform=$BUILDPLATFORM oci:{busybox} AS build\n"
            "ARG TARGETPLATFORM TARGETARCH TARGETVARIANT BUILDARCH\n"
            'RUN echo "RESULT=$TARGETPLATFORM|$TARGETARCH|$TARGETVARIANT|$BUILDARCH" && echo $TARGETARCH > /arch\n'
            "FROM scratch\nCOPY --from=build /arch /arch\n"
        }
    )
    assert results(rb, ctx, "--platform", "linux/aarch64") == ["RESULT=linux/arm64|arm64||amd64"]
    assert results(rb, ctx, "--platform", "linux/arm") == ["RESULT=linux/arm/v7|arm|v7|amd64"]
    rb.build(ctx, "-t", "localhost/plat-arm64", "--platform", "linux/arm64")
    out = rb.mkdir()
    rb.run("push", "localhost/plat-arm64", f"oci:{out}/l:latest")
    index = json.load(open(f"{out}/l/index.json"))
    manifest = json.load(open(f"{out}/l/blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
    config = json.load(open(f"{out}/l/blobs/sha256/" + manifest["config"]["digest"].split(":")[1]))
    assert (config["os"], config["architecture"]) == ("linux", "arm64")


def test_bad_platform_is_one_error(rb: Runner, busybox: str) -> None:
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n"})
    assert one_error(rb, "build", "--platform", "linux", ctx) == (
        "Error: --platform: invalid platform 'linux' (want os/arch[/variant])"
    )


def test_from_platform_chooses_the_stages_image(rb: Runner, busybox: str) -> None:
    """FROM --platform= picks the stage's image (BuildKit); the amd64-only layout has none for s390x."""
    ctx = rb.context({"Containerfile": f"FROM oci:{busybox}\n\nFROM --platform=linux/s390x oci:{busybox}\n"})
    line = one_error(rb, "build", "-q", ctx)
    assert "Containerfile:3" in line and "not the requested linux/s390x" in line
