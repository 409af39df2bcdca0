"""The registry client behind rootless.registry.api: verified parallel pulls with resume, pushes with
HEAD checks, cross-repository mounts and chunked uploads, platform choice in indexes.

Loaded only when a registry is contacted (it pulls in the HTTP stack through registry_http).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlencode, urlsplit, urlunsplit

from rootless.blob.digest import check_digest, parse_digest, sha256_of
from rootless.blob.verify import BlobMismatch, Verifier
from rootless.errors import RbuildError
from rootless.kernel.fsutil import atomic_file
from rootless.oci import schema as ocischema
from rootless.oci.image import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from rootless.oci.platform import check_config_platform, choose_platform, parse_platform
from rootless.oci.reference import Reference
from rootless.oci.schema import MAX_CONFIG, MAX_MANIFEST
from rootless.registry.api import (
    Descriptor,
    RegistryOptions,
    RemoteImage,
    StreamedBlob,
    parse_creds,
    resolve_names,
)
from rootless.registry.blobcache import BlobLocations
from rootless.registry.conf import RegistriesConf, Source, load_registries_conf
from rootless.registry.http import (
    MAX_ATTEMPTS,
    RegistryAuthError,
    RegistryHTTP,
    backoff,
    describe,
    error_detail,
    transient_errors,
)
from rootless.registry.progress import Progress

if TYPE_CHECKING:
    import requests

    from rootless.blob.growing import Growing
    from rootless.events import Reporter

PARALLEL = 6
CHUNK_THRESHOLD = 64 << 20  # larger blobs go up in chunks, so a failure costs one chunk
CHUNK_SIZE = 32 << 20
STREAM_CHUNK = 8 << 20  # a blob being compressed while it is pushed goes up in PATCHes of this size as it grows
READ_SIZE = 1 << 20
VERIFY_ATTEMPTS = 3  # a blob that fails verification is fetched again, at most this often
MAX_RESUMES = 20  # Range resumptions of one download, however much each one gained


# -- helpers -----------------------------------------------------------------------------


def _media_type(resp: requests.Response, body: dict[str, Any]) -> str:
    header = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
    declared = body.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if header in MANIFEST_TYPES + INDEX_TYPES:
        return header
    return OCI_INDEX if "manifests" in body else OCI_MANIFEST


def _with_query(url: str, **params: str) -> str:
    """Add query parameters to an upload Location, which may already carry its own."""
    parts = urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class _Slice(io.RawIOBase):
    """`length` bytes of `f` from its current position, with a len() so requests sends Content-Length;
    reports each read to `on_read` (progress)."""

    def __init__(self, f: BinaryIO, length: int, on_read: Callable[[int], None]) -> None:
        self._f = f
        self._left = length
        self._length = length
        self._on_read = on_read

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._length - self._left  # requests sizes the body as len() - tell()

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n) if n else b""
        self._left -= len(data)
        self._on_read(len(data))
        return data


class _Tap(io.RawIOBase, BinaryIO):
    """The file a download writes, announcing each write (flushed) and each restart to the blob's readers."""

    def __init__(self, f: BinaryIO, growing: Growing) -> None:
        self._f = f
        self._growing = growing

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._f.flush()
        self._growing.grew(self._f.tell())
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        n = self._f.truncate(size)
        self._growing.restart()
        return n


class _Corrupt(Exception):
    """A blob arrived but failed verification (wrong size or digest): worth one more fetch."""


class _Refused(_Corrupt):
    """The registry answered a chunk with a definite no (a 4xx other than a timeout or throttling): a
    registry without chunked uploads, or an upload session it has dropped."""


class _Missing(Exception):
    """A source does not have the blob (404): try the next source."""


def _position(f: BinaryIO, opener: Callable[[], BinaryIO], offset: int) -> BinaryIO:
    """`f` positioned at `offset`, reopening (and skipping) when it cannot seek."""
    try:
        f.seek(offset)
        return f
    except (OSError, io.UnsupportedOperation):
        f.close()
        f = opener()
        left = offset
        while left:
            skipped = f.read(min(left, READ_SIZE))
            if not skipped:
                raise RbuildError("layer source ended before its declared size") from None
            left -= len(skipped)
        return f


