"""Configuration without a server: registries.conf, short names, certs.d, auth files, credential
helpers, challenges, platform choice, manifest conversion and the command-line helpers."""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
from pathlib import Path

import pytest
from registry_helpers import credential_helper, isolate, make_image, write

from rootless.cli.registry import add_login_arguments, add_pull_argument, add_registry_arguments, options_from_args
from rootless.errors import RbuildError
from rootless.oci.image import DOCKER_MANIFEST, OCI_MANIFEST
from rootless.oci.platform import Platform, choose_platform, parse_platform
from rootless.oci.reference import parse_reference
from rootless.registry import auth
from rootless.registry import conf as regconf
from rootless.registry.api import convert_manifest, push_destination, resolve_names

D = "sha256:" + "cd" * 32


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    return isolate(monkeypatch, str(tmp_path))


def conf_path(home: str) -> str:
    return os.path.join(home, ".config", "containers", "registries.conf")


# -- registries.conf -----------------------------------------------------------------------


def test_short_names_default_to_docker_hub() -> None:
    assert [str(r) for r in resolve_names("alpine")] == ["docker.io/library/alpine:latest"]
    assert [str(r) for r in resolve_names("quay.io/x/y:1")] == ["quay.io/x/y:1"]


def test_unqualified_search_in_order(home: str) -> None:
    write(conf_path(home), 'unqualified-search-registries = ["127.0.0.1:5000", "quay.io", "docker.io"]\n')
    assert [str(r) for r in resolve_names("tools/img:2")] == [
        "127.0.0.1:5000/tools/img:2",
        "quay.io/tools/img:2",
        "docker.io/tools/img:2",
    ]
    assert [str(r) for r in resolve_names(f"img@{D}")][2] == f"docker.io/library/img@{D}"


def test_empty_search_list_is_an_error(home: str) -> None:
    write(conf_path(home), "unqualified-search-registries = []\n")
    with pytest.raises(RbuildError, match="no unqualified-search registries"):
        resolve_names("img")


def test_aliases_and_dropins_system_then_user(home: str, tmp_path: Path) -> None:
    write(os.path.join(tmp_path, "etc", "registries.conf"), 'unqualified-search-registries = ["a.example"]\n')
    write(
        os.path.join(tmp_path, "etc", "registries.conf.d", "10-aliases.conf"),
        '[aliases]\n"myimg" = "quay.io/team/myimg"\n"other" = "quay.io/x/other"\n',
    )
    write(
        os.path.join(home, ".config", "containers", "registries.conf.d", "20-user.conf"),
        '[aliases]\n"other" = "ghcr.io/me/other"\n',
    )
    assert [str(r) for r in resolve_names("myimg:3")] == ["quay.io/team/myimg:3"]
    assert [str(r) for r in resolve_names("other")] == ["ghcr.io/me/other:latest"]
    assert [str(r) for r in resolve_names("third")] == ["a.example/third:latest"]


def test_user_file_replaces_system_file(home: str, tmp_path: Path) -> None:
    write(os.path.join(tmp_path, "etc", "registries.conf"), 'unqualified-search-registries = ["sys.example"]\n')
    write(conf_path(home), 'unqualified-search-registries = ["user.example"]\n')
    assert str(resolve_names("x")[0]) == "user.example/x:latest"


