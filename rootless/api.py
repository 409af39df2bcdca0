"""rbuild as a Python library: build, pull, push, images, tag, rmi, inspect (docs/api.md).

Each call that touches layers runs in a forked child inside the user's namespace, as `rbuild` does; the
child's build events are sent back and handed to `on_event` in the caller's process, and its result or
its RbuildError (rootless.errors: ContainerfileError, RunFailed, ...) comes back the same way, so a
caller sees ordinary return values and typed exceptions. Nothing here prints.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rootless.errors import RbuildError
from rootless.events import Event, Reporter, Warn

if TYPE_CHECKING:
    from rootless.build.planner import Plan
    from rootless.build.state import BuildOptions
    from rootless.env.probe import Probe
    from rootless.idmap import IdMap
    from rootless.store.store import Store

EventCallback = Callable[[Event], None]


@dataclass(frozen=True)
class Image:
    """An image in the store: its id (sha256:...), names, creation time (RFC 3339) and manifest digest."""

    id: str
    names: list[str]
    created: str
    digest: str


class _PipeReporter:
    """In the child: every event goes to the parent, pickled and length-prefixed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    @property
    def output_fd(self) -> int | None:
        return None

    def emit(self, event: Event) -> None:
        _send(self.fd, ("event", event), self._lock)


