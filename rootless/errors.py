"""Errors rbuild reports to its user: one line, an exit status, never a traceback."""

from __future__ import annotations


class RbuildError(Exception):
    """An error shown to the user as one `Error:` line; exit status 125 unless said otherwise."""

    exit_code = 125

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as class, message and attributes (subclasses take other arguments): the Python API
        (rootless/api.py) sends an error from the build's child process to the caller."""
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[RbuildError], args: tuple[object, ...], state: dict[str, object]) -> RbuildError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ContainerfileError(RbuildError):
    """A fault in a Containerfile, located at FILE:LINE."""

    def __init__(self, message: str, filename: str = "Containerfile", line: int = 0) -> None:
        self.filename = filename
        self.line = line
        self.detail = message
        where = f"{filename}:{line}: " if line else f"{filename}: "
        super().__init__(where + message)


class RunFailed(RbuildError):
    """A RUN step exited non-zero; rbuild exits with that status, as buildah does (127 included)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, exit_code=min(max(status, 1), 255))
        self.status = status


class Cancelled(Exception):
    """A stage stopped because another one failed (or the build was interrupted). Never shown: the
    scheduler (build/schedule.py) reports the failure that caused it; not an RbuildError, so no step
    handler turns it into a located error of its own."""