def test_env_file_wins(home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(conf_path(home), 'unqualified-search-registries = ["user.example"]\n')
    monkeypatch.setenv(
        "CONTAINERS_REGISTRIES_CONF",
        write(os.path.join(tmp_path, "env.conf"), 'unqualified-search-registries = ["env.example"]\n'),
    )
    assert str(resolve_names("x")[0]) == "env.example/x:latest"


def test_mirrors_rewrites_insecure_and_blocked(home: str) -> None:
    write(
        conf_path(home),
        """
[[registry]]
prefix = "docker.io"
location = "docker.io"
[[registry.mirror]]
location = "mirror.local:5000/hub"
insecure = true
[[registry.mirror]]
location = "digests.local"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "example.com/team"
location = "internal.example.com:8443/mirror/team"
insecure = true

[[registry]]
location = "bad.example"
blocked = true

[[registry]]
prefix = "*.wild.example"
insecure = true
""",
    )
    conf = regconf.load_registries_conf()
    sources = conf.pull_sources(parse_reference("alpine"))
    assert [(str(s.ref), s.insecure) for s in sources] == [
        ("mirror.local:5000/hub/library/alpine:latest", True),
        ("docker.io/library/alpine:latest", False),
    ]
    pinned = conf.pull_sources(parse_reference(f"alpine@{D}"))
    assert [str(s.ref) for s in pinned][1] == f"digests.local/library/alpine@{D}"
    target = conf.push_target(parse_reference("example.com/team/app:1"))
    assert (str(target.ref), target.insecure) == ("internal.example.com:8443/mirror/team/app:1", True)
    assert str(conf.push_target(parse_reference("example.com/teamx/app")).ref) == "example.com/teamx/app:latest"
    assert conf.insecure("x.wild.example") and not conf.insecure("wild.example.org")
    assert conf.insecure("mirror.local:5000")
    with pytest.raises(RbuildError, match="blocked"):
        conf.pull_sources(parse_reference("bad.example/x"))
    with pytest.raises(RbuildError, match="blocked"):
        conf.push_target(parse_reference("bad.example/x"))


@pytest.mark.parametrize(
    "text",
    [
        '[registries.search]\nregistries = ["x"]\n',
        "not toml = = \n",
        '[[registry]]\ninsecure = "yes"\nlocation = "x"\n',
        "[[registry]]\n",
    ],
)
def test_bad_registries_conf(home: str, text: str) -> None:
    write(conf_path(home), text)
    with pytest.raises(RbuildError, match="registries.conf"):
        regconf.load_registries_conf()


# -- certs.d -------------------------------------------------------------------------------


def test_certs_d_user_dir_then_system(home: str, tmp_path: Path) -> None:
    system = write(os.path.join(tmp_path, "etc", "certs.d", "reg:5000", "ca.crt"), "x")
    assert regconf.tls_files("reg:5000").ca_files == [system]
    user = write(os.path.join(home, ".config", "containers", "certs.d", "reg:5000", "ca.crt"), "x")
    write(os.path.join(home, ".config", "containers", "certs.d", "reg:5000", "client.cert"), "x")
    write(os.path.join(home, ".config", "containers", "certs.d", "reg:5000", "client.key"), "x")
    files = regconf.tls_files("reg:5000")
    assert files.ca_files == [user]
    assert [os.path.basename(c) for pair in files.client_pairs for c in pair] == ["client.cert", "client.key"]
    explicit = write(os.path.join(tmp_path, "mine", "other.crt"), "x")
    assert regconf.tls_files("reg:5000", os.path.dirname(explicit)).ca_files == [explicit]
    assert regconf.tls_files("elsewhere:1").ca_files == []


def test_certs_d_key_without_cert(tmp_path: Path) -> None:
    write(os.path.join(tmp_path, "c", "client.key"), "x")
    with pytest.raises(RbuildError, match="no matching certificate"):
        regconf.tls_files("h", os.path.join(tmp_path, "c"))


# -- auth files and helpers ----------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auth_file_precedence(home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert auth.primary_auth_file() == auth.Path(home, ".config", "containers", "auth.json")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert auth.primary_auth_file() == auth.Path(tmp_path, "run", "containers", "auth.json")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "env.json"))
    assert auth.primary_auth_file() == auth.Path(tmp_path, "env.json")
    assert auth.read_auth_files() == [auth.Path(tmp_path, "env.json")]
    assert auth.primary_auth_file(str(tmp_path / "flag.json")) == auth.Path(tmp_path, "flag.json")


def test_lookup_specific_keys_and_docker_fallback(home: str) -> None:
    write(
        os.path.join(home, ".docker", "config.json"),
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _b64("hub:hubpw")},
                    "reg:5000": {"auth": _b64("docker:dpw")},
                }
            }
        ),
    )
    write(
        os.path.join(home, ".config", "containers", "auth.json"),
        json.dumps({"auths": {"reg:5000": {"auth": _b64("alice:apw")}, "reg:5000/team": {"auth": _b64("team:tpw")}}}),
    )
    assert auth.lookup_credentials("docker.io") == auth.Credentials("hub", "hubpw")
    assert auth.lookup_credentials("reg:5000", "other/x") == auth.Credentials("alice", "apw")
    assert auth.lookup_credentials("reg:5000", "team/app") == auth.Credentials("team", "tpw")
    assert auth.lookup_credentials("nowhere:1") is None


