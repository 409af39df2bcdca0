"""containers' `registries.conf` (v2) and `certs.d`: where a reference is pulled from, and how TLS trusts it.

Files are found as containers/image finds them, so one configuration serves podman, buildah, skopeo
and rbuild: `$CONTAINERS_REGISTRIES_CONF`, else the user file if it exists, else the system file;
then the drop-ins in the system and user `registries.conf.d` directories, in name order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rootless.errors import RbuildError
from rootless.oci.reference import Reference

SYSTEM_CONF = "/etc/containers/registries.conf"
SYSTEM_CONF_DIR = "/etc/containers/registries.conf.d"
SYSTEM_CERT_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")


def user_config_dir() -> Path:
    """`$XDG_CONFIG_HOME/containers`, or `~/.config/containers`: read at call time so HOME may change."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "containers"


@dataclass
class Mirror:
    """A pull-only alternative location for a registry prefix."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"  # all | digest-only | tag-only


@dataclass
class RegistryEntry:
    """One `[[registry]]` table: a prefix, where it really lives, and how to reach it."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: list[Mirror] = field(default_factory=list)

    def matches(self, name: str) -> bool:
        """Whether `name` (`host/repo`) falls under this prefix, at a path boundary."""
        if self.prefix.startswith("*."):
            host = name.split("/", 1)[0]
            return host.endswith(self.prefix[1:])
        return name == self.prefix or name.startswith(self.prefix + "/")


@dataclass(frozen=True)
class Source:
    """A place to try for one reference: the rewritten reference and whether TLS may be skipped."""

    ref: Reference
    insecure: bool


@dataclass
class RegistriesConf:
    """The merged configuration; `search` is None when no file set `unqualified-search-registries`."""

    search: list[str] | None = None
    entries: list[RegistryEntry] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def find(self, name: str) -> RegistryEntry | None:
        """The entry with the longest prefix matching `name`."""
        best: RegistryEntry | None = None
        for entry in self.entries:
            if entry.matches(name) and (best is None or len(entry.prefix) > len(best.prefix)):
                best = entry
        return best

    def insecure(self, host: str) -> bool:
        """Whether `insecure = true` applies to the registry `host` (its own entry or a mirror's)."""
        entry = self.find(host)
        if entry is not None:
            return entry.insecure
        return any(m.insecure for e in self.entries for m in e.mirrors if m.location.split("/", 1)[0] == host)

    def pull_sources(self, ref: Reference) -> list[Source]:
        """Mirrors first, then the primary location; a blocked registry is an error."""
        entry = self.find(ref.name)
        if entry is None:
            return [Source(ref, False)]
        if entry.blocked:
            raise RbuildError(f"registry for {ref} is blocked in registries.conf")
        sources = []
        for mirror in entry.mirrors:
            if mirror.pull_from_mirror == "digest-only" and not ref.digest:
                continue
            if mirror.pull_from_mirror == "tag-only" and ref.digest:
                continue
            sources.append(Source(_rewrite(ref, entry.prefix, mirror.location), mirror.insecure))
        sources.append(Source(_rewrite(ref, entry.prefix, entry.location), entry.insecure))
        return sources

    def push_target(self, ref: Reference) -> Source:
        """Where a push of `ref` goes: mirrors never receive pushes."""
        entry = self.find(ref.name)
        if entry is None:
            return Source(ref, False)
        if entry.blocked:
            raise RbuildError(f"registry for {ref} is blocked in registries.conf")
        return Source(_rewrite(ref, entry.prefix, entry.location), entry.insecure)


def _rewrite(ref: Reference, prefix: str, location: str) -> Reference:
    """Replace `prefix` in `ref`'s name by `location` (wildcard prefixes keep the name)."""
    if prefix.startswith("*.") or not location or location == prefix:
        return ref
    name = location + ref.name[len(prefix) :]
    host, _, repo = name.partition("/")
    if not repo:
        raise RbuildError(f"registries.conf location {location!r} leaves no repository for {ref}")
    return Reference(host, repo, ref.tag, ref.digest)


def conf_files() -> list[str]:
    """The main file (if any) followed by the drop-ins, in the order they apply."""
    files: list[str] = []
    explicit = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    user_conf = user_config_dir() / "registries.conf"
    if explicit:
        files.append(explicit)
    elif user_conf.is_file():
        files.append(str(user_conf))
    elif os.path.isfile(SYSTEM_CONF):
        files.append(SYSTEM_CONF)
    dropins: dict[str, str] = {}
    for directory in (Path(SYSTEM_CONF_DIR), user_config_dir() / "registries.conf.d"):
        if directory.is_dir():
            for item in directory.glob("*.conf"):
                dropins[item.name] = str(item)  # a user drop-in replaces a system one of the same name
    files.extend(dropins[name] for name in sorted(dropins))
    return files


