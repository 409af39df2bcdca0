"""The distribution client's API: pull (resolve + fetch_blobs), push, login/logout, short names.

Store-agnostic: blobs land as `dest_dir/<algo>/<hex>`, only after their digest and size are
verified; the caller decides what to do with them. This module is imported by every command that
takes registry options, so it stays light: the client (rootless.registry.client) and `requests`
are loaded only when a registry is actually contacted, and a build served from the local store
never pays for them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from rootless.blob.digest import check_digest
from rootless.errors import RbuildError
from rootless.oci.image import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    TO_DOCKER,
    TO_OCI,
)
from rootless.oci.reference import Reference, is_qualified, normalize_host, parse_reference

if TYPE_CHECKING:
    import threading

    from rootless.blob.growing import Growing
    from rootless.events import Reporter
    from rootless.registry import auth
    from rootless.registry.client import RegistryClient


@dataclass
class RegistryOptions:
    """What the user said about registries on the command line (None = the configured default)."""

    tls_verify: bool | None = None
    cert_dir: str | None = None
    authfile: str | None = None
    platform: str | None = None  # "os/arch[/variant]"; None = host
    creds: str | None = None  # "USER:PASS" from --creds; overrides the auth file
    # the names on the command line whose registries --creds is for (never one a Containerfile picks);
    # None: every registry contacted
    creds_for: list[str] | None = None


@dataclass
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    urls: list[str] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        """Validate a descriptor from a manifest: a bad digest or size is the manifest's fault."""
        try:
            digest = check_digest(str(data["digest"]))
            size = data["size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError("size")
            urls = [str(u) for u in data.get("urls") or []]
            annotations = {str(k): str(v) for k, v in (data.get("annotations") or {}).items()}
            return cls(str(data.get("mediaType", "")), digest, size, urls, annotations)
        except (KeyError, TypeError, ValueError, AttributeError, RbuildError):
            raise RbuildError(f"{where}: malformed descriptor in manifest") from None

    def to_json(self) -> dict[str, Any]:
        """The descriptor as it appears in a manifest."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = self.urls
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass
class StreamedBlob:
    """A layer blob still being written (compressed) while it is pushed: uploaded in chunks as it grows,
    its digest and size known when `growing` finishes."""

    media_type: str
    growing: Growing


@dataclass
class RemoteImage:
    """One platform's image as the registry has it; `config` is already verified."""

    ref: Reference
    manifest_digest: str
    manifest_media_type: str
    manifest: bytes
    config: bytes
    layers: list[Descriptor]
    config_descriptor: Descriptor | None = None
    index_digest: str | None = None  # the tag's top-level digest when it named an index
    source: Reference | None = None  # where it came from (a mirror, a rewritten location)


class Registry:
    """A session with every registry one rbuild command talks to (thread-safe, reusable)."""

    def __init__(self, options: RegistryOptions) -> None:
        from rootless.registry.client import RegistryClient

        self.options = options
        self.client: RegistryClient = RegistryClient(options)

    def resolve(self, ref: Reference) -> RemoteImage:
        """Manifest (for the platform) and verified config of `ref`; mirrors are tried first."""
        return self.client.resolve(ref)

    def resolve_any(self, refs: list[Reference]) -> RemoteImage:
        """The first of `refs` (short-name candidates) that resolves; every failure reported otherwise."""
        return self.client.resolve_any(refs)

    def remote_digest(self, ref: Reference) -> str:
        """The digest the registry serves for `ref` now, by a HEAD (for `--pull=newer`)."""
        return self.client.remote_digest(ref)

    def fetch_blobs(
        self,
        ref: Reference,
        blobs: list[Descriptor],
        dest_dir: str,
        reporter: Reporter | None = None,
        follow: dict[str, Growing] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Download every blob not yet at `dest_dir/<algo>/<hex>`, in parallel, each verified (digest and
        size) in a temporary file before it is renamed into place; on error nothing partial remains.
        A blob several callers (threads or processes) want at once is downloaded once. `follow` (digest
        -> Growing): blobs a reader consumes while they download, finished once each is in place and
        verified, failed with the error otherwise. `cancel` stops the downloads (from another thread)."""
        self.client.fetch_blobs(ref, blobs, dest_dir, reporter, follow, cancel)

    def push(
        self,
        ref: Reference,
        manifest: bytes | Callable[[], bytes],
        manifest_media_type: str,
        config: Descriptor,
        config_bytes: bytes,
        layers: list[tuple[Descriptor, Callable[[], BinaryIO]] | StreamedBlob],
        reporter: Reporter | None = None,
    ) -> str:
        """Upload the blobs the registry lacks (HEAD check, cross-repository mount, chunks for large
        ones), then the manifest; returns the manifest digest. A StreamedBlob goes up in chunks while it
        is written; `manifest` may then be a function, called once every blob is uploaded."""
        return self.client.push(ref, manifest, manifest_media_type, config, config_bytes, layers, reporter)


# -- names, formats, credentials ------------------------------------------------------------


def resolve_names(text: str, options: RegistryOptions | None = None) -> list[Reference]:
    """The references a name may mean, in the order to try them: itself when qualified; else its
    registries.conf alias; else one per unqualified-search registry (docker.io when none is set).

    `options` is part of the interface for symmetry with the other calls; registries.conf is found
    from the environment, as containers' tools find it."""
    if is_qualified(text):
        return [parse_reference(text)]
    from rootless.registry.conf import load_registries_conf

    conf = load_registries_conf()
    name, at, digest = text.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    suffix = (f":{tag}" if tag else "") + (f"@{digest}" if at else "")
    alias = conf.aliases.get(name)
    if alias:
        return [parse_reference(alias + suffix)]
    search = conf.search if conf.search is not None else ["docker.io"]
    if not search:
        raise RbuildError(
            f"short name {text!r}: no unqualified-search registries are configured "
            f"in {', '.join(conf.files) or 'registries.conf'}"
        )
    return [parse_reference(text, default_registry=r) for r in search]


def push_destination(name: str, dest: str | None) -> Reference:
    """Where `rbuild push NAME [DEST]` goes: DEST, else NAME's registry (never the local `localhost/`)."""
    if dest:
        return parse_reference(dest)
    ref = parse_reference(name)
    if ref.registry == "localhost":
        raise RbuildError(f"{ref} is a local name: give a destination, e.g. rbuild push {name} HOST/REPO:TAG")
    return ref


def convert_manifest(manifest: bytes, fmt: str) -> tuple[bytes, str]:
    """An image manifest in `fmt` ("oci" or "docker"), same blobs; unchanged (same digest) if it already is."""
    data = json.loads(manifest)
    current = data.get("mediaType") or OCI_MANIFEST
    want = {"oci": OCI_MANIFEST, "docker": DOCKER_MANIFEST}.get(fmt)
    if want is None:
        raise RbuildError(f"unknown manifest format {fmt!r}: want oci or docker")
    if current not in MANIFEST_TYPES:
        raise RbuildError(f"cannot convert a {current} to {fmt} format")
    if current == want:
        return manifest, want
    table = TO_DOCKER if fmt == "docker" else TO_OCI
    layers = []
    for layer in data.get("layers") or []:
        layer = dict(layer)
        if layer["mediaType"] not in table:
            raise RbuildError(f"layer type {layer['mediaType']} has no {fmt} format equivalent")
        layer["mediaType"] = table[layer["mediaType"]]
        if fmt == "docker":
            layer.pop("annotations", None)
        layers.append(layer)
    config = dict(data["config"])
    config["mediaType"] = DOCKER_CONFIG if fmt == "docker" else OCI_CONFIG
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": want, "config": config, "layers": layers}
    if fmt == "oci" and data.get("annotations"):
        out["annotations"] = data["annotations"]
    return json.dumps(out, separators=(",", ":")).encode(), want


def parse_creds(text: str) -> auth.Credentials:
    """`--creds USER[:PASS]`; the password is asked for on a terminal when missing."""
    from rootless.registry import auth

    user, sep, password = text.partition(":")
    if not user:
        raise RbuildError("--creds needs USER[:PASSWORD]")
    if not sep:
        if not sys.stdin.isatty():
            raise RbuildError("--creds has no password and there is no terminal to ask for one")
        import getpass

        password = getpass.getpass("Password: ")
    return auth.Credentials(user, password)


def login_host(text: str) -> str:
    """A login target as the auth-file key: `HOST[:PORT]` (scheme and path dropped, hub names unified)."""
    host = text.split("://", 1)[-1].split("/", 1)[0]
    if not host:
        raise RbuildError(f"invalid registry {text!r}")
    return normalize_host(host)


def login(host: str, username: str, password: str, options: RegistryOptions) -> None:
    """Check the credentials against `HOST/v2/` (and its token server), then save them."""
    host = login_host(host)
    if not username or not password:
        raise RbuildError(f"login to {host}: username and password are required")
    from rootless.registry import auth
    from rootless.registry.conf import load_registries_conf
    from rootless.registry.http import RegistryHTTP, error_detail

    creds = auth.Credentials(username, password)
    conf = load_registries_conf()
    http = RegistryHTTP(
        conf, tls_verify=options.tls_verify, cert_dir=options.cert_dir, authfile=options.authfile, creds=creds
    )
    what = f"login to {host}"
    state = http.host_state(host)
    if state.challenge is not None:
        resp = http.request("GET", host, "/v2/", what=what)
        resp.close()
        if resp.status_code != 200:
            raise RbuildError(f"{what}: {error_detail(resp)}")
    auth.store_credentials(host, username, password, options.authfile)


def logout(host: str, options: RegistryOptions) -> None:
    """Forget the saved credentials for `host`; an error when there were none."""
    from rootless.registry import auth

    host = login_host(host)
    if not auth.erase_credentials(host, options.authfile):
        raise RbuildError(f"not logged into {host}")
