"""`rbuild history`, `rbuild save` and `rbuild load`: docker's commands of those names."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rootless.errors import RbuildError


def add_parsers(sub: Any, common: Any) -> None:
    """The three subcommands, on the main parser's subparsers (`common`: the global flags)."""
    h = sub.add_parser("history", help="show an image's history: one line per build step, newest first")
    common(h)
    h.add_argument("image")
    h.add_argument("--no-trunc", action="store_true", help="show the whole CREATED BY and the full image id")
    h.add_argument("-H", "--human", action=argparse.BooleanOptionalAction, default=True, help="sizes and dates")
    h.add_argument("-q", "--quiet", action="store_true", help="only the image id of the newest step")
    h.add_argument("--format", choices=["table", "json"], default="table", help="json: one object a line")
    h.set_defaults(func=cmd_history)

    s = sub.add_parser("save", help="write images to a docker-archive (docker save's format) or oci-archive")
    common(s)
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("-o", "--output", metavar="FILE", help="the archive (default: standard output)")
    s.add_argument("--format", choices=["docker-archive", "oci-archive"], default="docker-archive")
    s.set_defaults(func=cmd_save)

    ld = sub.add_parser("load", help="read images from a docker-archive or oci-archive (gzip-compressed too)")
    common(ld)
    ld.add_argument("-i", "--input", metavar="FILE", help="the archive (default: standard input)")
    ld.add_argument("-q", "--quiet", action="store_true", help="print only the image ids")
    ld.set_defaults(func=cmd_load)


# ----------------------------------------------------------------------------------------------- history


def _since(created: str, now: float) -> str:
    """docker's "3 hours ago" for an RFC 3339 time."""
    import datetime

    try:
        when = datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "N/A"
    secs = max(0, now - when)
    for unit, length in (("year", 31536000), ("month", 2592000), ("week", 604800), ("day", 86400), ("hour", 3600)):
        if secs >= 2 * length:
            return f"{int(secs // length)} {unit}s ago"
        if secs >= length:
            return f"{'an' if unit == 'hour' else 'a'} {unit} ago"
    if secs >= 120:
        return f"{int(secs // 60)} minutes ago"
    return "About a minute ago" if secs >= 60 else "Less than a second ago" if secs < 1 else f"{int(secs)} seconds ago"


def _size(n: int) -> str:
    """docker's sizes: three significant digits, decimal units, no space (12.3MB)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.3g}{unit}"
        value /= 1000
    return f"{n}B"


def _ellipsis(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_history(args: argparse.Namespace) -> int:
    from rootless.cli import main
    from rootless.store.store import chain_ids

    store = main._open_readonly(args)
    if not store.exists():
        raise RbuildError(f"{args.image}: image not known")
    rec = main._find(store, args.image)
    config = store.read_json(rec.id)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    sizes = [store.layer_meta(c).get("size", 0) for c in chain_ids(diff_ids)]
    history = config.get("history") or [{"created": config.get("created", "")} for _ in diff_ids]
    rows = []
    layer = 0
    for h in history:
        size = 0
        if not h.get("empty_layer") and layer < len(sizes):
            size = sizes[layer]
            layer += 1
        rows.append((h.get("created", ""), h.get("created_by", ""), size, h.get("comment", "")))
    rows.reverse()
    ids = [rec.id] + ["<missing>"] * (len(rows) - 1)
    shown_ids = [i if args.no_trunc or i == "<missing>" else i[7:19] for i in ids]
    if args.quiet:
        print(shown_ids[0] if rows else (rec.id if args.no_trunc else rec.id[7:19]))
        return 0
    now = time.time()
    if args.format == "json":
        for image_id, (created, by, size, comment) in zip(shown_ids, rows, strict=True):
            doc = {
                "ID": image_id,
                "CreatedAt": created,
                "CreatedSince": _since(created, now),
                "CreatedBy": by,
                "Size": _size(size) if args.human else str(size),
                "Comment": comment,
            }
            print(json.dumps(doc))
        return 0
    table = [("IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT")]
    for image_id, (created, by, size, comment) in zip(shown_ids, rows, strict=True):
        when = _since(created, now) if args.human else created
        table.append(
            (
                image_id,
                when,
                by if args.no_trunc else _ellipsis(by, 45),
                _size(size) if args.human else str(size),
                comment,
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print(("   ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "   " + r[4]).rstrip())
    return 0


# ------------------------------------------------------------------------------------------------- save


def cmd_save(args: argparse.Namespace) -> int:
    """docker save: a name writes that name, an id writes the image without names."""
    from rootless.cli import main
    from rootless.oci import names

    if args.output is None and sys.stdout.isatty():
        raise RbuildError("save: refusing to write an archive to a terminal (use -o FILE or redirect)")

    def run(store: Any, idmap: Any) -> int:
        from rootless.oci import archive

        chosen: dict[str, tuple[Any, list[str]]] = {}
        for arg in args.images:
            rec = main._find(store, arg)
            given = next((c for c in names.candidates(arg) if c in rec.names), None)
            entry = chosen.setdefault(rec.id, (rec, []))
            if given and given not in entry[1]:
                entry[1].append(given)
        images = list(chosen.values())
        if args.output is None:
            archive.write(store, images, args.format, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return 0
        from rootless.cli.output import _to_file

        _to_file(os.path.abspath(args.output), lambda f: archive.write(store, images, args.format, f))
        return 0

    return main._in_namespace(args, run)


# ------------------------------------------------------------------------------------------------- load


def _archive_name(name: str) -> str:
    """A name as an archive gives it, read with docker's rules (`busybox` is docker.io/library/busybox:latest)."""
    from rootless.oci.reference import parse_reference

    try:
        return str(parse_reference(name))
    except RbuildError as e:
        raise RbuildError(f"the archive names an image {name!r}: {e}") from None


def cmd_load(args: argparse.Namespace) -> int:
    from rootless.cli import main
    from rootless.layer.ownership import Ownership

    if args.input is None and sys.stdin.isatty():
        raise RbuildError("load: standard input is a terminal: give the archive with -i FILE or redirect it")

    def run(store: Any, idmap: Any) -> int:
        import shutil

        from rootless.oci import archive, transports

        with store.staging("stdin-") as tmp:
            path = args.input and os.path.abspath(args.input)
            shown = args.input or "standard input"
            if path is None:
                path = os.path.join(tmp, "archive")
                with open(path, "wb") as f:
                    shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
            with archive.read(path, store, shown) as found:
                for item in found:
                    wanted = [_archive_name(n) for n in item.names]
                    rec = transports.import_image(store, item.source, wanted, Ownership.for_mapping(idmap.single))
                    if args.quiet:
                        print(rec.id)
                        continue
                    for n in wanted:
                        print(f"Loaded image: {n}")
                    if not wanted:
                        print(f"Loaded image ID: {rec.id}")
        return 0

    return main._in_namespace(args, run)
