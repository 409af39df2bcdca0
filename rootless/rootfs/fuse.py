"""The FUSE rung: a step's tree is rbuild's own overlay filesystem in FUSE (csrc/, `rbuild-fuse-overlay`).

For where kernel overlayfs refuses the store (a store on overlayfs, NFS, an old kernel or a policy) but
/dev/fuse can be opened. The helper writes its upper directory exactly as kernel overlay does in
`userxattr` mode (0:0 character-device whiteouts, `user.overlay.opaque`), so the upper dir *is* the step's
layer in `FORMAT`, as with the overlay driver, and commit is shared. The helper runs inside the build's user
and mount namespace, in the foreground, and dies with the process that started it (PR_SET_PDEATHSIG): a
killed build leaves no mount and no process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from rootless.errors import RbuildError
from rootless.kernel import linux
from rootless.rootfs import fusehelper
from rootless.rootfs.driver import RootfsDriver, WritableRoot
from rootless.rootfs.overlay import _OverlayRoot, mounted

# The helper's lower layers are bits of a 64-bit mask (csrc/overlay.h), the upper being one of them.
MAX_LOWERS = 63
# Kernel-side caches the helper keeps coherent: see csrc/README.md. allow_other lets a RUN's non-root USER in
# (a mount made in rbuild's user namespace serves that namespace only).
MOUNT_OPTIONS = "allow_other"
_READY_TIMEOUT = 30.0


def _fault_of(helper: str | None) -> str | None:
    if helper is None:
        return "the rbuild-fuse-overlay helper was not built (reinstall rbuild with libfuse3-dev present)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"cannot open /dev/fuse: {e.strerror} (chmod 0666 /dev/fuse; containers: --device /dev/fuse)"
    return None


@contextlib.contextmanager
def serving(lowers: list[str], upper: str, work: str, target: str, readonly: bool = False) -> Iterator[str]:
    """rbuild-fuse-overlay over `lowers` (top first) with `upper` mounted at `target`; unmounted on exit.

    Errors name the target and the helper's own message (its stderr goes to a file beside `work`)."""
    helper = fusehelper.helper_path()
    fault = _fault_of(helper)
    if fault:
        raise RbuildError(f"cannot mount the FUSE overlay at {target}: {fault}")
    assert helper is not None
    if len(lowers) > MAX_LOWERS:
        raise RbuildError(f"the FUSE overlay stacks at most {MAX_LOWERS} layers; this image has {len(lowers)}")
    log_path = work + ".log"
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},{MOUNT_OPTIONS}"
    if readonly:
        opts += ",ro"
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                [helper, "--ready-fd", str(wfd), "-o", opts, target],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                pass_fds=(wfd,),
                close_fds=True,
            )
        finally:
            os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as ready:
            got = ready.read(1)
        if got != b"r":
            proc.wait()
            raise RbuildError(f"cannot mount the FUSE overlay at {target}: {_last_line(log_path)}")
        try:
            yield target
        finally:
            _unmount(proc, target, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _unmount(proc: subprocess.Popen[bytes], target: str, log_path: str) -> None:
    """Unmount (the helper then flushes and exits 0) and wait for the helper; a lazy unmount when busy."""
    try:
        linux.umount(target)
    except OSError:
        linux.umount(target, linux.MNT_DETACH)
    try:
        status = proc.wait(timeout=_READY_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RbuildError(f"the FUSE overlay at {target} did not end after its unmount") from None
    if status != 0:
        raise RbuildError(f"the FUSE overlay at {target} failed (exit status {status}): {_last_line(log_path)}")


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        lines = []
    return lines[-1] if lines else "no message from the helper"


class FuseDriver(RootfsDriver):
    """rbuild-fuse-overlay in the build's user namespace: its upper dir is the step's layer, no copy."""

    name = "fuse"

    def view(self, lowers: list[str], target: str) -> contextlib.AbstractContextManager[str]:
        if len(lowers) <= 1:  # nothing or a bind of one layer dir: no overlay needed
            return (
                contextlib.nullcontext(target) if not lowers else mounted(lowers, None, None, target, target + "-links")
            )
        return self._view(lowers, target)

    @contextlib.contextmanager
    def _view(self, lowers: list[str], target: str) -> Iterator[str]:
        scratch = target + "-fuse"
        upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
        os.makedirs(upper, 0o755)
        os.mkdir(work, 0o700)
        try:
            with serving(lowers, upper, work, target, readonly=True):
                yield target
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @contextlib.contextmanager
    def writable(self, lowers: list[str], workdir: str, target: str) -> Iterator[WritableRoot]:
        upper, work = os.path.join(workdir, "upper"), os.path.join(workdir, "work")
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
        root = _OverlayRoot(target, upper, lowers)
        if not lowers:  # FROM scratch: the upper is the whole tree
            with mounted([], upper, None, target, target + "-links"):
                yield root
            return
        with serving(lowers, upper, work, target):
            yield root


def fault(storage: str) -> str | None:
    """Why the FUSE overlay cannot serve a tree in a scratch directory of `storage` here, or None when a real
    mount works. Run inside the build's user and mount namespace, as the build will."""
    why = _fault_of(fusehelper.helper_path())
    if why:
        return why
    try:
        probe = tempfile.mkdtemp(prefix="probe-fuse-", dir=os.path.join(storage, "tmp"))
    except OSError as e:
        return f"cannot make a directory in {storage}: {e.strerror}"
    try:
        for d in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(probe, d), 0o700)
        try:
            with serving([f"{probe}/lower"], f"{probe}/upper", f"{probe}/work", f"{probe}/merged"):
                pass
        except RbuildError as e:
            return str(e)
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)
