"""The build strategy: chosen once, from the id mapping and what this machine allows, and handed to the build.

A strategy is one answer on each axis -- isolation (which user namespace, if any), the rootfs driver,
the ownership policy and the on-disk layer format -- so the build code asks `strategy.rootfs` or
`strategy.ownership` instead of testing a bool in five modules. The store records the strategy that last
wrote it (`store.json`'s `strategy`); layers are shared between strategies with the same layer format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from rootless.errors import RbuildError
from rootless.idmap import IdMap
from rootless.layer.format import FORMAT, LayerFormat
from rootless.layer.ownership import Ownership
from rootless.rootfs.driver import RootfsDriver


@dataclass(frozen=True)
class Strategy:
    # "userns" (a subuid map), "userns-single" (one uid), "host-root" (real root, no userns); without a
    # user namespace: "none-privileged" (root of a container: real chown, no mounts), "none" (no RUN)
    isolation: str
    rootfs: RootfsDriver
    ownership: Ownership
    layer_format: LayerFormat

    def to_json(self) -> dict[str, str]:
        return {
            "isolation": self.isolation,
            "rootfs": self.rootfs.name,
            "ownership": self.ownership.value,
            "layer_format": self.layer_format.name,
        }


def _overlay() -> RootfsDriver:
    from rootless.rootfs.overlay import OverlayDriver

    return OverlayDriver()


def _fuse() -> RootfsDriver:
    from rootless.rootfs.fuse import FuseDriver

    return FuseDriver()


def _copy() -> RootfsDriver:
    from rootless.rootfs.copy import CopyDriver

    return CopyDriver()


# The rootfs drivers, best first: name -> factory. A forced driver is refused with the reason `usable` gives;
# the automatic choice takes the first usable one.
DRIVERS: dict[str, Callable[[], RootfsDriver]] = {"overlay": _overlay, "fuse": _fuse, "copy": _copy}
DRIVER_ALIASES = {"vfs": "copy"}


def driver_name(name: str) -> str:
    """The driver a user's `--storage-driver` / RBUILD_STORAGE_DRIVER names (an alias resolved)."""
    name = DRIVER_ALIASES.get(name, name)
    if name not in DRIVERS:
        raise RbuildError(f"unknown storage driver {name!r}: choose one of {', '.join([*DRIVERS, *DRIVER_ALIASES])}")
    return name


def usable(name: str, storage: str, layer_format: LayerFormat = FORMAT, made_by: str | None = None) -> str | None:
    """Why the driver `name` cannot work on the store directory `storage` (whose layers are in
    `layer_format`, last written by the rung `made_by`) here, or None when it can."""
    if name == "overlay":
        fault = overlay_fault(storage)
        if fault:
            return fault
    if layer_format.name not in DRIVERS[name]().formats:
        by = f", last written by the {made_by} rung" if made_by else ""
        return (
            f"the store {storage} holds layers in the {layer_format.name} format (made on a filesystem that "
            f"refuses kernel overlay's whiteouts{by}), which the {name} driver cannot build on: use "
            "--storage-driver copy with this store, or give the build a new store with --root"
        )
    if name == "fuse":
        from rootless.rootfs import fuse

        return fuse.fault(storage)
    return None


