"""Authentication and TLS against real servers: htpasswd basic auth, the bearer token flow with a
test token server, and a TLS registry whose CA is made here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import (
    CA,
    RegistryServer,
    SampleImage,
    TokenServer,
    blob_files,
    credential_helper,
    docker_registry,
    isolate,
    make_ca,
    make_image,
    token_server,
    write,
)

from rootless.errors import RbuildError
from rootless.oci.reference import parse_reference
from rootless.registry import auth
from rootless.registry.api import Registry, RegistryOptions, login, logout

PASSWORD = "pa55-w0rd:with-colon"


@pytest.fixture(autouse=True)
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    return isolate(monkeypatch, str(tmp_path))


def _push(host: str, name: str, img: SampleImage | None = None, **options: object) -> None:
    img = img or make_image([2_000, 3_000])
    Registry(RegistryOptions(**options)).push(  # type: ignore[arg-type]
        parse_reference(f"{host}/{name}"), img.manifest, img.media_type, img.config, img.config_bytes, img.openers()
    )


def _pull(host: str, name: str, dest: str, **options: object) -> None:
    r = Registry(RegistryOptions(**options))  # type: ignore[arg-type]
    ref = parse_reference(f"{host}/{name}")
    r.fetch_blobs(ref, r.resolve(ref).layers, dest)


# -- basic auth ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic() -> Iterator[RegistryServer]:
    with docker_registry(htpasswd={"alice": PASSWORD}) as srv:
        yield srv


def test_basic_auth_login_push_pull_logout(basic: RegistryServer, home: str, tmp_path: Path) -> None:
    authfile = Path(home, ".config", "containers", "auth.json")
    with pytest.raises(
        RbuildError,
        match=rf"pushing {basic.host}/a/b:1: authentication required \(401\); "
        rf"run rbuild login {basic.host}",
    ):
        _push(basic.host, "a/b:1")
    with pytest.raises(RbuildError, match=rf"login to {basic.host}: authentication failed \(401\)") as bad:
        login(basic.host, "alice", "wrong", RegistryOptions())
    assert "wrong" not in str(bad.value)
    assert not authfile.exists()
    login(basic.host, "alice", PASSWORD, RegistryOptions())
    assert json.loads(authfile.read_text())["auths"].keys() == {basic.host}
    _push(basic.host, "a/b:1")
    _pull(basic.host, "a/b:1", str(tmp_path / "blobs"))
    assert len(blob_files(str(tmp_path / "blobs"))) == 2
    logout(basic.host, RegistryOptions())
    assert json.loads(authfile.read_text())["auths"] == {}
    with pytest.raises(RbuildError, match="authentication required"):
        _pull(basic.host, "a/b:1", str(tmp_path / "b2"))
    with pytest.raises(RbuildError, match=f"not logged into {basic.host}"):
        logout(basic.host, RegistryOptions())


def test_creds_option_and_explicit_authfile(basic: RegistryServer, tmp_path: Path) -> None:
    _push(basic.host, "c/d:1", creds=f"alice:{PASSWORD}")
    with pytest.raises(RbuildError, match=r"authentication failed \(401\)") as bad:
        _push(basic.host, "c/d:1", creds="alice:nope")
    assert "nope" not in str(bad.value)
    authfile = str(tmp_path / "elsewhere.json")
    login(basic.host, "alice", PASSWORD, RegistryOptions(authfile=authfile))
    assert not Path(os.environ["HOME"], ".config", "containers", "auth.json").exists()
    _push(basic.host, "c/d:2", authfile=authfile)


def test_login_through_a_credential_helper(
    basic: RegistryServer, home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{credential_helper(str(tmp_path))}:{os.environ['PATH']}")
    authfile = write(
        os.path.join(home, ".config", "containers", "auth.json"), json.dumps({"credHelpers": {basic.host: "rbtest"}})
    )
    with pytest.raises(RbuildError, match="authentication failed"):
        login(basic.host, "alice", "bad", RegistryOptions())
    login(basic.host, "alice", PASSWORD, RegistryOptions())
    assert PASSWORD not in Path(authfile).read_text()
    assert PASSWORD in (tmp_path / "helper-store.json").read_text()
    _push(basic.host, "helper/app:1")
    logout(basic.host, RegistryOptions())
    with pytest.raises(RbuildError, match="authentication required"):
        _push(basic.host, "helper/app:2")


def test_docker_config_is_a_fallback(basic: RegistryServer, home: str) -> None:
    import base64

    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    write(os.path.join(home, ".docker", "config.json"), json.dumps({"auths": {basic.host: {"auth": token}}}))
    _push(basic.host, "e/f:1")


# -- bearer tokens -------------------------------------------------------------------------


def _acl(user: str | None, repository: str) -> set[str]:
    if user == "alice":
        return {"pull", "push"}
    if user == "bob":
        return {"pull"}
    return {"pull"} if repository.startswith("public/") else set()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenServer, RegistryServer]]:
    with token_server(str(tmp_path_factory.mktemp("token")), {"alice": PASSWORD, "bob": "bobpw"}, _acl) as ts:
        with docker_registry(token=ts) as srv:
            yield ts, srv


def test_token_flow_scopes_and_cache(tokens: tuple[TokenServer, RegistryServer], tmp_path: Path) -> None:
    ts, srv = tokens
    with pytest.raises(RbuildError, match=rf"login to {srv.host}: authentication failed: token server answered 401"):
        login(srv.host, "alice", "wrong", RegistryOptions())
    assert not auth.primary_auth_file().exists()
    login(srv.host, "alice", PASSWORD, RegistryOptions())
    ts.requests.clear()
    _push(srv.host, "team/app:1")  # HEAD, POST, PUT for 3 blobs and the manifest: one scope, one token
    assert [(r["user"], r["scopes"]) for r in ts.requests] == [("alice", ["repository:team/app:pull,push"])]
    ts.requests.clear()
    _pull(srv.host, "team/app:1", str(tmp_path / "blobs"))
    assert [r["scopes"] for r in ts.requests] == [["repository:team/app:pull"]]
    ts.requests.clear()
    img = make_image([1_000])
    _push(srv.host, "team/other:1", img)
    ts.requests.clear()
    _push(srv.host, "team/copy:1", img)  # its blobs are mounted: one token covers both repositories
    assert [r["scopes"] for r in ts.requests] == [
        ["repository:team/copy:pull,push"],
        ["repository:team/copy:pull,push", "repository:team/other:pull"],
    ]


def test_token_anonymous_and_denied(tokens: tuple[TokenServer, RegistryServer], tmp_path: Path) -> None:
    ts, srv = tokens
    _push(srv.host, "public/base:1", creds=f"alice:{PASSWORD}")
    _push(srv.host, "private/app:1", creds=f"alice:{PASSWORD}")
    _pull(srv.host, "public/base:1", str(tmp_path / "anon"))  # an anonymous token suffices
    assert len(blob_files(str(tmp_path / "anon"))) == 2
    with pytest.raises(RbuildError, match=rf"pulling {srv.host}/private/app:1: access denied \(401\); run rbuild"):
        _pull(srv.host, "private/app:1", str(tmp_path / "b"))
    with pytest.raises(RbuildError, match=rf"pushing {srv.host}/public/mine:1: access denied \(401\)"):
        _push(srv.host, "public/mine:1", creds="bob:bobpw")
    _pull(srv.host, "private/app:1", str(tmp_path / "bob"), creds="bob:bobpw")
    assert blob_files(str(tmp_path / "b")) == {}


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CA, RegistryServer]]:
    ca = make_ca(str(tmp_path_factory.mktemp("ca")))
    with docker_registry(tls=ca) as srv:
        yield ca, srv


def test_tls_untrusted_by_default(tls: tuple[CA, RegistryServer]) -> None:
    _, srv = tls
    with pytest.raises(
        RbuildError,
        match=rf"cannot reach registry {srv.host}: TLS certificate not trusted "
        rf"\(put its CA in .*certs.d/{srv.host}/ca.crt or --cert-dir",
    ):
        _push(srv.host, "t/a:1")


def test_tls_cert_dir_and_user_certs_d(tls: tuple[CA, RegistryServer], home: str, tmp_path: Path) -> None:
    ca, srv = tls
    certs = tmp_path / "certs"
    write(str(certs / "ca.crt"), Path(ca.ca_cert).read_text())
    _push(srv.host, "t/a:1", cert_dir=str(certs))
    write(os.path.join(home, ".config", "containers", "certs.d", srv.host, "ca.crt"), Path(ca.ca_cert).read_text())
    _pull(srv.host, "t/a:1", str(tmp_path / "blobs"))
    assert len(blob_files(str(tmp_path / "blobs"))) == 2


def test_tls_verify_false_and_insecure_registry(tls: tuple[CA, RegistryServer], home: str) -> None:
    _, srv = tls
    _push(srv.host, "t/b:1", tls_verify=False)
    write(
        os.path.join(home, ".config", "containers", "registries.conf"),
        f'[[registry]]\nlocation = "{srv.host}"\ninsecure = true\n',
    )
    _push(srv.host, "t/b:2")


def test_tls_verify_true_refuses_plain_http_loopback() -> None:
    with docker_registry() as srv:
        _push(srv.host, "p/a:1")  # loopback: plain http is fine by default
        with pytest.raises(RbuildError, match=f"cannot reach registry {srv.host}"):
            _push(srv.host, "p/a:1", tls_verify=True)