def test_store_and_erase(home: str) -> None:
    path = auth.store_credentials("reg:5000", "bob", "s3cret:with:colons")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert auth.lookup_credentials("reg:5000") == auth.Credentials("bob", "s3cret:with:colons")
    assert auth.erase_credentials("reg:5000") is True
    assert auth.lookup_credentials("reg:5000") is None
    assert auth.erase_credentials("reg:5000") is False


def test_erase_refuses_docker_config_credentials(home: str) -> None:
    write(os.path.join(home, ".docker", "config.json"), json.dumps({"auths": {"reg:1": {"auth": _b64("a:b")}}}))
    with pytest.raises(RbuildError, match="another file"):
        auth.erase_credentials("reg:1")


def test_credential_helper(home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{credential_helper(str(tmp_path))}:{os.environ['PATH']}")
    authfile = write(
        os.path.join(home, ".config", "containers", "auth.json"), json.dumps({"credHelpers": {"reg:5000": "rbtest"}})
    )
    assert auth.store_credentials("reg:5000", "carol", "cpw") == "docker-credential-rbtest"
    assert "cpw" not in open(authfile).read()
    assert auth.lookup_credentials("reg:5000") == auth.Credentials("carol", "cpw")
    assert auth.lookup_credentials("other:1") is None
    assert auth.erase_credentials("reg:5000") is True
    assert auth.lookup_credentials("reg:5000") is None


def test_missing_helper_is_a_clear_error(home: str) -> None:
    write(os.path.join(home, ".config", "containers", "auth.json"), json.dumps({"credsStore": "nonexistent"}))
    with pytest.raises(RbuildError, match="docker-credential-nonexistent not found"):
        auth.lookup_credentials("reg:5000")


def test_parse_challenge() -> None:
    c = auth.parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.params["realm"] == "https://auth.example/token"
    assert c.params["scope"] == "repository:a/b:pull,push repository:c:pull"
    basic = auth.parse_challenge("Basic realm=test")
    assert basic is not None and basic.scheme == "basic" and basic.params == {"realm": "test"}
    assert auth.parse_challenge("") is None


def test_token_cache() -> None:
    cache = auth.TokenCache()
    cache.put(("r", "s", ("repository:a:pull",), ""), "tok", 300)
    assert cache.get(("r", "s", ("repository:a:pull",), "")) == "tok"
    assert cache.get(("r", "s", ("repository:b:pull",), "")) is None
    cache.drop(("r", "s", ("repository:a:pull",), ""))
    assert cache.get(("r", "s", ("repository:a:pull",), "")) is None


# -- platforms, formats, destinations ------------------------------------------------------


def _index(*platforms: tuple[str, str, str]) -> dict:
    return {
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": f"sha256:{i:064x}",
                "size": 1,
                "platform": {"os": o, "architecture": a, **({"variant": v} if v else {})},
            }
            for i, (o, a, v) in enumerate(platforms, 1)
        ]
    }