def _parallel(
    jobs: list[Callable[[Progress, threading.Event], None]],
    prog: Progress,
    name: str,
    cancel: threading.Event | None = None,
) -> None:
    """Run blob transfers on a few threads; the first failure (or a Ctrl-C, or `cancel` set by another
    thread) cancels the rest, which stop within one read and clean up before this returns, then it is
    raised."""
    cancel = cancel or threading.Event()
    with ThreadPoolExecutor(min(PARALLEL, len(jobs) or 1), thread_name_prefix=name) as pool:
        futures = [pool.submit(job, prog, cancel) for job in jobs]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            cancel.set()
            raise
        failed = [f for f in done if f.exception() is not None]
        if failed:
            cancel.set()
            wait(futures)
            raise failed[0].exception()  # type: ignore[misc]


STALE_SECONDS = 3600.0


def _sweep(dest: Path) -> None:
    """Remove temp and lock files a killed rbuild left behind (untouched for an hour: a live download
    writes its temp file continuously, and a lock file that old is only a missed dedup at worst)."""
    now = time.time()
    try:
        entries = list(os.scandir(dest))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith((".partial-", ".lock-")):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass


class RegistryClient:
    """The implementation behind rootless.registry.api.Registry (thread-safe, reusable)."""

    def __init__(self, options: RegistryOptions) -> None:
        self.options = options
        self.conf: RegistriesConf = load_registries_conf()
        self.platform = parse_platform(options.platform)
        creds = parse_creds(options.creds) if options.creds else None
        self.http = RegistryHTTP(
            self.conf,
            tls_verify=options.tls_verify,
            cert_dir=options.cert_dir,
            authfile=options.authfile,
            creds=creds,
            creds_hosts=self._creds_hosts(options),
        )
        self.locations = BlobLocations()
        self._preferred: dict[Reference, Reference] = {}

    def _creds_hosts(self, options: RegistryOptions) -> set[str] | None:
        """Where `--creds` may go: the registries of the names the command line gave (`creds_for`) and
        where registries.conf sends those (mirrors, rewritten locations); None: wherever asked."""
        if options.creds_for is None:
            return None
        hosts: set[str] = set()
        for name in options.creds_for:
            try:
                refs = resolve_names(name, options)
            except RbuildError:
                continue
            for ref in refs:
                hosts.add(ref.registry)
                with contextlib.suppress(RbuildError):  # a blocked registry: refused when contacted
                    hosts.update(s.ref.registry for s in self.conf.pull_sources(ref))
                    hosts.add(self.conf.push_target(ref).ref.registry)
        return hosts

    # -- pull ------------------------------------------------------------------------------

    def _sources(self, ref: Reference) -> list[Source]:
        sources = self.conf.pull_sources(ref)
        self.http.insecure_hosts.update(s.ref.registry for s in sources if s.insecure)
        preferred = self._preferred.get(ref.with_tag(None))
        sources.sort(key=lambda s: s.ref.name != (preferred.name if preferred else s.ref.name))
        return sources

    def resolve(self, ref: Reference) -> RemoteImage:
        """Manifest (for this platform) and verified config of `ref`, trying mirrors before the registry."""
        error: RbuildError | None = None
        for source in self._sources(ref):
            try:
                image = self._resolve_at(ref, source)
            except RbuildError as e:
                error = e
                continue
            self._preferred[ref.with_tag(None)] = source.ref
            return image
        assert error is not None
        raise error

    def resolve_any(self, refs: list[Reference]) -> RemoteImage:
        """The first of `refs` (short-name candidates) that resolves; all failures reported otherwise."""
        if not refs:
            raise RbuildError("no registries to search")
        errors = []
        for ref in refs:
            try:
                return self.resolve(ref)
            except RbuildError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise RbuildError(errors[0])
        raise RbuildError("image not found in any registry searched: " + "; ".join(errors))

    def resolve_artifact(self, ref: Reference, config_type: str) -> bytes:
        """The verified config blob of an artifact manifest whose config has media type `config_type`
        (rbuild's registry cache); its layers are fetched later by digest with `fetch_blobs`."""
        what = f"reading {ref}"
        source = self._sources(ref)[0]
        _, digest, media_type, data = self._get_manifest(source, source.ref.selector, what)
        if media_type != OCI_MANIFEST:
            raise RbuildError(f"{what}: expected an OCI manifest, got {media_type!r}")
        if not isinstance(data.get("layers"), list):
            raise RbuildError(f"{what}: manifest {digest} has no layer list")
        config_desc = Descriptor.from_json(data.get("config"), what)
        layers = [Descriptor.from_json(d, what) for d in data["layers"]]
        if config_desc.media_type != config_type:
            raise RbuildError(f"{what}: its config is {config_desc.media_type!r}, not {config_type!r}")
        config = self._get_small_blob(source, config_desc, what)
        self.locations.record(
            source.ref.registry, source.ref.repository, [config_desc.digest] + [d.digest for d in layers]
        )
        return config

    def _get_manifest(self, source: Source, selector: str, what: str) -> tuple[bytes, str, str, dict[str, Any]]:
        """GET a manifest or index, verified against its digest; returns (bytes, digest, type, json)."""
        ref = source.ref
        accept = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
        for attempt in range(VERIFY_ATTEMPTS):
            resp = self.http.request(
                "GET",
                ref.registry,
                f"/v2/{ref.repository}/manifests/{selector}",
                scopes=[f"repository:{ref.repository}:pull"],
                repository=ref.repository,
                what=what,
                headers={"Accept": accept},
                stream=True,
            )
            with resp:
                if resp.status_code == 404:
                    raise RbuildError(f"{what}: manifest unknown ({error_detail(resp)})")
                if resp.status_code != 200:
                    raise RbuildError(f"{what}: {error_detail(resp)}")
                try:
                    body = resp.raw.read(MAX_MANIFEST + 1, decode_content=True)
                except transient_errors() as e:
                    if attempt + 1 >= VERIFY_ATTEMPTS:
                        raise RbuildError(f"{what}: {describe(e)}") from None
                    time.sleep(backoff(attempt))
                    continue
            if len(body) > MAX_MANIFEST:
                raise RbuildError(f"{what}: manifest larger than {MAX_MANIFEST} bytes")
            expected = selector if ":" in selector else resp.headers.get("Docker-Content-Digest", "")
            algo = parse_digest(expected)[0] if expected.startswith(("sha256:", "sha512:")) else "sha256"
            digest = f"{algo}:{hashlib.new(algo, body).hexdigest()}"
            if expected and digest != expected:
                if attempt + 1 >= VERIFY_ATTEMPTS:
                    raise RbuildError(f"{what}: manifest digest mismatch (expected {expected}, got {digest})")
                time.sleep(backoff(attempt))
                continue
            data = ocischema.load(body, f"{what}: manifest {digest}")
            if data.get("schemaVersion") == 1:
                raise RbuildError(f"{what}: docker schema 1 manifests are not supported")
            return body, digest, _media_type(resp, data), data
        raise AssertionError("unreachable")

    def _resolve_at(self, ref: Reference, source: Source) -> RemoteImage:
        what = f"pulling {ref}" if source.ref == ref else f"pulling {ref} from {source.ref.name}"
        body, digest, media_type, data = self._get_manifest(source, source.ref.selector, what)
        index_digest = None
        depth = 0
        while media_type in INDEX_TYPES:
            depth += 1
            if depth > 3:
                raise RbuildError(f"{what}: image indexes nested too deeply")
            index_digest = index_digest or digest
            ocischema.check_index(data, f"{what}: index {digest}")
            entry = Descriptor.from_json(choose_platform(data, self.platform, what), what)
            body, digest, media_type, data = self._get_manifest(source, entry.digest, what)
            if digest != entry.digest:
                raise RbuildError(f"{what}: manifest digest mismatch for {entry.digest}")
        if media_type not in MANIFEST_TYPES:
            raise RbuildError(f"{what}: unsupported manifest type {media_type!r}")
        ocischema.check_manifest(data, f"{what}: manifest {digest}")
        config_desc = Descriptor.from_json(data["config"], what)
        layers = [Descriptor.from_json(d, what) for d in data["layers"]]
        config = self._get_small_blob(source, config_desc, what)
        config_what = f"{what}: config {config_desc.digest}"
        ocischema.check_config(ocischema.load(config, config_what), config_what)
        if self.options.platform and index_digest is None:
            check_config_platform(config, self.platform, what)
        self.locations.record(
            source.ref.registry, source.ref.repository, [config_desc.digest] + [layer.digest for layer in layers]
        )
        return RemoteImage(
            ref=ref,
            manifest_digest=digest,
            manifest_media_type=media_type,
            manifest=body,
            config=config,
            layers=layers,
            config_descriptor=config_desc,
            index_digest=index_digest,
            source=source.ref,
        )

    def _get_small_blob(self, source: Source, desc: Descriptor, what: str) -> bytes:
        """A config blob, in memory, verified like any other blob."""
        if desc.size > MAX_CONFIG:
            raise RbuildError(f"{what}: config blob of {desc.size} bytes is too large")
        buf = io.BytesIO()
        self._download([source], desc, buf, Progress(None), threading.Event(), what)
        return buf.getvalue()

    def remote_digest(self, ref: Reference) -> str:
        """The digest the registry serves for `ref` now (a HEAD; for `--pull=newer`)."""
        source = self._sources(ref)[-1]
        what = f"checking {ref}"
        resp = self.http.request(
            "HEAD",
            source.ref.registry,
            f"/v2/{source.ref.repository}/manifests/{source.ref.selector}",
            scopes=[f"repository:{source.ref.repository}:pull"],
            repository=source.ref.repository,
            what=what,
            headers={"Accept": ", ".join(MANIFEST_TYPES + INDEX_TYPES)},
        )
        if resp.status_code == 404:
            raise RbuildError(f"{what}: manifest unknown (404)")
        if resp.status_code != 200:
            raise RbuildError(f"{what}: {error_detail(resp)}")
        digest = resp.headers.get("Docker-Content-Digest")
        if digest:
            return check_digest(digest)
        return self._get_manifest(source, source.ref.selector, what)[1]

    def fetch_blobs(
        self,
        ref: Reference,
        blobs: list[Descriptor],
        dest_dir: str,
        reporter: Reporter | None = None,
        follow: dict[str, Growing] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Download every blob not yet at `dest_dir/<algo>/<hex>`, in parallel, each verified before
        it is renamed into place; on any error nothing partial remains and the first error is raised.

        A blob wanted by several callers at once (threads or processes) is downloaded once: the
        others wait on its lock file and find it present. `follow`: see api.Registry.fetch_blobs.
        """
        follow = follow or {}
        try:
            dest = Path(dest_dir)
            todo: dict[str, Descriptor] = {}
            for desc in blobs:
                check_digest(desc.digest)
                if desc.digest not in todo and not (dest / desc.digest.replace(":", "/", 1)).exists():
                    todo[desc.digest] = desc
            for digest, growing in follow.items():  # nothing to download: readers read the stored blob
                path = dest / digest.replace(":", "/", 1)
                if digest not in todo and path.exists():
                    growing.finish(digest, path.stat().st_size, str(path))
            if not todo:
                return
            sources = self._sources(ref)
            _sweep(dest)
            what = f"pulling {ref}"
            _parallel(
                [
                    functools.partial(self._fetch_one, sources, d, dest, follow.get(d.digest), what=what)
                    for d in todo.values()
                ],
                Progress(reporter, "pull"),
                "rbuild-pull",
                cancel,
            )
        except BaseException as e:
            for growing in follow.values():
                growing.fail(e)  # a reader of a blob not (yet) fetched learns why
            raise

    def _fetch_one(
        self,
        sources: list[Source],
        desc: Descriptor,
        dest: Path,
        growing: Growing | None,
        prog: Progress,
        cancel: threading.Event,
        *,
        what: str,
    ) -> None:
        algo, hexd = desc.digest.split(":", 1)
        final = dest / algo / hexd
        try:
            if final.exists():
                return
            final.parent.mkdir(parents=True, exist_ok=True)
            lock_path = dest / f".lock-{algo}-{hexd}"
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if cancel.wait(0.05):
                            raise RbuildError(f"{what}: cancelled")
                if final.exists():  # someone else fetched it while we waited
                    prog.finish(desc.digest, "skipped: already exists")
                    return
                with atomic_file(str(final), prefix=f".partial-{hexd[:16]}-", tmp_dir=str(dest)) as f:
                    if growing is None:
                        self._download(sources, desc, f, prog, cancel, what)
                    else:
                        growing.attach(f.fileno())
                        self._download(sources, desc, _Tap(f, growing), prog, cancel, what)
                prog.finish(desc.digest, "done")
            finally:
                try:
                    os.unlink(lock_path)
                except FileNotFoundError:
                    pass
                os.close(lock_fd)
        except BaseException as e:
            if growing is not None:
                growing.fail(e)
            raise
        finally:
            if growing is not None and final.exists():
                growing.finish(desc.digest, desc.size, str(final))  # in place and verified: readers reach the end

    def _download(
        self, sources: list[Source], desc: Descriptor, f: BinaryIO, prog: Progress, cancel: threading.Event, what: str
    ) -> None:
        """Fill `f` with the verified blob: from its `urls` (non-distributable layers), then the sources."""
        openers: list[tuple[str, Callable[[dict[str, str]], requests.Response]]] = []
        for url in desc.urls:
            if url.startswith(("http://", "https://")):
                openers.append((url, functools.partial(self._plain_get, url, what=what)))
        for source in sources:
            openers.append((source.ref.name, functools.partial(self._blob_get, source.ref, desc.digest, what=what)))
        errors: list[str] = []
        for name, opener in openers:
            try:
                self._stream_verified(opener, desc, f, prog, cancel, what)
                return
            except _Missing as e:
                errors.append(f"{name}: {e}")
            except RbuildError as e:
                if len(openers) == 1 or cancel.is_set():
                    raise
                errors.append(str(e).removeprefix(f"{what}: "))
        if desc.urls:
            raise RbuildError(
                f"{what}: non-distributable layer {desc.digest} could not be fetched from "
                f"its urls or the registry ({'; '.join(errors)})"
            )
        raise RbuildError(f"{what}: blob {desc.digest} not found ({'; '.join(errors)})")

    def _blob_get(self, ref: Reference, digest: str, headers: dict[str, str], what: str) -> requests.Response:
        return self.http.request(
            "GET",
            ref.registry,
            f"/v2/{ref.repository}/blobs/{digest}",
            scopes=[f"repository:{ref.repository}:pull"],
            repository=ref.repository,
            what=what,
            headers=headers,
            stream=True,
        )

    def _plain_get(self, url: str, headers: dict[str, str], what: str) -> requests.Response:
        """GET a foreign layer URL: no registry credentials go there; transient failures retried."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                resp = self.http.session().get(url, headers=headers, stream=True, timeout=(15, 60))
            except transient_errors() as e:
                if attempt + 1 >= MAX_ATTEMPTS:
                    raise RbuildError(f"{what}: {url}: {describe(e)}") from None
                time.sleep(backoff(attempt))
                continue
            if resp.status_code in (429, 500, 502, 503, 504) and attempt + 1 < MAX_ATTEMPTS:
                resp.close()
                time.sleep(backoff(attempt, resp.headers.get("Retry-After")))
                continue
            return resp
        raise AssertionError("unreachable")

    def _stream_verified(
        self,
        opener: Callable[[dict[str, str]], requests.Response],
        desc: Descriptor,
        f: BinaryIO,
        prog: Progress,
        cancel: threading.Event,
        what: str,
    ) -> None:
        """Stream one blob into `f`, resuming with Range after a dropped connection and starting over
        when the server ignores Range or the result fails verification."""
        for verify_attempt in range(VERIFY_ATTEMPTS):
            f.seek(0)
            f.truncate()
            prog.start(desc.digest, desc.size)
            verifier = Verifier(desc.digest, desc.size)
            failures = resumes = 0
            try:
                while True:
                    if cancel.is_set():
                        raise RbuildError(f"{what}: cancelled")
                    headers = {"Accept-Encoding": "identity"}
                    if verifier.count:
                        headers["Range"] = f"bytes={verifier.count}-"
                    progressed = False
                    try:
                        with opener(headers) as resp:
                            if resp.status_code == 404:
                                raise _Missing(error_detail(resp))
                            if resp.status_code == 206 and verifier.count:
                                start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                                if start != str(verifier.count):
                                    raise _Corrupt("bad Content-Range")
                            elif resp.status_code == 200:
                                if verifier.count:  # Range ignored: start over, quietly
                                    f.seek(0)
                                    f.truncate()
                                    verifier.reset()
                                    prog.reset(desc.digest, 0)
                            else:
                                raise RbuildError(f"{what}: blob {desc.digest}: {error_detail(resp)}")
                            for chunk in resp.raw.stream(READ_SIZE, decode_content=False):
                                verifier.update(chunk)
                                f.write(chunk)
                                progressed = True
                                prog.advance(desc.digest, len(chunk))
                                if cancel.is_set():
                                    raise RbuildError(f"{what}: cancelled")
                    except transient_errors() as e:
                        # Interruptions that made progress are resumed (up to MAX_RESUMES in all); a
                        # connection that keeps failing without progress gives up after MAX_ATTEMPTS.
                        failures = 0 if progressed else failures + 1
                        resumes += 1
                        if failures >= MAX_ATTEMPTS or resumes > MAX_RESUMES:
                            raise RbuildError(f"{what}: blob {desc.digest}: {describe(e)}") from None
                        time.sleep(backoff(failures))
                        continue
                    if verifier.count < desc.size:
                        raise _Corrupt(f"{verifier.count} of {desc.size} bytes")
                    break
                verifier.check()
                return
            except (_Corrupt, BlobMismatch) as e:
                if verify_attempt + 1 >= VERIFY_ATTEMPTS:
                    cause = e.cause if isinstance(e, BlobMismatch) else e
                    raise RbuildError(f"{what}: blob {desc.digest} failed verification: {cause}") from None
                time.sleep(backoff(verify_attempt))

    # -- push ------------------------------------------------------------------------------

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
        """Upload blobs the registry lacks (mounting from sibling repositories where possible; blobs still
        being written as they grow), then the manifest; returns the manifest digest."""
        dest = self.conf.push_target(ref)
        target = dest.ref
        if dest.insecure:
            self.http.insecure_hosts.add(target.registry)
        what = f"pushing {ref}"
        if isinstance(manifest, bytes):
            self._check_manifest_digest(target, manifest, what)
        blobs: dict[str, tuple[Descriptor, Callable[[], BinaryIO]]] = {}
        if manifest_media_type not in INDEX_TYPES:  # an index has no config: its manifests are pushed first
            blobs[config.digest] = (config, lambda: io.BytesIO(config_bytes))
        streamed: list[StreamedBlob] = []
        for item in layers:
            if isinstance(item, StreamedBlob):
                streamed.append(item)
            else:
                blobs.setdefault(check_digest(item[0].digest), item)
        jobs: list[Callable[[Progress, threading.Event], None]]
        jobs = [functools.partial(self._push_streamed, target, s, what=what) for s in streamed]  # the longest first
        jobs += [functools.partial(self._push_blob, target, d, o, what=what) for d, o in blobs.values()]
        _parallel(jobs, Progress(reporter, "push"), "rbuild-push")
        if not isinstance(manifest, bytes):
            manifest = manifest()
            self._check_manifest_digest(target, manifest, what)
        digest = sha256_of(manifest)
        resp = self.http.request(
            "PUT",
            target.registry,
            f"/v2/{target.repository}/manifests/{target.tag or digest}",
            scopes=[f"repository:{target.repository}:pull,push"],
            repository=target.repository,
            what=what,
            headers={"Content-Type": manifest_media_type},
            body=lambda: (manifest, len(manifest)),
        )
        with resp:
            if resp.status_code not in (200, 201, 202):
                raise RbuildError(f"{what}: manifest rejected: {error_detail(resp)}")
            served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise RbuildError(f"{what}: registry stored the manifest as {served}, expected {digest}")
        self.locations.record(target.registry, target.repository, list(blobs) + [s.growing.digest for s in streamed])
        return digest

    @staticmethod
    def _check_manifest_digest(target: Reference, manifest: bytes, what: str) -> None:
        digest = sha256_of(manifest)
        if target.digest and target.digest != digest:
            raise RbuildError(f"{what}: manifest digest {digest} does not match the reference")

    def _push_blob(
        self,
        target: Reference,
        desc: Descriptor,
        opener: Callable[[], BinaryIO],
        prog: Progress,
        cancel: threading.Event,
        *,
        what: str,
    ) -> None:
        host, repo = target.registry, target.repository
        scope = f"repository:{repo}:pull,push"
        resp = self.http.request(
            "HEAD", host, f"/v2/{repo}/blobs/{desc.digest}", scopes=[scope], repository=repo, what=what
        )
        resp.close()
        if resp.status_code == 200:
            prog.finish(desc.digest, "skipped: already exists")
            return
        if resp.status_code != 404:
            raise RbuildError(f"{what}: checking blob {desc.digest}: {error_detail(resp)}")
        location = self._try_mount(target, desc, what)
        if location == "":
            prog.finish(desc.digest, "mounted")
            return
        for attempt in range(MAX_ATTEMPTS):
            if cancel.is_set():
                raise RbuildError(f"{what}: cancelled")
            if location is None:
                location = self._start_upload(host, repo, what, desc.digest)
            try:
                self._upload(host, repo, location, desc, opener, prog, cancel, what)
                prog.finish(desc.digest, "done")
                return
            except _Corrupt as e:
                if attempt + 1 >= MAX_ATTEMPTS:
                    raise RbuildError(f"{what}: uploading blob {desc.digest}: {e}") from None
                time.sleep(backoff(attempt))
                location = None  # start a fresh upload session

    def _start_upload(self, host: str, repo: str, what: str, name: str) -> str:
        """A new upload session's Location (POST)."""
        resp = self.http.request(
            "POST",
            host,
            f"/v2/{repo}/blobs/uploads/",
            scopes=[f"repository:{repo}:pull,push"],
            repository=repo,
            what=what,
        )
        resp.close()
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise RbuildError(f"{what}: starting upload of {name}: {error_detail(resp)}")
        return resp.headers["Location"]

    def _push_streamed(
        self, target: Reference, blob: StreamedBlob, prog: Progress, cancel: threading.Event, *, what: str
    ) -> None:
        """Upload a blob while it is being written: a PATCH for every STREAM_CHUNK bytes as soon as they
        exist, then the rest and the PUT that names the digest (known only at the end; the registry checks
        it). A blob complete before its first chunk goes the ordinary way (HEAD check, mount, one PUT), as
        does one whose chunks the registry refuses (no chunked uploads) or fails to take."""
        g = blob.growing
        host, repo = target.registry, target.repository
        location: str | None = None
        offset = 0
        quiet = Progress(None)  # the digest that names a progress row is known only at the end
        quiet.start(g.what, 0)
        src = g.reader(cancel)
        try:
            while g.wait(offset + STREAM_CHUNK, cancel) >= offset + STREAM_CHUNK and not g.finished:
                if location is None:
                    location = self._start_upload(host, repo, what, g.what)
                part = self._part(src, lambda: g.reader(cancel), quiet, g.what)
                try:
                    location = self._chunks(host, repo, location, part, offset, offset + STREAM_CHUNK, cancel, what)
                except _Corrupt:
                    location = None  # the whole blob the ordinary way once it is complete
                    break
                offset += STREAM_CHUNK
        finally:
            src.close()
        digest, size = g.result(cancel)
        desc = Descriptor(blob.media_type, digest, size)
        if location is not None:
            try:
                self._upload(host, repo, location, desc, lambda: g.reader(cancel), prog, cancel, what, offset)
                prog.finish(desc.digest, "done")
                return
            except _Corrupt:
                pass  # the rest failed, or the chunks were not the blob: start over the ordinary way
        self._push_blob(target, desc, lambda: g.reader(cancel), prog, cancel, what=what)

    def _try_mount(self, target: Reference, desc: Descriptor, what: str) -> str | None:
        """Mount `desc` from another repository of the registry: "" when mounted, else the upload
        Location the registry opened instead (or None)."""
        host, repo = target.registry, target.repository
        for source_repo in self.locations.candidates(desc.digest, host, exclude=repo):
            query = urlencode({"mount": desc.digest, "from": source_repo})
            try:
                resp = self.http.request(
                    "POST",
                    host,
                    f"/v2/{repo}/blobs/uploads/?{query}",
                    scopes=[f"repository:{repo}:pull,push", f"repository:{source_repo}:pull"],
                    repository=repo,
                    what=what,
                )
            except RbuildError:
                continue  # no pull access to the source: upload instead
            resp.close()
            if resp.status_code == 201:
                return ""
            if resp.status_code == 202 and resp.headers.get("Location"):
                self.locations.forget(host, source_repo, desc.digest)
                return resp.headers["Location"]
        return None

    @staticmethod
    def _part(
        src: BinaryIO, opener: Callable[[], BinaryIO], prog: Progress, key: str
    ) -> Callable[[int, int], Callable[[], tuple[Any, int]]]:
        """Request bodies of `length` bytes at `offset` of a blob, each positioned afresh for every attempt."""
        state = [src]

        def part(offset: int, length: int) -> Callable[[], tuple[Any, int]]:
            def body() -> tuple[Any, int]:
                state[0] = _position(state[0], opener, offset)
                prog.reset(key, offset)
                return _Slice(state[0], length, lambda n: prog.advance(key, n)), length

            return body

        return part

    def _send(
        self,
        host: str,
        repo: str,
        method: str,
        url: str,
        body: Callable[[], tuple[Any, int]],
        what: str,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """One upload request, not retried here: a transient failure is _Corrupt, for the caller to resume."""
        try:
            return self.http.request(
                method,
                host,
                url,
                scopes=[f"repository:{repo}:pull,push"],
                repository=repo,
                what=what,
                body=body,
                retry=False,
                headers={"Content-Type": "application/octet-stream", **(headers or {})},
            )
        except RegistryAuthError:
            raise
        except RbuildError as e:  # with retry=False: a transient failure, ours to handle
            raise _Corrupt(str(e).removeprefix(f"{what}: ")) from None

    def _upload(
        self,
        host: str,
        repo: str,
        location: str,
        desc: Descriptor,
        opener: Callable[[], BinaryIO],
        prog: Progress,
        cancel: threading.Event,
        what: str,
        start: int = 0,
    ) -> None:
        """Send one blob to an upload session: one PUT when small, PATCH chunks (resumable) when large or
        when the session already holds its first `start` bytes."""
        prog.start(desc.digest, desc.size)
        src = opener()
        part = self._part(src, opener, prog, desc.digest)
        try:
            if desc.size <= CHUNK_THRESHOLD and not start:
                self._check_put(
                    self._send(host, repo, "PUT", _with_query(location, digest=desc.digest), part(0, desc.size), what),
                    desc,
                    what,
                )
                return
            location = self._chunks(host, repo, location, part, start, desc.size, cancel, what)
            put = self._send(host, repo, "PUT", _with_query(location, digest=desc.digest), lambda: (b"", 0), what)
            self._check_put(put, desc, what)
        finally:
            src.close()

    def _chunks(
        self,
        host: str,
        repo: str,
        location: str,
        part: Callable[[int, int], Callable[[], tuple[Any, int]]],
        offset: int,
        end: int,
        cancel: threading.Event,
        what: str,
    ) -> str:
        """PATCH bytes `offset` to `end` in chunks, resuming where the registry says after a failure; returns
        the session's Location for the next request."""
        failures = 0
        while offset < end:
            if cancel.is_set():
                raise RbuildError(f"{what}: cancelled")
            length = min(CHUNK_SIZE, end - offset)
            try:
                content_range = {"Content-Range": f"{offset}-{offset + length - 1}"}
                resp = self._send(host, repo, "PATCH", location, part(offset, length), what, content_range)
                resp.close()
                if 400 <= resp.status_code < 500 and resp.status_code not in (408, 416, 429):
                    raise _Refused(f"chunk at {offset}: {error_detail(resp)}")
                if resp.status_code != 202:
                    raise _Corrupt(f"chunk at {offset}: {error_detail(resp)}")
                location = resp.headers.get("Location", location)
                offset += length
                failures = 0
            except _Refused:
                raise  # a definite no: retrying the chunk will not change it
            except _Corrupt as e:
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    raise
                time.sleep(backoff(failures - 1))
                location, offset = self._upload_status(host, repo, location, what, e)
        return location

    def _upload_status(self, host: str, repo: str, location: str, what: str, cause: Exception) -> tuple[str, int]:
        """Where an interrupted chunked upload stands (the registry's `Range: 0-N`), to resume at N+1."""
        resp = self.http.request(
            "GET", host, location, scopes=[f"repository:{repo}:pull,push"], repository=repo, what=what
        )
        resp.close()
        if resp.status_code != 204:
            raise _Corrupt(f"{cause}; upload session lost ({error_detail(resp)})")
        end = resp.headers.get("Range", "0--1").removeprefix("bytes=").split("-", 1)[-1]
        try:
            return resp.headers.get("Location", location), int(end) + 1
        except ValueError:
            raise _Corrupt(f"{cause}; the registry sent an unreadable Range {resp.headers.get('Range')!r}") from None

    @staticmethod
    def _check_put(resp: requests.Response, desc: Descriptor, what: str) -> None:
        resp.close()
        if resp.status_code in (201, 204):
            return
        if resp.status_code == 400 or resp.status_code >= 500:  # bytes lost on the way, or a hiccup
            raise _Corrupt(error_detail(resp))
        raise RbuildError(f"{what}: uploading blob {desc.digest}: {error_detail(resp)}")
