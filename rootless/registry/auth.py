"""Registry credentials: containers' auth.json (docker's config.json as fallback), credential helpers,
`WWW-Authenticate` challenges and a per-scope bearer-token cache.

Secrets never leave this module except as request headers: error messages name hosts, never
usernames or passwords.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rootless.errors import RbuildError
from rootless.oci.reference import normalize_host


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity (refresh) token from an OAuth2 login."""

    username: str
    password: str
    identity_token: str | None = None

    def basic(self) -> str:
        """The value of a basic `Authorization` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def primary_auth_file(authfile: str | None = None) -> Path:
    """The file logins write: `--authfile` > `$REGISTRY_AUTH_FILE` > `$XDG_RUNTIME_DIR/containers/auth.json`
    > `~/.config/containers/auth.json` (where XDG_RUNTIME_DIR is unset)."""
    explicit = authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "containers" / "auth.json"
    return _user_auth_file()


def _user_auth_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "containers" / "auth.json"


def _docker_config_file() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


def read_auth_files(authfile: str | None = None) -> list[Path]:
    """Files searched for credentials, first match wins; an explicit file is the only one."""
    primary = primary_auth_file(authfile)
    if authfile or os.environ.get("REGISTRY_AUTH_FILE"):
        return [primary]
    files = [primary, _user_auth_file(), _docker_config_file()]
    return [f for i, f in enumerate(files) if f not in files[:i]]


def normalize_key(key: str) -> str:
    """An auth-file key as `HOST[:PORT][/path]`: docker's `https://index.docker.io/v1/` is `docker.io`."""
    had_scheme = "://" in key
    key = key.split("://", 1)[-1].rstrip("/")
    host, _, path = key.partition("/")
    host = normalize_host(host)
    if had_scheme or path in ("v1", "v2"):
        return host  # legacy URL keys name a host, never a namespace
    return f"{host}/{path}" if path else host


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RbuildError(f"cannot read credentials file {path}: {e}") from None
    if not isinstance(data, dict):
        raise RbuildError(f"cannot read credentials file {path}: not a JSON object")
    return data


