"""The step loop: runs a plan's stages, each instruction through its handler (`build.step.Step`).

Every step has a cache key derived from its parent's key, the expanded instruction, the build args
and environment it sees, and for COPY/ADD the content, names and modes of its sources (never mtimes).
A step's result (image config + layer list) is stored under that key, so a rebuild with nothing
changed reuses every step, and reproduces the same image id.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from rootless.blob.digest import sha256_of
from rootless.build import copyfiles, meta_steps
from rootless.build.cache import CACHE_VERSION, LocalStepCache, RegistryStepCache, StepCache, StepResult
from rootless.build.copy_step import CopyStep
from rootless.build.planner import PROXY_ARGS, Plan, Stage
from rootless.build.run_step import RunStep
from rootless.build.state import BuildOptions, ContainerConfig, ImageConfig, StageState, env_dict, key_of
from rootless.build.step import Step
from rootless.env.strategy import Strategy
from rootless.errors import ContainerfileError, RbuildError, RunFailed
from rootless.events import BuildDone, CacheHit, Event, Notice, Output, Reporter, StepDone, StepStarted, Warn
from rootless.frontend import instructions as ins
from rootless.frontend.containerfile import Node
from rootless.kernel.fspath import clean_abs, secure_join
from rootless.layer.ownership import Ownership
from rootless.oci import image as img
from rootless.sandbox import spec as sandbox
from rootless.store.store import ImageRecord, Store, chain_ids, now_rfc3339

DEFAULT_SHELL = ["/bin/sh", "-c"]


class _StepContext(threading.local):
    """What the step running in this thread works on (parallel stages run in threads of their own)."""

    def __init__(self) -> None:
        self.stage = 0  # the stage's number in build order (from 1), stamped on its events
        self.index = -1  # the stage's index in the Containerfile
        self.check: Callable[[], None] = _go_on  # raises Cancelled once another stage failed
        self.touched: list[str] = []  # the current step's directories where mount points were made
        self.emulated_owner: tuple[int, int] | None = None  # a single-uid RUN's USER (run_step)
        self.step_upper = ""
        self.step_lowers: list[str] = []
        self.current_shell = DEFAULT_SHELL


def _go_on() -> None:
    """The cancellation check of stages built one by one: there is nothing to cancel them."""


class _StageReporter:
    """The build's reporter, seen from a stage: its events say which stage they come from; when stages
    run at once, RUN output comes as events too (the reporter attributes it) instead of through a descriptor."""

    def __init__(self, inner: Reporter, ctx: _StepContext) -> None:
        self.inner = inner
        self.ctx = ctx
        self.parallel = False

    @property
    def output_fd(self) -> int | None:
        return None if self.parallel else self.inner.output_fd

    def emit(self, event: Event) -> None:
        if isinstance(event, CacheHit | Output | StepDone | Warn | Notice) and event.stage is None and self.ctx.stage:
            event = dataclasses.replace(event, stage=self.ctx.stage)
        self.inner.emit(event)


class Executor:
    def __init__(
        self, plan: Plan, store: Store, opts: BuildOptions, strategy: Strategy, reporter: Reporter, cache: StepCache
    ) -> None:
        self.plan = plan
        self.store = store
        self.opts = opts
        self.strategy = strategy
        self.ctx = _StepContext()
        self.reporter = _StageReporter(reporter, self.ctx)
        self.cache = cache
        self.driver = strategy.rootfs
        self.recorded = strategy.ownership is Ownership.RECORDED  # one uid: owners live in records
        self.cancel_fd = -1  # readable once another stage failed (schedule.Cancel), -1: stages run one by one
        self.step_keys: list[tuple[int, str]] = []  # (stage index, key) of every step, cached or made
        self.steps: dict[type[ins.Command], Step[Any]] = {
            ins.RunCmd: RunStep(self),
            ins.CopyCmd: (copy_step := CopyStep(self)),
            ins.AddCmd: copy_step,
            **meta_steps.handlers(self),
        }
        self.results: dict[int, StageState] = {}
        self.built = threading.Condition()  # notified when a stage's result is in `results`
        self.used_args: set[str] = set()
        self.ignore_rules = copyfiles.load_ignore(plan.context, opts.containerfile)
        ctx_tag = hashlib.sha256(os.path.realpath(plan.context).encode()).hexdigest()[:32]
        self.file_digests = copyfiles.FileDigests(os.path.join(store.root, "cache", f"files-{ctx_tag}.json"))
        from rootless.frontend.shell import Lexer

        self.lexer = Lexer(plan.escape)
        self.build_stack = contextlib.ExitStack()
        self.epoch = opts.timestamp if opts.timestamp is not None else opts.source_date_epoch
        self.clamp = opts.source_date_epoch if (opts.timestamp is None and opts.rewrite_timestamp) else None

    # -- the running step's own state (one per thread) --------------------------------------------------
    @property
    def touched(self) -> list[str]:
        return self.ctx.touched

    @property
    def emulated_owner(self) -> tuple[int, int] | None:
        return self.ctx.emulated_owner

    @emulated_owner.setter
    def emulated_owner(self, owner: tuple[int, int] | None) -> None:
        self.ctx.emulated_owner = owner

    @property
    def step_upper(self) -> str:
        return self.ctx.step_upper

    @property
    def step_lowers(self) -> list[str]:
        return self.ctx.step_lowers

    @property
    def current_shell(self) -> list[str]:
        return self.ctx.current_shell

    # -- output ------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.reporter.emit(Notice(msg))

    def warn(self, msg: str) -> None:
        """A line shown even with -q: the image may differ from what the user expects."""
        self.reporter.emit(Warn(msg))

    def started(self, stage: Stage, index: int, steps: int, node: Node) -> None:
        order = self.plan.order
        where = order.index(stage.index) + 1
        text = node.original.strip()
        self.reporter.emit(
            StepStarted(
                where, len(order), index, steps, text, self.plan.filename, node.start_line, self.reporter.parallel
            )
        )

    def err(self, node: Node, msg: str) -> ContainerfileError:
        return ContainerfileError(msg, self.plan.filename, node.start_line)

    def created(self) -> str:
        return now_rfc3339(self.epoch) if self.epoch is not None else now_rfc3339()

    # -- the build -----------------------------------------------------------------------------------
    def run(self) -> str:
        with contextlib.ExitStack() as self.build_stack:
            if self.driver.keeps_trees:
                home = self.build_stack.enter_context(self.store.staging("trees-"))
                self.build_stack.enter_context(self.driver.session(home))
            return self._run()

    def _run(self) -> str:
        from rootless.build import schedule

        jobs = self.opts.jobs or schedule.default_jobs()
        if jobs > 1 and schedule.can_overlap(self.plan):
            cancel = schedule.Cancel()
            self.cancel_fd = cancel.read_fd
            self.reporter.parallel = True
            try:

                def work(idx: int) -> None:
                    state = self.run_stage(self.plan.stages[idx], cancel.check)
                    with self.built:
                        self.results[idx] = state
                        self.built.notify_all()

                schedule.run_parallel(self.plan, jobs, work, cancel)
            finally:
                self.cancel_fd = -1
                cancel.close()
        else:
            for idx in self.plan.order:
                self.results[idx] = self.run_stage(self.plan.stages[idx])
            self.ctx.stage = 0  # what follows is the build's, not the last stage's
        final = self.results[self.plan.target]
        unused = sorted(
            set(self.plan.build_args)
            - self.used_args
            - set(self.plan.meta_args)
            - set(PROXY_ARGS)
            - {"SOURCE_DATE_EPOCH"}
        )
        if unused:
            self.warn(f"[Warning] one or more build-args {unused} were not consumed")
        return self.commit_image(final)

    def commit_image(self, state: StageState) -> str:
        from rootless.oci import names

        config = copy.deepcopy(state.config)
        if self.opts.labels:
            labels = dict(config["config"].get("Labels") or {})
            labels.update(self.opts.labels)
            config["config"]["Labels"] = labels
        kept = {k: v for k, v in config["config"].items() if v not in (None, [], {}) or k == "Env"}
        config["config"] = cast(ContainerConfig, kept)
        config_bytes = img.canonical(dict(config))
        descs = []
        for i, (d, c) in enumerate(zip(state.layers, chain_ids(state.layers), strict=True)):
            if i < len(state.base_blobs) and state.base_blobs[i][0] == d:
                descs.append(state.base_blobs[i][1])
            else:  # a layer made here: compressed when pushed
                descs.append({"mediaType": img.OCI_LAYER, "digest": d, "size": self.store.layer_meta(c).get("size", 0)})
        manifest = img.manifest(self.opts.fmt, sha256_of(config_bytes), len(config_bytes), descs)
        tags = [names.normalize(t) for t in self.opts.tags]
        rec = self.store.add_image(config_bytes, img.canonical(manifest), tags, config.get("created", ""))
        for t in tags:
            self.log(f"Successfully tagged {t}")
        return rec.id

    def run_stage(self, stage: Stage, check: Callable[[], None] = _go_on) -> StageState:
        """The stage's steps in order; `check` raises `Cancelled` before each once the build is cancelled."""
        self.ctx.stage = self.plan.order.index(stage.index) + 1
        self.ctx.index, self.ctx.check = stage.index, check
        n = len(stage.commands) + 1
        check()
        self.started(stage, 1, n, stage.from_cmd.node)
        state = self.base_state(stage)
        triggers = state.config["config"].pop("OnBuild", None) or []
        for trig in triggers:
            check()
            state = self.run_trigger(stage, state, trig)
        for i, cmd in enumerate(stage.commands, start=2):
            check()
            self.started(stage, i, n, cmd.node)
            state = self.step(stage, state, cmd)
        return state

    def run_trigger(self, stage: Stage, state: StageState, trigger: str) -> StageState:
        from rootless.frontend import containerfile, instructions

        self.log(f"--> ONBUILD {trigger}")
        cf = containerfile.parse(trigger, self.plan.filename)
        for node in cf.nodes:
            node.start_line = node.end_line = stage.from_cmd.node.start_line
            state = self.step(stage, state, instructions.parse_instruction(node, self.plan.filename))
        return state

    # -- FROM ----------------------------------------------------------------------------------------
    def base_state(self, stage: Stage) -> StageState:
        fc = stage.from_cmd
        if stage.base_stage is not None:
            prev = self.results.get(stage.base_stage)
            if prev is None:
                raise self.err(fc.node, f"stage {stage.base!r} is used before it was built")
            return StageState(
                copy.deepcopy(prev.config), list(prev.layers), key_of("stage", prev.key), {}, base_blobs=prev.base_blobs
            )
        if stage.base.lower() == "scratch":
            config = cast(ImageConfig, img.new_config(self.created()))
            config["config"]["Env"] = ["PATH=" + sandbox.DEFAULT_PATH]
            if self.plan.platform is not None:  # --platform: the image is for the target platform
                config["os"], config["architecture"] = self.plan.platform[:2]
                if self.plan.platform[2]:
                    config["variant"] = self.plan.platform[2]
            key = key_of(
                CACHE_VERSION, "scratch", self.epoch, self.clamp, *([self.plan.platform] if self.plan.platform else [])
            )
            return StageState(config, [], key, {})
        rec = self.resolve_image(stage.base, fc.node, fc.platform)
        config = self.store.read_json(rec.id)
        config.setdefault("config", {})
        config.setdefault("history", [])
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        descs = self.store.read_json(rec.manifest).get("layers", [])
        return StageState(
            config,
            diff_ids,
            key_of(CACHE_VERSION, "image", rec.id, self.epoch, self.clamp),
            {},
            base_blobs=list(zip(diff_ids, descs, strict=False)),
        )

    def resolve_image(self, name: str, node: Node, platform: str | None = None) -> ImageRecord:
        """The image a FROM / COPY --from reference names (with that name's manifest): store first, then outside."""
        options = self.opts.registry_options
        if platform and options is not None:  # FROM --platform= chooses the stage's image (BuildKit's rule)
            options = dataclasses.replace(options, platform=platform)
        from rootless.oci import names, transports

        source = transports.parse_transport(name)
        if source.local:
            try:
                with source.open(self.store, options) as src:
                    return transports.import_image(self.store, src, [], self.strategy.ownership, self.log)
            except RbuildError as e:
                raise self.err(node, str(e)) from None
        rec = None if self.opts.pull == "always" else self.store.find(names.candidates(name))
        if rec is not None and self.opts.pull == "newer" and rec.digest:
            latest = transports.remote_digest(name, options)
            if latest is not None and latest != rec.digest:
                rec = None  # the registry has a different image under that name: pull it
        if rec is not None and not transports.complete(self.store, rec):
            if self.opts.pull == "never":
                raise self.err(
                    node,
                    f"image {name!r} lacks layers in the local store (an older store's layer that "
                    "could not be converted?) and --pull=never was given",
                )
            rec = None  # pulled again
        if rec is not None:
            return rec
        if self.opts.pull == "never":
            raise self.err(node, f"image {name!r} is not in the local store and --pull=never was given")
        try:
            with source.open(self.store, options, self.reporter) as src:
                self.log(f"Pulled {src.name}")
                return transports.import_image(self.store, src, [src.name], self.strategy.ownership, self.log)
        except RbuildError as e:
            raise self.err(node, f"base image {name}: {e}") from None

    # -- one step --------------------------------------------------------------------------------------
    def expand_env(self, state: StageState) -> dict[str, str]:
        env = dict(state.args)
        env.update(env_dict(state.config))
        return env

    def step(self, stage: Stage, state: StageState, cmd: ins.Command) -> StageState:
        """One instruction; whatever stops it is reported at its line."""
        try:
            return self._step(stage, state, cmd)
        except (ContainerfileError, RunFailed):
            raise
        except RbuildError as e:
            if str(e).startswith(f"{self.plan.filename}:"):
                raise  # located already
            located = self.err(cmd.node, f"{cmd.node.keyword.upper()}: {e}")
            located.exit_code = e.exit_code
            raise located from None
        except BrokenPipeError:
            raise
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise self.err(cmd.node, f"{cmd.node.keyword.upper()}: {e.strerror or e}{where}") from None

    def _step(self, stage: Stage, state: StageState, cmd: ins.Command) -> StageState:
        node = cmd.node
        start = time.monotonic()
        if isinstance(cmd, ins.ArgCmd):
            # an ARG given by --build-arg keeps its default unexpanded (a bad default must not fail it)
            return self.do_arg(state, cmd.expand(self.lexer, self.expand_env(state), skip=self.plan.build_args))
        cmd = cmd.expand(self.lexer, self.expand_env(state))
        self.ctx.current_shell = list(state.config["config"].get("Shell") or DEFAULT_SHELL)  # for shell forms
        run_args = self.run_args(state)
        handler = self.steps.get(type(cmd))
        if handler is None:
            raise self.err(node, f"unknown instruction: {node.keyword.upper()}")
        desc = handler.describe(cmd)
        if _holds_nul(cmd, desc, run_args):
            raise self.err(node, f"{node.keyword.upper()}: a path, argument or variable holds a NUL byte")
        extra = handler.cache_extra(state, cmd)
        key = key_of(
            state.key,
            node.keyword,
            desc,
            node.original,
            run_args if isinstance(cmd, ins.RunCmd) else None,
            extra,
            state.config["config"].get("WorkingDir"),
            state.config["config"].get("User"),
            state.config["config"].get("Env"),
            state.config["config"].get("Shell"),
        )
        if not self.opts.no_cache:
            hit = self.cache.lookup(key)
            if hit is not None:
                self.reporter.emit(CacheHit(key, hit.source))
                self.reporter.emit(StepDone(key, None, time.monotonic() - start, True))
                self.step_keys.append((stage.index, key))
                cmd_set = state.cmd_set if hit.cmd_set is None else hit.cmd_set
                return StageState(hit.config, hit.layers, key, state.args, cmd_set, state.base_blobs)
        new = StageState(
            copy.deepcopy(state.config), list(state.layers), key, state.args, state.cmd_set, state.base_blobs
        )
        layer_made = handler.apply(new, cmd)
        history: dict[str, Any] = {"created": self.created(), "created_by": desc}
        if not layer_made:
            history["empty_layer"] = True
        new.config["history"] = list(new.config.get("history") or []) + [history]
        new.config["created"] = history["created"]
        new.config["rootfs"] = {"type": "layers", "diff_ids": list(new.layers)}
        self.cache.store(key, StepResult(new.config, new.layers, new.cmd_set))
        self.step_keys.append((stage.index, key))
        self.reporter.emit(StepDone(key, new.layers[-1] if layer_made else None, time.monotonic() - start, False))
        return new

    def export_cache(self) -> None:
        """Push the build's steps to each --cache-to (mode=min: the final stage's steps only)."""
        if not self.opts.cache_to:
            return
        from rootless.build import regcache

        for spec in self.opts.cache_to:
            in_order = sorted(self.step_keys, key=lambda t: self.plan.order.index(t[0]))  # as one by one
            keys = [k for idx, k in in_order if spec.mode == "max" or idx == self.plan.target]
            digest = regcache.export(self.store, self.cache, spec, keys, self.opts.registry_options)
            self.log(f"--> exported the cache to {spec.ref} ({len(keys)} steps, {digest})")

    def do_arg(self, state: StageState, cmd: ins.ArgCmd) -> StageState:
        args = dict(state.args)
        for name, default in cmd.args:
            self.used_args.add(name)
            if name in self.plan.build_args:
                args[name] = self.plan.build_args[name]
            elif default is not None:
                args[name] = default
            elif name in self.plan.meta_args:
                args[name] = self.plan.meta_args[name]
        # values stay out of the chained key: they reach later keys through the expanded instructions
        # and the build args a RUN sees, so an ARG no step uses does not invalidate the cache
        return StageState(state.config, state.layers, state.key, args, state.cmd_set, state.base_blobs)

    def run_args(self, state: StageState) -> dict[str, str]:
        """Build args a RUN sees: declared ARGs with values, plus docker's predefined proxy args."""
        out = dict(state.args)
        for name in PROXY_ARGS:
            if name in self.plan.build_args:
                out[name] = self.plan.build_args[name]
                self.used_args.add(name)
        return out

    def with_rootfs(self, state: StageState, action: Callable[[str, str], None], untrusted: bool = False) -> bool:
        """Mount the state's layers with a fresh upper dir, run action(merged, scratch), commit the upper.

        `untrusted`: the action runs a RUN, so rbuild's own records in the upper are checked (`layers.normalize`).
        """
        lowers = self.store.layer_dirs(state.layers)
        with self.store.staging("step-") as tmp, self.store.mountpoints() as mnt:
            scratch, merged = os.path.join(tmp, "scratch"), os.path.join(mnt, "merged")
            os.mkdir(scratch, 0o700)
            os.mkdir(merged, 0o700)
            with self.driver.writable(lowers, tmp, merged) as root:
                self.ctx.touched = root.touched
                self.ctx.emulated_owner = None  # a single-uid RUN's USER (run_step)
                self.ctx.step_upper = root.upper
                self.ctx.step_lowers = lowers
                self.ensure_workdir(state, root.path)
                action(root.path, scratch)
            diff_id = self.commit_upper(root.diff(), state.layers, lowers if untrusted else None)
        if diff_id is None:
            return False
        state.layers.append(diff_id)
        return True

    def ensure_workdir(self, state: StageState, merged: str) -> None:
        """WORKDIR's directory, made when the next step has a tree (owned by USER, as BuildKit makes it)."""
        c = state.config["config"]
        workdir = clean_abs(c.get("WorkingDir") or "/")
        if workdir == "/" or os.path.isdir(secure_join(merged, workdir)):
            return
        uid = gid = 0
        if c.get("User"):
            try:
                u = sandbox.resolve_user(merged, c["User"])
                uid, gid = u.uid, u.gid
            except RbuildError:
                pass
        try:
            copyfiles.ensure_dir(merged, workdir, uid, gid)
        except RbuildError as e:
            raise RbuildError(f"WORKDIR {workdir}: {e}") from None

    def commit_upper(self, upper: str, below: list[str], run_lowers: list[str] | None) -> str | None:
        """Make the upper a layer on top of the diff_ids `below`; run_lowers: the lower dirs of a RUN."""
        from rootless.layer import layers

        sealed = run_lowers is not None and self.emulated_owner is not None  # every xattr write was the supervisor's
        layers.normalize(
            upper,
            set_mtime=self.opts.timestamp,
            clamp_mtime=self.clamp,
            run_lowers=run_lowers,
            sealed=sealed,
            new_owner=self.emulated_owner if sealed else None,
        )
        if not os.listdir(upper):
            return None
        diff_id, size = layers.write_tar(upper, None)
        parent = chain_ids(below)[-1] if below else ""
        self.store.add_layer(
            upper,
            chain_ids([*below, diff_id])[-1],
            {"diff_id": diff_id, "parent": parent, "size": size, "origin": "dir", "blobs": []},
        )
        return diff_id

    def layers_view(self, diff_ids: list[str], path: str, stack: contextlib.ExitStack) -> str:
        """A read-only view of a layer list (another stage or image) mounted at path, kept by stack."""
        os.mkdir(path)
        return stack.enter_context(self.driver.view(self.store.layer_dirs(diff_ids), path))

    # -- COPY / ADD ---------------------------------------------------------------------------------------
    def source_of(self, ref: str | None, cmd: ins.Command) -> tuple[str, list[str] | None]:
        """Where --from=REF points: ('context', None), ('dir', [a --build-context directory]), or
        ('stage'/'image', its layers). A --build-context overrides a stage of its name (BuildKit)."""
        if not ref:
            return "context", None
        named = self.plan.contexts.get(ref)
        if named is not None and named[0] == "dir":
            return "dir", [named[1]]  # a --build-context directory: copied as the build context is (0:0)
        if named is not None:  # an image: it overrides a stage of that name, as in BuildKit
            ref = named[1]
        else:
            low = ref.lower()
            for s in self.plan.stages:
                if (s.name == low or str(s.index) == ref) and self.built_before(s.index):
                    return "stage", self.results[s.index].layers
            for s in self.plan.stages:
                if s.name == low or str(s.index) == ref:
                    raise self.err(cmd.node, f"--from={ref}: stage is not built before this step")
        rec = self.resolve_image(ref, cmd.node)
        return "image", list(self.store.read_json(rec.id).get("rootfs", {}).get("diff_ids", []))

    def built_before(self, index: int) -> bool:
        """Whether stage `index` is one the running stage may use: as when stages are built one by one, a stage
        to build that comes before it. Stages at once wait for one no dependency named (an ONBUILD trigger's
        COPY --from), so what a step sees never depends on which stage happened to finish first."""
        if index not in self.plan.order or index >= self.ctx.index >= 0:
            return False
        with self.built:
            while index not in self.results:
                self.ctx.check()
                self.built.wait(0.1)
        return True


