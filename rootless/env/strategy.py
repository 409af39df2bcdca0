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


def choose(idmap: IdMap) -> Strategy:
    """The strategy for a build under `idmap` (the mapping the user namespace was given)."""
    from rootless.env import userns
    from rootless.rootfs.overlay import OverlayDriver

    return Strategy(userns.isolation(idmap), OverlayDriver(), Ownership.for_mapping(idmap.single), FORMAT)


def runs_possible(chosen: Strategy) -> str | None:
    """None when RUN steps can run under `chosen`, else why not and the remedy (one clause)."""
    if chosen.isolation != "none":
        return None
    from rootless.env import userns

    return userns.userns_blocked() or "no user namespace can be created here"