def overlay_fault(storage: str) -> str | None:
    """Why a kernel overlay mount (with an upper dir, `userxattr`, as the build makes them) fails in a
    scratch directory of `storage`, or None when it works. Run inside the build's mount namespace."""
    from rootless.kernel import linux

    try:
        probe = tempfile.mkdtemp(prefix="probe-overlay-", dir=os.path.join(storage, "tmp"))
    except OSError as e:
        return f"cannot make a directory in {storage}: {e.strerror}"
    try:
        for d in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(probe, d), 0o700)
        opts = f"lowerdir={probe}/lower,upperdir={probe}/upper,workdir={probe}/work,userxattr"
        try:
            linux.mount("overlay", os.path.join(probe, "merged"), "overlay", 0, opts)
        except OSError as e:
            fs = _fs_type(storage)
            where = f"{storage} (filesystem type {fs})" if fs else storage
            return (
                f"kernel overlayfs cannot mount on {where}: {os.strerror(e.errno or 0)} "
                "(give the store a local filesystem with --root, or use --storage-driver copy)"
            )
        linux.umount(os.path.join(probe, "merged"), linux.MNT_DETACH)
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _fs_type(path: str) -> str | None:
    """The type of the filesystem `path` is on (the last mount in /proc/self/mounts that holds it)."""
    best, fstype = "", None
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2:
                    mnt = fields[1].replace("\\040", " ")
                    if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, fstype = mnt, fields[2]
    except OSError:
        return None
    return fstype


# the rootfs driver of each rung of `env.probe` (`RUNGS`): rungs 4 and 5 have no mounts
RUNG_DRIVERS = {1: "overlay", 2: "fuse", 3: "copy", 4: "copy", 5: "copy"}


def choose(
    idmap: IdMap,
    storage: str | None = None,
    driver: str | None = None,
    layer_format: LayerFormat = FORMAT,
    made_by: str | None = None,
    rung: int | None = None,
) -> Strategy:
    """The strategy for a build under `idmap` (the mapping the user namespace was given), on the store
    directory `storage` whose layers are in `layer_format` (`made_by`: the rung that last wrote it).
    `driver`: the user's choice (an error when it cannot work, never a fallback); None: the driver of
    `rung`, the rung `env.probe.choose` found (what `rbuild doctor` reports), or without one the first
    that works here (a real overlay mount on the store, its layers overlay's; else a real FUSE mount; else copy)."""
    from rootless.env import userns

    isolation = userns.isolation(idmap)
    # FUSE is mounted in rbuild's own user namespace; outside one libfuse would fall back to the setuid
    # fusermount3 and mount on the host, which no rung wants
    no_fuse = "the fuse storage driver needs a user namespace of rbuild's own" if isolation.startswith("none") else None
    if driver is not None:
        name = driver_name(driver)
        fault = (no_fuse if name == "fuse" else None) or (
            usable(name, storage, layer_format, made_by) if storage is not None else None
        )
        if fault:
            raise RbuildError(f"storage driver {name} cannot be used: {fault}")
    elif isolation in ("none", "none-privileged"):  # no mount namespace: nothing can be mounted
        name = "copy"
    elif rung is not None and layer_format.name in DRIVERS[RUNG_DRIVERS[rung]]().formats:
        name = RUNG_DRIVERS[rung]  # (a probe made before the store existed may not have known its format)
    elif storage is None:
        name = "overlay"
    else:
        name = next(n for n in DRIVERS if not (n == "fuse" and no_fuse) and usable(n, storage, layer_format) is None)
    rootfs = DRIVERS[name]()
    rootfs.layer_format = layer_format
    return Strategy(isolation, rootfs, Ownership.for_mapping(idmap.single), layer_format)


def settled(idmap: IdMap, driver: str | None, layer_format: LayerFormat, rung: int | None) -> bool:
    """Whether `choose` decides for these without trying a mount (which needs the build's namespace): a
    forced copy driver, no mount namespace, or the probed rung's driver building on the store's format."""
    if driver is not None:
        return driver_name(driver) == "copy"
    from rootless.env import userns

    if userns.isolation(idmap) in ("none", "none-privileged"):
        return True
    return rung is not None and layer_format.name in DRIVERS[RUNG_DRIVERS[rung]]().formats


def runs_possible(chosen: Strategy) -> str | None:
    """None when RUN steps can run under `chosen`, else why not and the remedy (one clause)."""
    if chosen.isolation != "none":
        return None
    from rootless.env import userns

    return userns.userns_blocked() or "no user namespace can be created here"
