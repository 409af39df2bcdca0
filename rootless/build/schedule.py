"""Which stage runs when: a stage starts once the stages it uses are built, up to `--jobs` at a time.

The stages of a plan form a graph (FROM <stage>, COPY --from, RUN --mount=from: `planner.Stage.deps`).
With one job, or a graph that is a chain, the stages run one after the other in the main thread, as
they always did. Otherwise each stage runs in a worker thread; the main thread only starts stages and
collects results, so it is the one that takes Ctrl-C and SIGTERM. No Python runs in a fork of this
threaded process: RUN's sandbox and the FUSE helper are new programs (subprocess: fork and exec in C).

The first stage to fail cancels the others: a worker checks before each step, a running RUN is ended
through the cancel pipe (`sandbox.spec.RunSpec.cancel_fd`), and every worker unwinds its own mounts and
staging directories before the build reports that one failure.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from rootless.build.planner import Plan
from rootless.errors import Cancelled


def default_jobs() -> int:
    """BuildKit's default: as many stages at a time as this process may use CPUs."""
    return max(1, len(os.sched_getaffinity(0)))


def can_overlap(plan: Plan) -> bool:
    """Whether two of the stages to build depend on each other neither directly nor through others."""
    before: dict[int, set[int]] = {}
    for idx in plan.order:  # dependencies have smaller indexes: the closure is built in one pass
        up: set[int] = set()
        for d in plan.stages[idx].deps:
            up |= {d} | before.get(d, set())
        before[idx] = up
    order = plan.order
    return any(a not in before[b] for i, b in enumerate(order) for a in order[:i])


class Cancel:
    """The build's cancellation: an event the workers check between steps, and a pipe a RUN's wait watches."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)

    def set(self) -> None:
        if not self.event.is_set():
            self.event.set()
            os.write(self._write_fd, b"x")  # never read: it stays readable for every waiting RUN

    def check(self) -> None:
        """Raise Cancelled once the build is cancelled (a worker, between steps)."""
        if self.event.is_set():
            raise Cancelled()

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self._write_fd)


def run_parallel(plan: Plan, jobs: int, work: Callable[[int], None], cancel: Cancel) -> None:
    """work(stage index) for every stage of plan.order, each once its dependencies are done (work keeps
    the result where they find it), at most `jobs` at a time, ready stages in build order. The first
    failure cancels the rest, waits for them to unwind, and is raised; so is an interrupt of the main thread."""
    pending = list(plan.order)
    done: set[int] = set()
    running: dict[Future[None], int] = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="rbuild-stage") as pool:
        try:
            while pending or running:
                if failure is None:
                    for idx in list(pending):
                        if len(running) >= jobs:
                            break
                        if plan.stages[idx].deps <= done:
                            pending.remove(idx)
                            running[pool.submit(work, idx)] = idx
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: running[f]):
                    idx = running.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        done.add(idx)
                    elif failure is None and not isinstance(exc, Cancelled):
                        failure = exc
                        cancel.set()
        except BaseException:
            cancel.set()  # Ctrl-C, SIGTERM: every stage ends its RUN and unwinds before this returns
            wait(running)
            raise
    if failure is not None:
        raise failure