def _send(fd: int, message: tuple[str, Any], lock: threading.Lock | None = None) -> None:
    data = pickle.dumps(message)
    with lock or threading.Lock():
        os.write(fd, struct.pack("!I", len(data)))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _receive(fd: int) -> Any:
    """One message, or None at the end of the stream."""

    def exactly(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    head = exactly(4)
    if head is None:
        return None
    body = exactly(struct.unpack("!I", head)[0])
    return None if body is None else pickle.loads(body)


def _in_namespace(root: str | None, on_event: EventCallback | None, fn: Callable[[Any, Any, Reporter], Any]) -> Any:
    """fn(store, idmap, reporter) in a child inside the user namespace, the store opened there; its return
    value (picklable), or its RbuildError raised here. Events reach on_event in this process, in order."""
    from rootless.env import paths, userns
    from rootless.store.store import Store

    idmap, notice = userns.host_mapping()
    store_root = paths.store_root(root)
    runtime, runtime_notice = paths.runtime_dir(store_root)
    store = Store(store_root, runtime=runtime)
    os.makedirs(os.path.dirname(store.root), exist_ok=True)
    r, w = os.pipe()
    got: dict[str, Any] = {}

    def child(mapping: Any) -> int:
        os.close(r)
        reporter = _PipeReporter(w)
        try:
            for line in (notice, runtime_notice):
                if line:
                    reporter.emit(Warn(line))
            open_store(store, mapping, reporter)
            with store.in_use():
                _send(w, ("result", fn(store, mapping, reporter)))
            return 0
        except RbuildError as e:
            _send(w, ("error", e))
            return e.exit_code
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            _send(w, ("error", RbuildError(f"{e.strerror or e}{where}")))
            return 125

    def pump() -> None:
        while (message := _receive(r)) is not None:
            kind, value = message
            if kind == "event":
                if on_event is not None:
                    on_event(value)
            else:
                got[kind] = value

    reader = threading.Thread(target=pump, name="rbuild-api-events", daemon=True)
    reader.start()
    failure: list[str] = []
    try:
        status = userns.run_inside(idmap, child, failure.append, lambda line: _deliver(on_event, Warn(line)))
    finally:
        os.close(w)  # the child's copy is gone with it: the reader sees the end
        reader.join()
        os.close(r)
    if "error" in got:
        raise got["error"]
    if "result" not in got:
        raise RbuildError(failure[0] if failure else f"the build process ended with status {status}")
    return got["result"]


def _deliver(on_event: EventCallback | None, event: Event) -> None:
    if on_event is not None:
        on_event(event)


def open_store(store: Any, idmap: Any, reporter: Reporter, create: bool = True) -> None:
    """Open the store inside the user namespace; a store of an older format is converted first."""
    from rootless.layer.ownership import Ownership
    from rootless.store.store import STORE_VERSION

    store.open(idmap, create)
    if store.exists() and store.version != STORE_VERSION:
        from rootless.store import migrate

        reporter.emit(
            Warn(
                f"rbuild: converting the store {store.root} to format {STORE_VERSION} (layers are unpacked again, once)"
            )
        )
        migrate.upgrade(store, Ownership.for_mapping(idmap.single))


def probed_rung(root: str | None) -> int:
    """The rung `rbuild doctor` reports for the store at root (`env.probe`, cached per environment): builds
    take it, so doctor and the build decide once, the same way. Called before the namespace: the probe's
    children are forked from here."""
    return probed(root)[0]


def probed(root: str | None) -> tuple[int, Probe]:
    """probed_rung's rung and the probe (`env.probe.Probe`) it was chosen from."""
    from rootless.env import paths, probe
    from rootless.store.store import Store

    path = paths.store_root(root)
    store = Store(path)
    try:
        layer_format = store.layer_format.name if store.exists() else None
    except RbuildError:  # the build's own error says why
        layer_format = None
    found = probe.probe(path)
    return probe.choose(found, layer_format).rung, found


def run_build(
    plan: Plan,
    store: Store,
    idmap: IdMap,
    opts: BuildOptions,
    reporter: Reporter,
    forced_driver: str | None,
    rung: int | None = None,
) -> str:
    """Build a planned Containerfile into an opened store (inside the namespace); the image id. The command
    line's `rbuild build` and build() below both end here; `rung`: probed_rung's, before the namespace."""
    from rootless.build import executor
    from rootless.env import strategy

    forced = forced_driver or os.environ.get("RBUILD_STORAGE_DRIVER") or None
    chosen = strategy.choose(idmap, store.root, forced, store.layer_format, store.last_rung(), rung)
    blocked = strategy.runs_possible(chosen)
    if blocked is not None:
        refuse_run(plan, blocked)
    store.record_strategy(chosen.to_json())
    image_id: str = executor.build(plan, store, opts, chosen, reporter)
    return image_id


def refuse_run(plan: Any, why: str) -> None:
    """Before the build starts: a RUN in a stage to be built cannot run here (no user namespace)."""
    from rootless.frontend import instructions

    for index in plan.order:
        for cmd in plan.stages[index].commands:
            if isinstance(cmd, instructions.RunCmd):
                raise RbuildError(
                    f"{cmd.filename}:{cmd.node.start_line}: RUN needs a user namespace, and none can be made "
                    f"here: {why} (FROM, COPY, ADD, ENV, LABEL and the like build without one)"
                )


def build(
    context: str = ".",
    *,
    file: str | None = None,
    tags: Sequence[str] = (),
    build_args: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    target: str | None = None,
    no_cache: bool = False,
    format: str = "oci",
    pull: str = "missing",
    timestamp: int | None = None,
    tls_verify: bool | None = None,
    root: str | None = None,
    on_event: EventCallback | None = None,
    jobs: int = 0,
) -> str:
    """Build the Containerfile in `context` (or `file`); the image id. Events of the build go to on_event.
    `jobs`: independent stages built at once (0: one per CPU, 1: one after the other)."""
    from rootless.build import planner
    from rootless.build.state import BuildOptions
    from rootless.kernel.fspath import inside
    from rootless.oci import names

    context = os.path.abspath(context)
    if not os.path.isdir(context):
        raise RbuildError(f"build context {context} is not a directory")
    if jobs < 0:
        raise RbuildError(f"jobs={jobs}: a number of stages, 0 (one per CPU) or more")
    for t in tags:
        if not names.valid(names.normalize(t)):
            raise RbuildError(f"invalid image name {t!r}")
    cf_path = planner.find_containerfile(context, file)
    data, shown = planner.read_containerfile(cf_path)
    shown = os.path.relpath(cf_path) if shown != "<stdin>" else shown
    args = dict(build_args or {})
    sde_text = args.get("SOURCE_DATE_EPOCH", os.environ.get("SOURCE_DATE_EPOCH"))
    if sde_text and not sde_text.isdigit():
        raise RbuildError(f"SOURCE_DATE_EPOCH must be a number of seconds, not {sde_text!r}")

    def run(store: Any, idmap: Any, reporter: Reporter) -> str:
        from rootless.registry.api import RegistryOptions

        plan = planner.plan(data, shown, context, args, target, reporter, private=not inside(cf_path, context))
        opts = BuildOptions(
            tags=list(tags),
            labels=dict(labels or {}),
            no_cache=no_cache,
            fmt=format,
            timestamp=timestamp,
            source_date_epoch=int(sde_text) if sde_text else None,
            pull=pull,
            registry_options=RegistryOptions(tls_verify=tls_verify),
            containerfile=cf_path,
            jobs=jobs,
        )
        return run_build(plan, store, idmap, opts, reporter, None, rung)

    rung = probed_rung(root)
    image_id: str = _in_namespace(root, on_event, run)
    return image_id


def pull(
    ref: str, *, tls_verify: bool | None = None, root: str | None = None, on_event: EventCallback | None = None
) -> str:
    """Copy an image (docker://, oci:DIR, oci-archive:, docker-archive:, or a registry name) into the store;
    its id."""
    from rootless.layer.ownership import Ownership
    from rootless.oci import transports

    def run(store: Any, idmap: Any, reporter: Reporter) -> str:
        from rootless.registry.api import RegistryOptions

        source = transports.parse_transport(ref)
        with source.open(store, RegistryOptions(tls_verify=tls_verify), reporter) as src:
            names = [] if source.local else [src.name]
            rec = transports.import_image(store, src, names, Ownership.for_mapping(idmap.single))
        image_id: str = rec.id
        return image_id

    result: str = _in_namespace(root, on_event, run)
    return result


def push(
    image: str,
    dest: str,
    *,
    format: str = "oci",
    tls_verify: bool | None = None,
    root: str | None = None,
    on_event: EventCallback | None = None,
) -> str:
    """Write an image of the store to dest (docker://HOST/REPO:TAG, oci:DIR, oci-archive:FILE,
    docker-archive:FILE); the manifest digest written."""
    from rootless.oci import transports

    def run(store: Any, idmap: Any, reporter: Reporter) -> str:
        from rootless.registry.api import RegistryOptions

        rec = _find(store, image)
        options = RegistryOptions(tls_verify=tls_verify)
        digest: str = transports.parse_transport(dest).export(store, rec, format, None, None, options, reporter)
        return digest

    result: str = _in_namespace(root, on_event, run)
    return result


def _readonly(root: str | None) -> Any:
    """The store for calls that read or change only the image index (no namespace needed)."""
    from rootless.env import paths
    from rootless.store.store import Store

    store = Store(paths.store_root(root))
    if store.exists():
        store.check_format()
    return store


def _find(store: Any, name: str) -> Any:
    from rootless.oci import names

    rec = store.find(names.candidates(name))
    if rec is None:
        raise RbuildError(f"{name}: image not known")
    return rec


def images(*, root: str | None = None) -> list[Image]:
    """The images in the store."""
    store = _readonly(root)
    if not store.exists():
        return []
    return [Image(r.id, list(r.names), r.created, r.digest or r.manifest) for r in store.images()]


def inspect(name: str, *, root: str | None = None) -> dict[str, Any]:
    """An image's OCI config (the JSON document), by name or id."""
    store = _readonly(root)
    config: dict[str, Any] = store.read_json(_find(store, name).id)
    return config


def tag(image: str, *new_names: str, root: str | None = None) -> None:
    """Add names to an image."""
    from rootless.oci import names

    store = _readonly(root)
    rec = _find(store, image)
    for n in new_names:
        if not names.valid(names.normalize(n)):
            raise RbuildError(f"invalid image name {n!r}")
        store.tag(rec.id, names.normalize(n), rec.manifest)


def rmi(*image_names: str, force: bool = False, root: str | None = None) -> list[str]:
    """Remove names, or whole images (an image's last name, or an id; `force`: every name); the ids of the
    images deleted. Layers no image needs any more are freed."""
    from rootless.env import userns
    from rootless.oci import names

    store = _readonly(root)
    if not store.exists():
        raise RbuildError(f"{image_names[0]}: image not known")
    idmap, _ = userns.host_mapping()
    store.check_mapping(idmap)  # freeing layers needs the mapping they were written under: refuse up front
    records = [_find(store, n) for n in image_names]  # every name known, or nothing is removed
    deleted = []
    for n, rec in zip(image_names, records, strict=True):
        full = next((c for c in names.candidates(n) if c in rec.names), None)
        if full is not None and len(rec.names) > 1 and not force:
            store.untag(rec.id, full)
        else:
            store.untag(rec.id, None)
            deleted.append(rec.id)
    if deleted:  # layer files belong to subordinate ids: only the user namespace can remove them
        _in_namespace(root, None, lambda opened, _idmap, _reporter: opened.collect_garbage())
    return deleted