def _bool(table: dict[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise RbuildError(f"{where}: {key} must be true or false")
    return value


def _merge(conf: RegistriesConf, data: dict[str, Any], path: str) -> None:
    """Apply one file: search list and short-name aliases replace; entries replace by prefix."""
    if "registries" in data:
        raise RbuildError(f"{path}: v1 format ([registries.*]) is not supported; use the v2 format")
    if "unqualified-search-registries" in data:
        search = data["unqualified-search-registries"]
        if not isinstance(search, list) or not all(isinstance(s, str) for s in search):
            raise RbuildError(f"{path}: unqualified-search-registries must be a list of strings")
        conf.search = list(search)
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict):
        raise RbuildError(f"{path}: [aliases] must be a table")
    conf.aliases.update({str(k): str(v) for k, v in aliases.items()})
    tables = data.get("registry", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RbuildError(f"{path}: registry entries must be [[registry]] tables")
    for table in tables:
        prefix = table.get("prefix") or table.get("location")
        if not isinstance(prefix, str) or not prefix:
            raise RbuildError(f"{path}: [[registry]] needs a prefix or a location")
        digest_only = _bool(table, "mirror-by-digest-only", path)
        mirrors = []
        mirror_tables = table.get("mirror", [])
        if not isinstance(mirror_tables, list) or not all(isinstance(m, dict) for m in mirror_tables):
            raise RbuildError(f"{path}: mirrors of {prefix} must be [[registry.mirror]] tables")
        for m in mirror_tables:
            if not isinstance(m.get("location"), str):
                raise RbuildError(f"{path}: [[registry.mirror]] for {prefix} needs a location")
            mode = m.get("pull-from-mirror", "digest-only" if digest_only else "all")
            if mode not in ("all", "digest-only", "tag-only"):
                raise RbuildError(f"{path}: pull-from-mirror must be all, digest-only or tag-only")
            mirrors.append(Mirror(m["location"].rstrip("/"), _bool(m, "insecure", path), mode))
        entry = RegistryEntry(
            prefix=prefix.rstrip("/"),
            location=str(table.get("location") or prefix).rstrip("/"),
            insecure=_bool(table, "insecure", path),
            blocked=_bool(table, "blocked", path),
            mirrors=mirrors,
        )
        conf.entries = [e for e in conf.entries if e.prefix != entry.prefix] + [entry]


def load_registries_conf() -> RegistriesConf:
    """Read and merge every registries.conf file that applies; a malformed file is an error."""
    import tomllib

    conf = RegistriesConf()
    for path in conf_files():
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise RbuildError(f"cannot read {path}: {e}") from None
        _merge(conf, data, path)
        conf.files.append(path)
    return conf


@dataclass
class TLSFiles:
    """What certs.d provides for one registry: extra CA roots and client certificate pairs."""

    ca_files: list[str] = field(default_factory=list)
    client_pairs: list[tuple[str, str]] = field(default_factory=list)


def tls_files(host: str, cert_dir: str | None = None) -> TLSFiles:
    """The certs.d entries for `host` (`HOST[:PORT]`): `--cert-dir` alone, else the first existing
    of the user, containers and docker `certs.d/HOST[:PORT]` directories."""
    if cert_dir:
        candidates = [Path(cert_dir)]
    else:
        roots = [user_config_dir() / "certs.d", *map(Path, SYSTEM_CERT_DIRS)]
        candidates = [root / host for root in roots if (root / host).is_dir()][:1]
    found = TLSFiles()
    for directory in candidates:
        if not directory.is_dir():
            continue
        for item in sorted(directory.iterdir()):
            if item.suffix == ".crt":
                found.ca_files.append(str(item))
            elif item.suffix == ".cert":
                key = item.with_suffix(".key")
                if not key.exists():
                    raise RbuildError(f"client certificate {item} has no matching key {key.name}")
                found.client_pairs.append((str(item), str(key)))
            elif item.suffix == ".key" and not item.with_suffix(".cert").exists():
                raise RbuildError(f"client key {item} has no matching certificate {item.stem}.cert")
    return found
