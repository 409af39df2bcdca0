"""How layer directories carry the owners of their files: chosen once per build from the id mapping.

With a subuid range the namespace maps the ids images use, so files are chown'd for real (ids outside
the range are recorded instead). With one mapped uid every file is 0:0 on disk and each other owner is
recorded in rbuild's `user.rbuild.*` xattrs, which the tar writer turns back into the tar entry's owner
(`rootless.layer.layers`). A RUN under a single uid that must keep owners adds a third policy.
"""

from __future__ import annotations

import enum


class Ownership(enum.Enum):
    MAPPED = "mapped"
    RECORDED = "recorded"

    @staticmethod
    def for_mapping(single_uid: bool) -> Ownership:
        return Ownership.RECORDED if single_uid else Ownership.MAPPED
