"""`rbuild build --output` (BuildKit's exporters) and `--metadata-file`.

  type=local,dest=DIR            the final stage's root filesystem as files (a bare DIR means the same)
  type=tar,dest=FILE|-           the root filesystem as one tar (`-`, alone or as dest: standard output)
  type=oci,dest=FILE[,name=N]    the image as an OCI layout in a tar (N: the name annotated in it)
  type=docker,dest=FILE[,name=N] the image as `docker load` takes it
The image is always committed to the store too (its layers are the build cache); with -t it also gets
those names, without it stays unnamed and `rbuild prune` removes it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from rootless.errors import RbuildError

TYPES = ("local", "tar", "oci", "docker")


@dataclass
class Output:
    type: str
    dest: str  # an absolute path, or "-" for standard output
    name: str = ""


def parse(spec: str) -> Output:
    """One --output value, BuildKit's CSV of key=value (or a bare path: type=local; `-`: a tar to stdout)."""
    if spec == "-":
        return Output("tar", "-")
    if "=" not in spec:
        return Output("local", os.path.abspath(spec))
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RbuildError(f"--output {spec!r}: {part!r} is not KEY=VALUE")
        if key not in ("type", "dest", "name"):
            raise RbuildError(f"--output {spec!r}: unknown key {key!r} (type, dest and name are known)")
        fields[key] = value
    kind = fields.get("type", "local")
    if kind not in TYPES:
        raise RbuildError(f"--output {spec!r}: unknown type {kind!r} (choose one of {', '.join(TYPES)})")
    dest = fields.get("dest", "")
    if not dest:
        raise RbuildError(f"--output {spec!r}: dest= is missing")
    if dest == "-" and kind == "local":
        raise RbuildError(f"--output {spec!r}: type=local needs a directory, not standard output")
    if "name" in fields and kind not in ("oci", "docker"):
        raise RbuildError(f"--output {spec!r}: name= is for type=oci and type=docker")
    return Output(kind, dest if dest == "-" else os.path.abspath(dest), fields.get("name", ""))


def parse_all(specs: list[str]) -> list[Output]:
    outs = [parse(s) for s in specs]
    if sum(o.dest == "-" for o in outs) > 1:
        raise RbuildError("--output: only one output can go to standard output")
    if any(o.dest == "-" for o in outs) and sys.stdout.isatty():
        raise RbuildError("--output: refusing to write a tar to a terminal (redirect standard output)")
    return outs


def write(
    store: Any, image_id: str, outputs: list[Output], ownership: Any, tags: list[str], reporter: Any
) -> dict[str, str]:
    """Carry out the outputs inside the user namespace; returns manifest digests written, by type.
    What went differently from the image is a warning (-q shows it too), the rest a notice."""
    if not outputs:
        return {}
    from rootless.build import export
    from rootless.oci import archive, names

    rec = store.find([image_id])
    diff_ids = store.read_json(image_id).get("rootfs", {}).get("diff_ids", [])
    digests: dict[str, str] = {}
    for o in outputs:
        if o.type == "local":
            result = export.rootfs_dir(store, diff_ids, o.dest, ownership)
            _notes(o.dest, result, ownership, reporter)
        elif o.type == "tar":
            if o.dest == "-":
                export.rootfs_tar(store, diff_ids, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            else:
                _to_file(o.dest, lambda f: export.rootfs_tar(store, diff_ids, f))
        else:
            chosen = [names.normalize(o.name)] if o.name else [names.normalize(t) for t in tags]
            fmt = "oci-archive" if o.type == "oci" else "docker-archive"
            written: list[Any] = []

            def put(f: Any, fmt: str = fmt, chosen: list[str] = chosen, written: list[Any] = written) -> None:
                written.extend(archive.write(store, [(rec, chosen)], fmt, f))

            if o.dest == "-":
                put(sys.stdout.buffer)
                sys.stdout.buffer.flush()
            else:
                _to_file(o.dest, put)
            digests[o.type] = written[0].digest
    return digests


def _notes(dest: str, result: Any, ownership: Any, reporter: Any) -> None:
    from rootless.events import Notice, Warn
    from rootless.layer.ownership import Ownership

    if ownership is Ownership.RECORDED:
        reporter.emit(
            Warn(
                f"rbuild: {dest}: every file belongs to you (this user has no subordinate id range, so the "
                f"image's owners cannot be written; {result.owners_lost} files are not root's in the image). "
                "type=tar keeps every owner"
            )
        )
    elif result.owners_lost:
        reporter.emit(
            Warn(
                f"rbuild: {dest}: {result.owners_lost} files belong to you instead of ids outside your "
                "subordinate range (type=tar keeps them)"
            )
        )
    else:
        reporter.emit(
            Notice(
                f"rbuild: {dest}: files have the image's owners, as your subordinate ids; read or remove the "
                f"tree as they do: rbuild unshare ... (e.g. rbuild unshare rm -rf {dest})"
            )
        )
    if result.devices:
        reporter.emit(Warn(f"rbuild: {dest}: {result.devices} device nodes written as empty files"))


def _to_file(path: str, fill: Any) -> None:
    """Write a file through a temporary name in its directory, renamed into place when complete."""
    import tempfile

    d = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".rbuild-output-")
    except OSError as e:
        raise RbuildError(f"--output: cannot write in {d}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def metadata(path: str, store: Any, image_id: str, tags: list[str], digest: str | None) -> None:
    """BuildKit's metadata file: containerimage.config.digest, containerimage.digest (the manifest pushed
    or exported, else the stored one), containerimage.descriptor, image.name (the -t names, comma-joined)."""
    from rootless.kernel.fsutil import atomic_write
    from rootless.oci import names

    rec = store.find([image_id])
    manifest = rec.manifest
    doc: dict[str, Any] = {
        "containerimage.config.digest": image_id,
        "containerimage.digest": digest or manifest,
    }
    if not digest or digest == manifest:
        data = store.read_blob(manifest)
        media_type = json.loads(data).get("mediaType", "")
        doc["containerimage.descriptor"] = {"mediaType": media_type, "digest": manifest, "size": len(data)}
    if tags:
        doc["image.name"] = ",".join(names.normalize(t) for t in tags)
    try:
        atomic_write(os.path.abspath(path), json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
    except OSError as e:
        raise RbuildError(f"--metadata-file {path}: cannot write: {e.strerror}") from None