def _helper(name: str, action: str, payload: str) -> str | None:
    """Run `docker-credential-NAME ACTION`; None when it knows nothing about the server."""
    import subprocess

    binary = f"docker-credential-{name}"
    try:
        proc = subprocess.run([binary, action], input=payload.encode(), capture_output=True, timeout=60)
    except FileNotFoundError:
        raise RbuildError(f"credential helper {binary} not found in PATH") from None
    except OSError as e:  # e.g. a PATH directory that cannot be searched
        raise RbuildError(f"cannot run credential helper {binary}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise RbuildError(f"credential helper {binary} {action} timed out") from None
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        if "credentials not found" in (out + proc.stderr.decode(errors="replace")).lower():
            return None
        raise RbuildError(f"credential helper {binary} {action} failed (exit {proc.returncode})")
    return out


def _from_helper(name: str, host: str) -> Credentials | None:
    out = _helper(name, "get", host)
    if out is None:
        return None
    try:
        data = json.loads(out)
        username, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise RbuildError(f"credential helper docker-credential-{name} returned malformed output") from None
    if username == "<token>":
        return Credentials("", "", identity_token=secret)
    return Credentials(username, secret)


def _from_entry(entry: object, where: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("identitytoken"):
        user = ""
        if entry.get("auth"):
            user = _decode_auth(entry["auth"], where, key)[0]
        return Credentials(user, "", identity_token=str(entry["identitytoken"]))
    if entry.get("auth"):
        return Credentials(*_decode_auth(entry["auth"], where, key))
    return None


def _decode_auth(value: object, where: Path, key: str) -> tuple[str, str]:
    if not isinstance(value, str):
        raise RbuildError(f"{where}: malformed auth entry for {key} (not a string)")
    try:
        user, sep, password = base64.b64decode(value).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise RbuildError(f"{where}: malformed auth entry for {key}") from None
    if not sep:
        raise RbuildError(f"{where}: malformed auth entry for {key}")
    return user, password


def lookup_credentials(host: str, repository: str | None = None, authfile: str | None = None) -> Credentials | None:
    """Credentials for `host`, most specific key first (`host/ns/repo`, `host/ns`, `host`), file by file.

    In each file a credential helper named for the host (`credHelpers`) comes first, then the
    inline entries, then the file's default helper (`credsStore`).
    """
    host = normalize_host(host)
    keys = []
    if repository:
        parts = repository.split("/")
        keys = [f"{host}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)]
    keys.append(host)
    for path in read_auth_files(authfile):
        data = _load(path)
        helpers = data.get("credHelpers") or {}
        if isinstance(helpers, dict) and isinstance(helpers.get(host), str):
            creds = _from_helper(helpers[host], host)
            if creds is not None:
                return creds
        auths = {normalize_key(k): v for k, v in (data.get("auths") or {}).items()}
        for key in keys:
            creds = _from_entry(auths.get(key), path, key)
            if creds is not None:
                return creds
        if isinstance(data.get("credsStore"), str):
            creds = _from_helper(data["credsStore"], host)
            if creds is not None:
                return creds
    return None


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace `path` (mode 0600, directory 0700): a crash never leaves half a file."""
    from rootless.kernel.fsutil import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(str(path), (json.dumps(data, indent="\t") + "\n").encode(), 0o600, prefix=".auth-")


def _configured_helper(data: dict[str, Any], host: str) -> str | None:
    helpers = data.get("credHelpers") or {}
    if isinstance(helpers, dict) and isinstance(helpers.get(host), str):
        return str(helpers[host])
    store = data.get("credsStore")
    return store if isinstance(store, str) else None


def store_credentials(host: str, username: str, password: str, authfile: str | None = None) -> Path | str:
    """Save a login: to the credential helper the auth file names for `host`, else into the file.

    Returns where it went (the file, or the helper's name), for the user's benefit.
    """
    path = primary_auth_file(authfile)
    data = _load(path)
    helper = _configured_helper(data, host)
    if helper:
        _helper(helper, "store", json.dumps({"ServerURL": host, "Username": username, "Secret": password}))
        return f"docker-credential-{helper}"
    auths = data.setdefault("auths", {})
    for key in [k for k in auths if normalize_key(k) == host]:
        del auths[key]
    auths[host] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    _write(path, data)
    return path


def erase_credentials(host: str, authfile: str | None = None) -> bool:
    """Forget `host` in the primary file (and its helper); False when nothing was stored there.

    Credentials that exist only in docker's config.json are left alone: that file is docker's.
    """
    path = primary_auth_file(authfile)
    data = _load(path)
    found = False
    helper = _configured_helper(data, host)
    if helper and _helper(helper, "erase", host) is not None:
        found = True
    auths = data.get("auths") or {}
    keys = [k for k in auths if normalize_key(k) == host or normalize_key(k).startswith(host + "/")]
    if keys:
        for key in keys:
            del auths[key]
        _write(path, data)
        found = True
    if not found and lookup_credentials(host, authfile=authfile) is not None:
        raise RbuildError(
            f"not logged into {host} with rbuild; its credentials come from another file"
            " (e.g. ~/.docker/config.json): use that tool's logout"
        )
    return found


def erase_all_credentials(authfile: str | None = None) -> None:
    """`logout --all`: empty the primary file's `auths`."""
    path = primary_auth_file(authfile)
    data = _load(path)
    if data.get("auths"):
        data["auths"] = {}
        _write(path, data)


@dataclass
class Challenge:
    """One parsed `WWW-Authenticate` challenge (`Bearer realm=...,service=...,scope=...`)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


_PARAM_RE = re.compile(r'\s*([a-zA-Z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a `WWW-Authenticate` header; None when there is none."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


TokenKey = tuple[str, str, tuple[str, ...], str]  # (realm, service, scopes, who)


class TokenCache:
    """Bearer tokens keyed by (realm, service, scopes, who): one token request per scope set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[TokenKey, tuple[str, float]] = {}

    def get(self, key: TokenKey) -> str | None:
        """A cached token still valid for at least ten seconds."""
        with self._lock:
            hit = self._tokens.get(key)
        if hit and hit[1] - 10 > time.monotonic():
            return hit[0]
        return None

    def put(self, key: TokenKey, token: str, lifetime: float) -> None:
        """Remember `token` for `lifetime` seconds (the spec's default is 60)."""
        with self._lock:
            self._tokens[key] = (token, time.monotonic() + max(lifetime, 60))

    def drop(self, key: TokenKey) -> None:
        """Forget a token the registry refused."""
        with self._lock:
            self._tokens.pop(key, None)
