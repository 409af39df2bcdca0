"""Type checks for image documents that come from outside: manifests, indexes and configs (OCI image-spec
manifest.md, image-index.md, config.md, descriptor.md, and Docker's schema 2, which has the same shape).

Every import path (registry pulls, `oci:` layouts, `oci-archive:` archives) checks a document here before
using it, so a hostile or broken image is refused with one error naming the document and the field
(`.config.Env[2] is not a string`) instead of failing later, or being stored and then breaking `rbuild
images` and every build FROM it. Unknown fields are allowed, as the spec says. Inside a config's `config`
object a null counts as absent: Docker's Go types write empty lists and maps that way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NoReturn

from rootless.blob.digest import check_digest
from rootless.errors import RbuildError
from rootless.oci.image import CONFIG_TYPES, INDEX_TYPES, LAYER_TYPES, MANIFEST_TYPES

__all__ = ["load", "check_manifest", "check_index", "check_config", "is_index"]

MAX_SIZE = (1 << 63) - 1  # descriptor sizes are int64
MAX_MANIFEST = 4 << 20  # manifests and indexes are read whole: larger ones are refused
MAX_CONFIG = 8 << 20
# RFC 6838 section 4.2 names: what descriptor.md requires of a mediaType
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}", re.ASCII)
# RFC 3339 section 5.6 date-time, what config.md requires of `created`
_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", re.ASCII)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def load(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from `data`; anything else (bad JSON, an array, absurd nesting) is `what`'s fault."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise RbuildError(f"{what}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise RbuildError(f"{what}: not a JSON object")
    return doc


def is_index(doc: dict[str, Any]) -> bool:
    """Whether a document (from a layout, or a registry that sent no usable type) is an index."""
    media_type = doc.get("mediaType")
    return media_type in INDEX_TYPES or (media_type not in MANIFEST_TYPES and "manifests" in doc)


class _Check:
    """One document's check: `what` names it in every error."""

    def __init__(self, what: str) -> None:
        self.what = what

    def fail(self, path: str, problem: str) -> NoReturn:
        raise RbuildError(f"{self.what}: {path} {problem}")

    def field(
        self,
        obj: dict[str, Any],
        key: str,
        path: str,
        check: Callable[[Any, str], Any],
        *,
        required: bool = False,
        null: bool = False,
    ) -> None:
        """Check obj[key] when present (a missing required field, or a null where none is allowed, fails)."""
        sub = f"{path}.{key}" if _KEY.fullmatch(key) else f"{path or '.'}[{json.dumps(key)}]"  # jq's syntax
        if key not in obj:
            if required:
                self.fail(sub, "is missing")
            return
        if obj[key] is None and null:
            return
        check(obj[key], sub)

    def obj(self, v: Any, path: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            self.fail(path, "is not an object")
        return v

    def string(self, v: Any, path: str) -> str:
        if not isinstance(v, str):
            self.fail(path, "is not a string")
        try:
            v.encode()
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: cannot be stored or printed
            self.fail(path, "is not valid Unicode")
        return v

    def strings(self, v: Any, path: str) -> None:
        if not isinstance(v, list):
            self.fail(path, "is not an array")
        for i, item in enumerate(v):
            self.string(item, f"{path}[{i}]")

    def string_map(self, v: Any, path: str) -> None:
        for key, value in self.obj(v, path).items():
            self.string(key, path)
            self.string(value, f"{path}[{json.dumps(key)}]")

    def object_map(self, v: Any, path: str) -> None:
        """ExposedPorts and Volumes: names mapped to (empty) objects."""
        for key, value in self.obj(v, path).items():
            self.string(key, path)
            self.obj(value, f"{path}[{json.dumps(key)}]")

    def integer(self, v: Any, path: str) -> None:
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(path, "is not an integer")

    def size(self, v: Any, path: str) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SIZE:
            self.fail(path, "is not a non-negative integer")

    def boolean(self, v: Any, path: str) -> None:
        if not isinstance(v, bool):
            self.fail(path, "is not true or false")

    def digest(self, v: Any, path: str) -> None:
        try:
            check_digest(self.string(v, path))
        except RbuildError:
            self.fail(path, "is not a digest (want sha256:<64 hex> or sha512:<128 hex>)")

    def media_type(self, v: Any, path: str) -> None:
        if not _MEDIA_TYPE.fullmatch(self.string(v, path)):
            self.fail(path, "is not a media type")

    def date_time(self, v: Any, path: str) -> None:
        if not _DATE_TIME.fullmatch(self.string(v, path)):
            self.fail(path, "is not an RFC 3339 date-time")

    def descriptor(self, v: Any, path: str) -> None:
        d = self.obj(v, path)
        self.field(d, "mediaType", path, self.media_type, required=True)
        self.field(d, "digest", path, self.digest, required=True)
        self.field(d, "size", path, self.size, required=True)
        self.field(d, "urls", path, self.strings)
        self.field(d, "annotations", path, self.string_map)
        self.field(d, "data", path, self.string)
        self.field(d, "artifactType", path, self.media_type)

    def platform(self, v: Any, path: str) -> None:
        p = self.obj(v, path)
        self.field(p, "architecture", path, self.string, required=True)
        self.field(p, "os", path, self.string, required=True)
        self.field(p, "os.version", path, self.string)
        self.field(p, "os.features", path, self.strings)
        self.field(p, "variant", path, self.string)
        self.field(p, "features", path, self.strings)

    def schema_version(self, doc: dict[str, Any]) -> None:
        if doc.get("schemaVersion") == 1:
            raise RbuildError(f"{self.what}: docker schema 1 manifests are not supported")
        self.field(doc, "schemaVersion", "", self.two, required=True)

    def two(self, v: Any, path: str) -> None:
        if v != 2 or isinstance(v, bool):
            self.fail(path, "is not 2")

    def common(self, doc: dict[str, Any], media_types: tuple[str, ...], kind: str) -> None:
        """What manifests and indexes share: schemaVersion, mediaType, artifactType, subject, annotations."""
        self.schema_version(doc)
        self.field(doc, "mediaType", "", self.media_type)
        if "mediaType" in doc and doc["mediaType"] not in media_types:
            self.fail(".mediaType", f"{doc['mediaType']!r} is not an {kind} type")
        self.field(doc, "artifactType", "", self.media_type)
        self.field(doc, "subject", "", self.descriptor)
        self.field(doc, "annotations", "", self.string_map)

    def container_config(self, v: Any, path: str) -> None:
        """The `config` object: what a container runs with (Docker's Healthcheck, OnBuild and Shell too)."""
        conf = self.obj(v, path)
        for key, check in (
            ("User", self.string),
            ("ExposedPorts", self.object_map),
            ("Env", self.strings),
            ("Entrypoint", self.strings),
            ("Cmd", self.strings),
            ("Volumes", self.object_map),
            ("WorkingDir", self.string),
            ("Labels", self.string_map),
            ("StopSignal", self.string),
            ("ArgsEscaped", self.boolean),
            ("Memory", self.integer),
            ("MemorySwap", self.integer),
            ("CpuShares", self.integer),
            ("Healthcheck", self.healthcheck),
            ("OnBuild", self.strings),
            ("Shell", self.strings),
        ):
            self.field(conf, key, path, check, null=True)

    def healthcheck(self, v: Any, path: str) -> None:
        hc = self.obj(v, path)
        self.field(hc, "Test", path, self.strings)
        for key in ("Interval", "Timeout", "StartPeriod", "StartInterval", "Retries"):
            self.field(hc, key, path, self.integer)

    def rootfs(self, v: Any, path: str) -> None:
        rootfs = self.obj(v, path)
        self.field(rootfs, "type", path, self.string, required=True)
        if rootfs["type"] != "layers":
            self.fail(f"{path}.type", f'is {rootfs["type"]!r}, not "layers"')
        # required by the spec, but Docker omits an empty list: absent means no layers
        self.field(rootfs, "diff_ids", path, self.array_of(self.digest))

    def history(self, v: Any, path: str) -> None:
        entry = self.obj(v, path)
        self.field(entry, "created", path, self.date_time)
        for key in ("author", "created_by", "comment"):
            self.field(entry, key, path, self.string)
        self.field(entry, "empty_layer", path, self.boolean)

    def array_of(self, check: Callable[[Any, str], Any]) -> Callable[[Any, str], None]:
        def each(v: Any, path: str) -> None:
            if not isinstance(v, list):
                self.fail(path, "is not an array")
            for i, item in enumerate(v):
                check(item, f"{path}[{i}]")

        return each


def check_manifest(doc: dict[str, Any], what: str) -> None:
    """An image manifest (OCI or Docker schema 2) whose config and layers rbuild can use."""
    c = _Check(what)
    c.common(doc, MANIFEST_TYPES, "image manifest")
    c.field(doc, "config", "", c.descriptor, required=True)
    c.field(doc, "layers", "", c.array_of(c.descriptor), required=True)
    if doc["config"]["mediaType"] not in CONFIG_TYPES:
        raise RbuildError(f"{what}: not a container image (config type {doc['config']['mediaType']!r})")
    for i, layer in enumerate(doc["layers"]):
        if layer["mediaType"] not in LAYER_TYPES:
            c.fail(f".layers[{i}].mediaType", f"{layer['mediaType']!r} is not a layer type rbuild can unpack")


def check_index(doc: dict[str, Any], what: str) -> None:
    """An image index (OCI) or manifest list (Docker schema 2); also a layout's index.json."""
    c = _Check(what)
    c.common(doc, INDEX_TYPES, "image index")

    def entry(v: Any, path: str) -> None:
        c.descriptor(v, path)
        c.field(v, "platform", path, c.platform)

    c.field(doc, "manifests", "", c.array_of(entry), required=True)


def check_config(doc: dict[str, Any], what: str) -> None:
    """An image config (OCI or Docker): the fields rbuild and the runtimes read, with their spec types."""
    c = _Check(what)
    c.field(doc, "created", "", c.date_time)
    c.field(doc, "author", "", c.string)
    c.field(doc, "architecture", "", c.string, required=True)
    c.field(doc, "os", "", c.string, required=True)
    c.field(doc, "os.version", "", c.string)
    c.field(doc, "os.features", "", c.strings)
    c.field(doc, "variant", "", c.string)
    c.field(doc, "config", "", c.container_config)
    c.field(doc, "rootfs", "", c.rootfs, required=True)
    c.field(doc, "history", "", c.array_of(c.history))