def _holds_nul(cmd: ins.Command, desc: str, run_args: dict[str, str]) -> bool:
    """Whether an instruction that reaches files or runs a process would pass on a NUL byte, which no path,
    argument or environment variable can hold."""
    if isinstance(cmd, ins.RunCmd):
        texts = [desc, *cmd.mounts, *run_args, *run_args.values()]
    elif isinstance(cmd, ins.CopyCmd | ins.AddCmd | ins.WorkdirCmd | ins.EnvCmd | ins.UserCmd):
        texts = [desc]
    else:
        return False
    return any("\0" in t for t in texts)


def build(
    plan: Plan, store: Store, opts: BuildOptions, strategy: Strategy, reporter: Reporter, cache: StepCache | None = None
) -> str:
    """Run the plan with the environment `strategy` gives, its events to reporter, its steps looked up in
    cache (by default the store's own, then the --cache-from caches); return the image id."""
    start = time.monotonic()
    if cache is None:
        cache = LocalStepCache(store)
        if opts.cache_from:
            cache = RegistryStepCache(
                cache, store, strategy.ownership, opts.registry_options, opts.cache_from, reporter
            )
    ex = Executor(plan, store, opts, strategy, reporter, cache)
    image_id = ex.run()
    ex.export_cache()
    reporter.emit(BuildDone(image_id, time.monotonic() - start))
    return image_id