def test_platform_choice() -> None:
    index = _index(
        ("unknown", "unknown", ""),
        ("linux", "amd64", ""),
        ("linux", "arm64", "v8"),
        ("linux", "arm", "v6"),
        ("linux", "arm", "v7"),
    )
    assert choose_platform(index, parse_platform("linux/amd64"), "x")["digest"].endswith("2")
    assert choose_platform(index, parse_platform("linux/arm64"), "x")["digest"].endswith("3")
    assert choose_platform(index, parse_platform("linux/aarch64/v8"), "x")["digest"].endswith("3")
    assert choose_platform(index, parse_platform("linux/arm"), "x")["digest"].endswith("5")
    assert choose_platform(index, parse_platform("linux/arm/v6"), "x")["digest"].endswith("4")
    only_v6 = _index(("linux", "arm", "v6"))
    assert choose_platform(only_v6, parse_platform("linux/arm/v7"), "x")["digest"].endswith("1")
    with pytest.raises(RbuildError, match=r"no image for platform linux/s390x \(available: .*linux/amd64"):
        choose_platform(index, parse_platform("linux/s390x"), "x")
    with pytest.raises(RbuildError, match="os/arch"):
        parse_platform("amd64")
    assert Platform.make("linux", "x86_64") == Platform("linux", "amd64", "")


def test_convert_manifest_round_trip() -> None:
    img = make_image([100, 100], kinds=["gzip", "none"])
    docker, mt = convert_manifest(img.manifest, "docker")
    assert mt == DOCKER_MANIFEST
    data = json.loads(docker)
    assert [layer["mediaType"] for layer in data["layers"]] == [
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    ]
    assert data["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert [layer["digest"] for layer in data["layers"]] == [d.digest for d in img.layers]
    oci, mt = convert_manifest(docker, "oci")
    assert mt == OCI_MANIFEST and json.loads(oci)["layers"] == json.loads(img.manifest)["layers"]
    assert convert_manifest(img.manifest, "oci") == (img.manifest, OCI_MANIFEST)
    with pytest.raises(RbuildError, match="no docker format"):
        convert_manifest(make_image([10], kinds=["zstd"]).manifest, "docker")


def test_push_destination() -> None:
    assert str(push_destination("quay.io/a/b:1", None)) == "quay.io/a/b:1"
    assert str(push_destination("localhost/app:1", "127.0.0.1:5000/app:1")) == "127.0.0.1:5000/app:1"
    with pytest.raises(RbuildError, match="local name"):
        push_destination("localhost/app:1", None)


def test_cli_arguments() -> None:
    p = argparse.ArgumentParser()
    add_registry_arguments(p)
    add_pull_argument(p)
    args = p.parse_args(
        [
            "--tls-verify=false",
            "--cert-dir",
            "/c",
            "--authfile",
            "/a",
            "--platform",
            "linux/arm64",
            "--creds",
            "u:p",
            "--pull",
        ]
    )
    opts = options_from_args(args)
    assert (opts.tls_verify, opts.cert_dir, opts.authfile, opts.platform, opts.creds) == (
        False,
        "/c",
        "/a",
        "linux/arm64",
        "u:p",
    )
    assert args.pull == "always"
    args = p.parse_args(["--tls-verify", "--pull=never"])
    assert args.tls_verify is True and args.pull == "never"
    assert p.parse_args([]).pull == "missing" and p.parse_args([]).tls_verify is None
    p.add_argument("context")
    args = p.parse_args(["--pull", "--tls-verify", "ctx"])  # bare flags never take the next word
    assert (args.pull, args.tls_verify, args.context) == ("always", True, "ctx")
    assert p.parse_args(["--pull=true", "--tls-verify=FALSE", "c"]).tls_verify is False
    with pytest.raises(SystemExit):
        p.parse_args(["--pull=sometimes", "c"])
    login = argparse.ArgumentParser()
    add_login_arguments(login)
    args = login.parse_args(["-u", "me", "--password-stdin", "reg:5000"])
    assert (args.username, args.password_stdin, args.registry) == ("me", True, "reg:5000")
