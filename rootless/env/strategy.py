"""The build strategy: chosen once, from the id mapping and what this machine allows, and handed to the build.

A strategy is one answer on each axis -- isolation (which user namespace, if any), the rootfs driver,
the ownership policy and the on-disk layer format -- so the build code asks `strategy.rootfs` or
`strategy.ownership` instead of testing a bool in five modules. The store records the strategy that last
wrote it (`store.json`'s `strategy`); layers are shared between strategies with the same layer format.
"""

from __future__ import annotations

from dataclasses import dataclass

from rootless.idmap import IdMap
from rootless.layer.format import FORMAT, LayerFormat
from rootless.layer.ownership import Ownership
from rootless.rootfs.driver import RootfsDriver


@dataclass(frozen=True)
class Strategy:
    isolation: str  # "userns" (a subuid map), "userns-single" (one uid), "host-root" (real root, no userns)
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


def choose(idmap: IdMap) -> Strategy:
    """The strategy for a build under `idmap` (the mapping the user namespace was given)."""
    from rootless.rootfs.overlay import OverlayDriver

    if idmap.real_root:
        isolation = "host-root"
    else:
        isolation = "userns-single" if idmap.single else "userns"
    return Strategy(isolation, OverlayDriver(), Ownership.for_mapping(idmap.single), FORMAT)
