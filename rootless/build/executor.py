"""The build executor: runs a plan's stages step by step inside the user namespace.

Every step has a cache key derived from its parent's key, the expanded instruction, the build args
and environment it sees, and for COPY/ADD the content, names and modes of its sources (never mtimes).
A step's result (image config + layer list) is stored under that key, so a rebuild with nothing
changed reuses every step, and reproduces the same image id.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shlex
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rootless.build import copyfiles
from rootless.build.planner import PROXY_ARGS, Plan, Stage
from rootless.errors import ContainerfileError, RbuildError, RunFailed
from rootless.kernel.fspath import clean_abs, open_beneath, secure_join
from rootless.oci import image as img
from rootless.rootfs import overlay
from rootless.sandbox import spec as sandbox
from rootless.store.store import ImageRecord, Store, chain_ids, now_rfc3339

if TYPE_CHECKING:
    from rootless.frontend.instructions import Command

DEFAULT_SHELL = ["/bin/sh", "-c"]
CACHE_VERSION = "rbuild-cache-1"


@dataclass
class BuildOptions:
    tags: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    no_cache: bool = False
    fmt: str = "oci"
    quiet: bool = False
    timestamp: int | None = None
    source_date_epoch: int | None = None
    rewrite_timestamp: bool = True
    single_uid: bool = False
    pull: str = "missing"
    registry_options: Any = None
    containerfile: str | None = None
    secrets: dict[str, bytes] = field(default_factory=dict)  # id -> value (RUN --mount=type=secret)
    debug: bool = False  # --log-level debug: show each RUN's sandbox operations


@dataclass
class StageState:
    """Where a stage is: its image config, its layers and the cache key that produced them."""

    config: dict[str, Any]
    layers: list[str]
    key: str
    args: dict[str, str] = field(default_factory=dict)
    cmd_set: bool = False
    # (diff_id, descriptor) of the base image's layers, bottom first, from the manifest of the name FROM
    # used: the built image records (and pushes) these blobs for them, not whichever a store holds
    base_blobs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _env_dict(config: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in config.get("config", {}).get("Env") or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def _set_env(config: dict[str, Any], key: str, value: str) -> None:
    env = list(config["config"].get("Env") or [])
    for i, item in enumerate(env):
        if item.partition("=")[0] == key:
            env[i] = f"{key}={value}"
            break
    else:
        env.append(f"{key}={value}")
    config["config"]["Env"] = env


class Executor:
    def __init__(self, plan: Plan, store: Store, opts: BuildOptions) -> None:
        self.plan = plan
        self.store = store
        self.opts = opts
        self.results: dict[int, StageState] = {}
        self.used_args: set[str] = set()
        self.ignore_rules = copyfiles.load_ignore(plan.context, opts.containerfile)
        ctx_tag = hashlib.sha256(os.path.realpath(plan.context).encode()).hexdigest()[:32]
        self.file_digests = copyfiles.FileDigests(os.path.join(store.root, "cache", f"files-{ctx_tag}.json"))
        from rootless.frontend.shell import Lexer

        self.lexer = Lexer(plan.escape)
        self.current_shell = DEFAULT_SHELL
        self.downloads: dict[str, Download] = {}
        self.download_dir: str | None = None
        self.build_stack = contextlib.ExitStack()
        self.epoch = opts.timestamp if opts.timestamp is not None else opts.source_date_epoch
        self.clamp = opts.source_date_epoch if (opts.timestamp is None and opts.rewrite_timestamp) else None

    # -- output ------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.opts.quiet:
            print(msg, file=sys.stderr, flush=True)

    def err(self, node: Any, msg: str) -> ContainerfileError:
        return ContainerfileError(msg, self.plan.filename, node.start_line)

    def created(self) -> str:
        return now_rfc3339(self.epoch) if self.epoch is not None else now_rfc3339()

    # -- the build -----------------------------------------------------------------------------------
    def run(self) -> str:
        with contextlib.ExitStack() as self.build_stack:
            return self._run()

    def _run(self) -> str:
        for idx in self.plan.order:
            self.results[idx] = self.run_stage(self.plan.stages[idx])
        final = self.results[self.plan.target]
        unused = sorted(
            set(self.plan.build_args)
            - self.used_args
            - set(self.plan.meta_args)
            - set(PROXY_ARGS)
            - {"SOURCE_DATE_EPOCH"}
        )
        if unused:
            print(f"[Warning] one or more build-args {unused} were not consumed", file=sys.stderr)
        return self.commit_image(final)

    def commit_image(self, state: StageState) -> str:
        from rootless.oci import names

        config = copy.deepcopy(state.config)
        if self.opts.labels:
            labels = dict(config["config"].get("Labels") or {})
            labels.update(self.opts.labels)
            config["config"]["Labels"] = labels
        for k in [k for k, v in config["config"].items() if v in (None, [], {}) and k not in ("Env",)]:
            del config["config"][k]
        config_bytes = img.canonical(config)
        descs = []
        for i, (d, c) in enumerate(zip(state.layers, chain_ids(state.layers), strict=True)):
            if i < len(state.base_blobs) and state.base_blobs[i][0] == d:
                descs.append(state.base_blobs[i][1])
            else:  # a layer made here: compressed when pushed
                descs.append({"mediaType": img.OCI_LAYER, "digest": d, "size": self.store.layer_meta(c).get("size", 0)})
        manifest = img.manifest(
            self.opts.fmt, "sha256:" + hashlib.sha256(config_bytes).hexdigest(), len(config_bytes), descs
        )
        tags = [names.normalize(t) for t in self.opts.tags]
        rec = self.store.add_image(config_bytes, img.canonical(manifest), tags, config.get("created", ""))
        for t in tags:
            self.log(f"Successfully tagged {t}")
        return rec.id

    def run_stage(self, stage: Stage) -> StageState:
        n = len(stage.commands) + 1
        order = self.plan.order
        prefix = f"[{order.index(stage.index) + 1}/{len(order)}] " if len(order) > 1 else ""
        fc: Any = stage.from_cmd
        self.log(f"{prefix}STEP 1/{n}: {fc.node.original.strip()}")
        state = self.base_state(stage)
        triggers = state.config["config"].pop("OnBuild", None) or []
        for trig in triggers:
            state = self.run_trigger(stage, state, trig)
        for i, cmd in enumerate(stage.commands, start=2):
            node = cmd.node  # type: ignore[attr-defined]
            self.log(f"{prefix}STEP {i}/{n}: {node.original.strip()}")
            state = self.step(stage, state, cmd)
        return state

    def run_trigger(self, stage: Stage, state: StageState, trigger: str) -> StageState:
        from rootless.frontend import containerfile, instructions

        self.log(f"--> ONBUILD {trigger}")
        cf = containerfile.parse(trigger, self.plan.filename)
        for node in cf.nodes:
            node.start_line = node.end_line = stage.from_cmd.node.start_line  # type: ignore[attr-defined]
            state = self.step(stage, state, instructions.parse_instruction(node, self.plan.filename))
        return state

    # -- FROM ----------------------------------------------------------------------------------------
    def base_state(self, stage: Stage) -> StageState:
        fc: Any = stage.from_cmd
        if stage.base_stage is not None:
            prev = self.results.get(stage.base_stage)
            if prev is None:
                raise self.err(fc.node, f"stage {stage.base!r} is used before it was built")
            return StageState(
                copy.deepcopy(prev.config), list(prev.layers), _key("stage", prev.key), {}, base_blobs=prev.base_blobs
            )
        if stage.base.lower() == "scratch":
            config = img.new_config(self.created())
            config["config"]["Env"] = ["PATH=" + sandbox.DEFAULT_PATH]
            return StageState(config, [], _key(CACHE_VERSION, "scratch", self.epoch, self.clamp), {})
        rec = self.resolve_image(stage.base, fc.node)
        config = self.store.read_json(rec.id)
        config.setdefault("config", {})
        config.setdefault("history", [])
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        descs = self.store.read_json(rec.manifest).get("layers", [])
        return StageState(
            config,
            diff_ids,
            _key(CACHE_VERSION, "image", rec.id, self.epoch, self.clamp),
            {},
            base_blobs=list(zip(diff_ids, descs, strict=False)),
        )

    def resolve_image(self, name: str, node: Any) -> ImageRecord:
        """The image a FROM / COPY --from reference names (with that name's manifest): store first, then outside."""
        from rootless.oci import names, transports

        source = transports.parse_transport(name)
        if source.local:
            try:
                with source.open(self.store, self.opts.registry_options) as src:
                    return transports.import_image(self.store, src, [], self.opts.single_uid, self.log)
            except RbuildError as e:
                raise self.err(node, str(e)) from None
        rec = None if self.opts.pull == "always" else self.store.find(names.candidates(name))
        if rec is not None and self.opts.pull == "newer" and rec.digest:
            latest = transports.remote_digest(name, self.opts.registry_options)
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
            progress = not self.opts.quiet and sys.stderr.isatty()
            with source.open(self.store, self.opts.registry_options, progress) as src:
                self.log(f"Pulled {src.name}")
                return transports.import_image(self.store, src, [src.name], self.opts.single_uid, self.log)
        except RbuildError as e:
            raise self.err(node, f"base image {name}: {e}") from None

    # -- one step --------------------------------------------------------------------------------------
    def expand_env(self, state: StageState) -> dict[str, str]:
        env = dict(state.args)
        env.update(_env_dict(state.config))
        return env

    def step(self, stage: Stage, state: StageState, cmd: Any) -> StageState:
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

    def _step(self, stage: Stage, state: StageState, cmd: Any) -> StageState:
        from rootless.frontend import instructions as ins

        node = cmd.node
        if isinstance(cmd, ins.ArgCmd):
            # an ARG given by --build-arg keeps its default unexpanded (a bad default must not fail it)
            return self.do_arg(state, cmd.expand(self.lexer, self.expand_env(state), skip=self.plan.build_args))
        cmd = cmd.expand(self.lexer, self.expand_env(state))
        self.current_shell = list(state.config["config"].get("Shell") or DEFAULT_SHELL)  # for shell forms
        run_args = self.run_args(state)
        desc = self.describe(cmd)
        if _holds_nul(cmd, desc, run_args):
            raise self.err(node, f"{node.keyword.upper()}: a path, argument or variable holds a NUL byte")
        extra: Any = None
        if isinstance(cmd, ins.CopyCmd | ins.AddCmd):
            extra = self.copy_key(state, cmd)
        elif isinstance(cmd, ins.RunCmd) and cmd.mounts:
            extra = self.mount_key(cmd)
        key = _key(
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
            hit = self.store.cache_get(key)
            if hit is not None:
                self.log(f"--> Using cache {key[:12]}")
                return StageState(
                    hit["config"], hit["layers"], key, state.args, hit.get("cmd_set", state.cmd_set), state.base_blobs
                )
        new = StageState(
            copy.deepcopy(state.config), list(state.layers), key, state.args, state.cmd_set, state.base_blobs
        )
        layer_made = self.apply(stage, new, cmd)
        history: dict[str, Any] = {"created": self.created(), "created_by": desc}
        if not layer_made:
            history["empty_layer"] = True
        new.config["history"] = list(new.config.get("history") or []) + [history]
        new.config["created"] = history["created"]
        new.config["rootfs"] = {"type": "layers", "diff_ids": list(new.layers)}
        self.store.cache_put(key, {"config": new.config, "layers": new.layers, "cmd_set": new.cmd_set})
        self.log(f"--> {key[:12]}")
        return new

    def describe(self, cmd: Command) -> str:
        """The history's created_by, in BuildKit's style."""
        from rootless.frontend import instructions as ins

        kw = cmd.node.keyword.upper()
        if isinstance(cmd, ins.RunCmd):
            return "RUN " + " ".join(self.run_argv(cmd)[0]) + " # buildkit"
        if isinstance(cmd, ins.CopyCmd | ins.AddCmd):
            flags = []
            source = cmd.from_ if isinstance(cmd, ins.CopyCmd) else None
            if source:
                flags.append(f"--from={source}")
            if cmd.chown:
                flags.append(f"--chown={cmd.chown}")
            if cmd.chmod:
                flags.append(f"--chmod={cmd.chmod}")
            srcs = cmd.sources if cmd.sources else [h.name for h in cmd.heredocs]
            return " ".join([kw, *flags, *srcs, cmd.dest]) + " # buildkit"
        if isinstance(cmd, ins.EnvCmd):
            return "ENV " + " ".join(f"{k}={v}" for k, v in cmd.env)
        if isinstance(cmd, ins.LabelCmd):
            return "LABEL " + " ".join(f"{k}={v}" for k, v in cmd.labels)
        if isinstance(cmd, ins.CmdCmd | ins.EntrypointCmd):
            return f"{kw} {json.dumps(self.shell_wrap(cmd))}"
        if isinstance(cmd, ins.ShellCmd):
            return f"SHELL {json.dumps(cmd.shell)}"
        if isinstance(cmd, ins.WorkdirCmd):
            return f"WORKDIR {cmd.path}"
        if isinstance(cmd, ins.UserCmd):
            return f"USER {cmd.user}"
        if isinstance(cmd, ins.ExposeCmd):
            return "EXPOSE map[" + " ".join(f"{_port(p)}:{{}}" for p in cmd.ports) + "]"
        if isinstance(cmd, ins.VolumeCmd):
            return "VOLUME " + json.dumps(cmd.volumes)
        if isinstance(cmd, ins.StopsignalCmd):
            return f"STOPSIGNAL {cmd.signal}"
        if isinstance(cmd, ins.OnbuildCmd):
            return f"ONBUILD {cmd.expression}"
        if isinstance(cmd, ins.MaintainerCmd):
            return f"MAINTAINER {cmd.maintainer}"
        return cmd.node.original.strip()

    def shell_wrap(self, cmd: Any) -> list[str]:
        shell = self.current_shell
        return list(cmd.args) if not cmd.shell_form else shell + [" ".join(cmd.args)]

    # -- metadata instructions ---------------------------------------------------------------------------
    def do_arg(self, state: StageState, cmd: Any) -> StageState:
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

    def apply(self, stage: Stage, state: StageState, cmd: Any) -> bool:
        """Carry out one instruction on state; True when it made a layer."""
        from rootless.frontend import instructions as ins

        c = state.config["config"]
        if isinstance(cmd, ins.RunCmd):
            return self.do_run(state, cmd)
        if isinstance(cmd, ins.CopyCmd | ins.AddCmd):
            return self.do_copy(state, cmd)
        if isinstance(cmd, ins.EnvCmd):
            for k, v in cmd.env:
                _set_env(state.config, k, v)
        elif isinstance(cmd, ins.LabelCmd):
            labels = dict(c.get("Labels") or {})
            labels.update(dict(cmd.labels))
            c["Labels"] = labels
        elif isinstance(cmd, ins.WorkdirCmd):
            c["WorkingDir"] = clean_abs(cmd.path, c.get("WorkingDir") or "/")
        elif isinstance(cmd, ins.UserCmd):
            c["User"] = cmd.user
        elif isinstance(cmd, ins.ExposeCmd):
            ports = dict(c.get("ExposedPorts") or {})
            for p in cmd.ports:
                ports[_port(p)] = {}
            c["ExposedPorts"] = ports
        elif isinstance(cmd, ins.VolumeCmd):
            vols = dict(c.get("Volumes") or {})
            for v in cmd.volumes:
                if not v.strip():
                    raise self.err(cmd.node, "VOLUME specified can not be an empty string")
                vols[v] = {}
            c["Volumes"] = vols
        elif isinstance(cmd, ins.CmdCmd):
            c["Cmd"] = self.shell_wrap(cmd)
            state.cmd_set = True
        elif isinstance(cmd, ins.EntrypointCmd):
            c["Entrypoint"] = self.shell_wrap(cmd)
            if not state.cmd_set:
                c.pop("Cmd", None)
        elif isinstance(cmd, ins.ShellCmd):
            c["Shell"] = list(cmd.shell)
        elif isinstance(cmd, ins.StopsignalCmd):
            c["StopSignal"] = cmd.signal
        elif isinstance(cmd, ins.HealthcheckCmd):
            hc: dict[str, Any] = {"Test": list(cmd.test) if cmd.test else ["NONE"]}
            for attr, name in (
                ("interval", "Interval"),
                ("timeout", "Timeout"),
                ("start_period", "StartPeriod"),
                ("start_interval", "StartInterval"),
                ("retries", "Retries"),
            ):
                val = getattr(cmd, attr, None)
                if val:
                    hc[name] = val
            c["Healthcheck"] = hc
        elif isinstance(cmd, ins.OnbuildCmd):
            c["OnBuild"] = list(c.get("OnBuild") or []) + [cmd.expression]
        elif isinstance(cmd, ins.MaintainerCmd):
            state.config["author"] = cmd.maintainer
        else:
            raise self.err(cmd.node, f"unknown instruction: {cmd.node.keyword.upper()}")
        return False

    # -- steps with a root filesystem ----------------------------------------------------------------------
    def with_rootfs(self, state: StageState, action: Callable[[str, str], None], untrusted: bool = False) -> bool:
        """Mount the state's layers with a fresh upper dir, run action(merged, scratch), commit the upper.

        `untrusted`: the action runs a RUN, so rbuild's own records in the upper are checked (`layers.normalize`).
        """
        lowers = self.store.layer_dirs(state.layers)
        with self.store.staging("step-") as tmp, self.store.mountpoints() as mnt:
            upper, work, scratch = (os.path.join(tmp, n) for n in ("upper", "work", "scratch"))
            merged, links = os.path.join(mnt, "merged"), os.path.join(mnt, "links")
            for d in (upper, work, merged, scratch):
                os.mkdir(d, 0o755 if d == upper else 0o700)
            self.touched: list[str] = []
            with overlay.mounted(lowers, upper, work, merged, links):
                self.ensure_workdir(state, merged)
                action(merged, scratch)
            _prune_copied_up(upper, lowers, self.touched)
            diff_id = self.commit_upper(upper, state.layers, lowers if untrusted else None)
        if diff_id is None:
            return False
        state.layers.append(diff_id)
        return True

    def ensure_workdir(self, state: StageState, merged: str) -> None:
        """WORKDIR's directory, made when the next step has a tree (owned by USER, as BuildKit makes it)."""
        c = state.config["config"]
        workdir = c.get("WorkingDir")
        if not workdir or os.path.isdir(secure_join(merged, workdir)):
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

        layers.normalize(upper, set_mtime=self.opts.timestamp, clamp_mtime=self.clamp, run_lowers=run_lowers)
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

    def run_argv(self, cmd: Any) -> tuple[list[str], bytes | None]:
        """argv (and stdin) for a RUN, following BuildKit's heredoc rules."""
        shell = self.current_shell
        if cmd.heredocs and cmd.shell_form:
            first = cmd.heredocs[0]
            script = " ".join(cmd.args).strip()
            if len(cmd.heredocs) == 1 and script in (
                f"<<{first.name}",
                f"<<-{first.name}",
                f"<<'{first.name}'",
                f'<<"{first.name}"',
                f"<<-'{first.name}'",
                f'<<-"{first.name}"',
            ):
                body = first.content
                if body.startswith("#!"):
                    return ["/dev/.rbuild-heredoc"], body.encode()  # the file is mounted by do_run
                return shell + [body], None
            full = " ".join(cmd.args) + "\n" + "".join(h.content + h.name + "\n" for h in cmd.heredocs)
            return shell + [full], None
        if cmd.shell_form:
            return shell + [" ".join(cmd.args)], None
        return list(cmd.args), None

    def mount_key(self, cmd: Any) -> list[Any]:
        """What RUN --mount adds to the cache key: bind sources' content, never a secret's value."""
        out: list[Any] = []
        for m in cmd.mount_specs():
            if m.type == "bind":
                kind, layer_list = self.source_of(m.from_, cmd)
                if kind == "context":
                    h = hashlib.sha256()
                    what = f"{self.plan.filename}:{cmd.node.start_line}: RUN --mount"
                    items = copyfiles.select(self.plan.context, m.source or ".", self.ignore_rules, what)
                    copyfiles.hash_sources(items, self.plan.context, self.ignore_rules, h, self.file_digests)
                    out.append(["bind", m.source, m.target, m.readonly, h.hexdigest()])
                else:
                    out.append(["bind", m.source, m.target, m.readonly, kind, layer_list])
            else:
                out.append([m.type, m.cache_id, m.target, m.source, m.mode, m.uid, m.gid, m.size, m.env])
        self.file_digests.save()
        return out

    def prepare_mounts(
        self, cmd: Any, stack: contextlib.ExitStack, merged: str, env: dict[str, str], scratch: str, workdir: str
    ) -> list[sandbox.MountSpec]:
        """Resolve RUN --mount specs to host paths (views mounted next to the tree at merged, kept open by
        stack), each target checked to be a place a mount point can be made."""
        mnt = os.path.dirname(merged)
        specs: list[sandbox.MountSpec] = []
        what = f"{self.plan.filename}:{cmd.node.start_line}: RUN --mount"
        for i, m in enumerate(cmd.mount_specs()):
            target = clean_abs(m.target, workdir) if m.target else ""  # relative to WORKDIR, as BuildKit
            if target == "/":
                raise self.err(cmd.node, "RUN --mount cannot be mounted on /")
            if m.type == "bind":
                if not target:
                    raise self.err(cmd.node, "RUN --mount=type=bind needs a target")
                kind, layer_list = self.source_of(m.from_, cmd)
                view = self.plan.context
                if kind != "context":
                    view = self.layers_view(layer_list or [], os.path.join(mnt, f"from{i}"), stack)
                rules = self.ignore_rules if kind == "context" else []
                item = copyfiles.select(view, m.source or ".", rules, what)[0]
                source = item.host
                if not os.path.isdir(source):
                    if not stat.S_ISREG(os.stat(source).st_mode):
                        raise self.err(
                            cmd.node, f"RUN --mount: {m.source}: only a directory or a regular file can be bound"
                        )
                    if not m.readonly:  # BuildKit's rw: the RUN writes to a copy, thrown away after the step
                        source = os.path.join(scratch, f"file{i}")
                        copyfiles.copy_entry(item.host, source)
                layers = [source]
                mask = os.path.join(scratch, f"mask{i}")
                if rules and os.path.isdir(source) and copyfiles.write_mask(item, view, rules, mask):
                    layers = [mask, source]  # .dockerignore'd files stay hidden, as from COPY
                writable = not m.readonly and os.path.isdir(source)
                if writable or len(layers) > 1:
                    merged = os.path.join(mnt, f"view{i}")
                    os.mkdir(merged)
                    upper = work = None
                    if writable:  # writes are kept apart and thrown away
                        upper, work = os.path.join(scratch, f"up{i}"), os.path.join(scratch, f"wk{i}")
                        os.mkdir(upper)
                        os.mkdir(work)
                    stack.enter_context(overlay.mounted(layers, upper, work, merged, os.path.join(mnt, f"vl{i}")))
                    source = merged
                specs.append(
                    sandbox.MountSpec("bind", target, source, m.readonly and True, is_file=not os.path.isdir(source))
                )
            elif m.type == "cache":
                if not target:
                    raise self.err(cmd.node, "RUN --mount=type=cache needs a target")
                cid = m.cache_id or target
                d = os.path.join(self.store.root, "cache-mounts", hashlib.sha256(cid.encode()).hexdigest()[:32])
                if not os.path.isdir(d):
                    os.makedirs(d, exist_ok=True)
                    os.chmod(d, m.mode if m.mode is not None else 0o755)
                    if not self.opts.single_uid:
                        os.chown(d, m.uid or 0, m.gid or 0)
                if m.sharing == "locked":
                    import fcntl

                    lock = stack.enter_context(open(d + ".lock", "w"))
                    fcntl.flock(lock, fcntl.LOCK_EX)
                specs.append(sandbox.MountSpec("bind", target, d, readonly=m.readonly))
            elif m.type == "tmpfs":
                if not target:
                    raise self.err(cmd.node, "RUN --mount=type=tmpfs needs a target")
                specs.append(sandbox.MountSpec("tmpfs", target, size=m.size))
            elif m.type == "secret":
                sid = m.cache_id or (os.path.basename(m.target) if m.target else None) or m.env or ""
                data = self.opts.secrets.get(sid)
                if data is None:
                    if m.required:
                        raise self.err(cmd.node, f"secret {sid} is required but was not given (--secret id={sid},...)")
                    continue
                if m.env:
                    env[m.env] = data.decode(errors="replace")
                    if not m.target:
                        continue
                copy = os.path.join(self.secret_dir(stack, mnt), f"secret{i}")
                with open(copy, "wb") as f:
                    f.write(data)
                os.chmod(copy, m.mode if m.mode is not None else 0o400)
                if not self.opts.single_uid:
                    os.chown(copy, m.uid or 0, m.gid or 0)
                specs.append(sandbox.MountSpec("bind", target or f"/run/secrets/{sid}", copy, True, is_file=True))
            else:
                raise self.err(cmd.node, f"RUN --mount=type={m.type} is not supported")
        for spec in specs:
            fault = _mount_point_fault(merged, spec.target)
            if fault:
                raise self.err(cmd.node, f"RUN --mount target {spec.target}: {fault}")
        return specs

    def layers_view(self, diff_ids: list[str], path: str, stack: contextlib.ExitStack) -> str:
        """A read-only view of a layer list (another stage or image) mounted at path, kept by stack."""
        os.mkdir(path)
        lowers = self.store.layer_dirs(diff_ids)
        if lowers:
            stack.enter_context(overlay.mounted(lowers, None, None, path, path + "-links"))
        return path

    def secret_dir(self, stack: contextlib.ExitStack, mnt: str) -> str:
        """A tmpfs in the build's own mount namespace: secrets never touch a disk, and vanish with the
        namespace even when the build is killed."""
        d = os.path.join(mnt, "secrets")
        if not os.path.isdir(d):
            from rootless.kernel import linux

            os.mkdir(d, 0o700)
            linux.mount("tmpfs", d, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, "size=16m,mode=0700")
            stack.callback(linux.umount, d, linux.MNT_DETACH)
        return d

    def do_run(self, state: StageState, cmd: Any) -> bool:
        if cmd.network not in (None, "default", "host"):
            raise self.err(cmd.node, f"RUN --network={cmd.network} is not supported yet")
        run_args = self.run_args(state)
        env = dict(run_args)
        env.update(_env_dict(state.config))
        argv, script = self.run_argv(cmd)
        status = 0

        def action(merged: str, scratch: str) -> None:
            nonlocal status
            c = state.config["config"]
            try:
                user = sandbox.resolve_user(merged, c.get("User") or "0")
            except RbuildError as e:
                raise self.err(cmd.node, str(e)) from None
            if self.opts.single_uid and (user.uid != 0 or user.gid != 0):
                raise self.err(
                    cmd.node,
                    f"USER {c.get('User')} needs uid {user.uid}/gid {user.gid}, but this "
                    "build has a single-uid user namespace (no /etc/subuid range): only root exists",
                )
            run_env = dict(env)
            run_env.setdefault("HOME", user.home or "/")
            files = {}
            if script is not None:  # a heredoc with a shebang runs as a script file, mounted under /dev
                host = os.path.join(scratch, "heredoc-script")
                with open(host, "wb") as f:
                    f.write(script)
                os.chmod(host, 0o755)
                files[argv[0]] = host
            with contextlib.ExitStack() as stack:
                mounts = (
                    self.prepare_mounts(cmd, stack, merged, run_env, scratch, c.get("WorkingDir") or "/")
                    if cmd.mounts
                    else []
                )
                spec = sandbox.RunSpec(
                    argv,
                    run_env,
                    c.get("WorkingDir") or "/",
                    user.uid,
                    user.gid,
                    user.groups,
                    dev_files=files,
                    mounts=mounts,
                )
                if self.opts.quiet:
                    with tempfile.TemporaryFile() as out:
                        spec.output_fd = out.fileno()
                        status = self.sandbox_run(merged, spec, scratch, cmd)
                        if status != 0:
                            out.seek(0)
                            sys.stderr.buffer.write(out.read())
                            sys.stderr.flush()
                else:
                    status = self.sandbox_run(merged, spec, scratch, cmd)
            if status != 0:
                shown = " ".join(shlex.quote(a) for a in argv) if not cmd.shell_form else " ".join(argv)
                raise RunFailed(
                    f'{self.plan.filename}:{cmd.node.start_line}: RUN: process "{shown}" did not '
                    f"complete successfully: exit code: {status}",
                    status,
                )

        return self.with_rootfs(state, action, untrusted=True)

    def sandbox_run(self, merged: str, spec: sandbox.RunSpec, scratch: str, cmd: Any) -> int:
        try:
            return sandbox.run(merged, spec, scratch, self.touched, self.log if self.opts.debug else None)
        except RbuildError as e:
            raise self.err(cmd.node, str(e)) from None

    # -- COPY / ADD ---------------------------------------------------------------------------------------
    def copy_source_root(self, cmd: Any) -> tuple[str, list[str] | None]:
        """('context', None) or ('stage'/'image', layer list) for COPY --from."""
        return self.source_of(getattr(cmd, "from_", None), cmd)  # ADD has no --from

    def source_of(self, ref: str | None, cmd: Any) -> tuple[str, list[str] | None]:
        """Where --from=REF points: ('context', None), or ('stage'/'image', its layers)."""
        if not ref:
            return "context", None
        low = ref.lower()
        for s in self.plan.stages:
            if (s.name == low or str(s.index) == ref) and s.index in self.results:
                return "stage", self.results[s.index].layers
        for s in self.plan.stages:
            if s.name == low or str(s.index) == ref:
                raise self.err(cmd.node, f"--from={ref}: stage is not built before this step")
        rec = self.resolve_image(ref, cmd.node)
        return "image", list(self.store.read_json(rec.id).get("rootfs", {}).get("diff_ids", []))

    def copy_key(self, state: StageState, cmd: Any) -> Any:
        """What COPY/ADD's cache key needs beyond the instruction: its sources' content."""
        kind, layer_list = self.copy_source_root(cmd)
        if kind != "context":
            return [kind, layer_list]
        if not cmd.sources:
            return ["heredoc", [(h.name, h.content) for h in cmd.heredocs]]
        h = hashlib.sha256()
        what = f"{self.plan.filename}:{cmd.node.start_line}: {cmd.node.keyword.upper()}"
        for src in cmd.sources:
            if _is_url(src):
                checksum = getattr(cmd, "checksum", None)
                if checksum:  # the content is pinned: no need to fetch it to know the key
                    h.update(f"url\0{src}\0{checksum}".encode())
                else:  # the key is the content, as BuildKit's: a changed file behind the URL is seen
                    h.update(f"url\0{src}\0{self.download(src, what, None).digest}".encode())
                continue
            items = select_items(self.plan.context, src, cmd, self.ignore_rules, what)
            copyfiles.hash_sources(items, self.plan.context, self.ignore_rules, h, self.file_digests)
        self.file_digests.save()
        return ["context", h.hexdigest()]

    def do_copy(self, state: StageState, cmd: Any) -> bool:
        from rootless.frontend import instructions as ins

        what = f"{self.plan.filename}:{cmd.node.start_line}: {cmd.node.keyword.upper()}"
        chmod = copyfiles.parse_chmod(cmd.chmod, what)
        kind, layer_list = self.copy_source_root(cmd)
        c = state.config["config"]
        dest = cmd.dest
        workdir = c.get("WorkingDir") or "/"
        dest_abs = clean_abs(dest, workdir) + ("/" if dest.endswith("/") and dest not in ("/",) else "")
        if dest in (".", "./") or dest.endswith("/."):
            dest_abs = clean_abs(dest, workdir) + "/"

        def action(merged: str, scratch: str) -> None:
            owner: tuple[int, int] | None = (0, 0) if kind == "context" else None  # --from keeps owners
            if cmd.chown:
                try:
                    u = sandbox.resolve_user(merged, cmd.chown)
                except RbuildError as e:
                    raise self.err(cmd.node, f"--chown={cmd.chown}: {e}") from None
                # docker: a user without a group uses the same numeric value as the gid
                owner = (u.uid, u.gid if ":" in cmd.chown else u.uid)  # unmappable ids are recorded
            try:
                if not cmd.sources:
                    for h in cmd.heredocs:
                        target = dest_abs if not dest_abs.endswith("/") else dest_abs + h.name
                        copyfiles.write_file(merged, target, h.content.encode(), *(owner or (0, 0)), chmod)
                    return
                if kind == "context":
                    self.copy_from(
                        merged,
                        self.plan.context,
                        cmd,
                        dest_abs,
                        owner,
                        chmod,
                        what,
                        isinstance(cmd, ins.AddCmd),
                        scratch,
                    )
                    return
                with contextlib.ExitStack() as stack:
                    view = self.layers_view(layer_list or [], os.path.join(os.path.dirname(merged), "src"), stack)
                    self.copy_from(merged, view, cmd, dest_abs, owner, chmod, what, False, scratch)
            except OSError as e:
                raise self.err(
                    cmd.node, f"{cmd.node.keyword.upper()} failed: {e.strerror}: {_image_path(e.filename, merged)}"
                ) from None

        return self.with_rootfs(state, action)

    def download(self, url: str, what: str, checksum: str | None) -> Download:
        """A URL's content, fetched once per build into the store's staging area."""
        got = self.downloads.get(url)
        if got is None:
            if self.download_dir is None:
                self.download_dir = self.build_stack.enter_context(self.store.staging("download-"))
            got = _download(url, self.download_dir, what)
            self.downloads[url] = got
        if checksum:
            got.check(checksum, url, what)
        return got

    def copy_from(
        self,
        merged: str,
        src_root: str,
        cmd: Any,
        dest: str,
        owner: tuple[int, int] | None,
        chmod: int | None,
        what: str,
        is_add: bool,
        scratch: str,
    ) -> None:
        rules = self.ignore_rules if src_root == self.plan.context else []
        items: list[copyfiles.SourceItem] = []
        remote: set[str] = set()
        for src in cmd.sources:
            if is_add and _is_url(src):
                items.append(self.download(src, what, getattr(cmd, "checksum", None)).item)
                remote.add(items[-1].host)  # remote archives are not unpacked (docker's rule)
                continue
            items += select_items(src_root, src, cmd, rules, what)
        if is_add and getattr(cmd, "unpack", None) is not False:
            plain = []
            for it in items:
                if it.host not in remote and os.path.isfile(it.host) and _is_archive(it.host):
                    uid, gid = owner or (0, 0)
                    target = copyfiles.ensure_dir(merged, dest, uid, gid)
                    from rootless.layer.layers import unpack_archive

                    unpack_archive(it.host, target, owner if cmd.chown else None, what)
                else:
                    plain.append(it)
            items = plain
            if not items:
                return
        copyfiles.copy_into(merged, items, src_root, rules, dest, owner, chmod, what)


def select_items(
    src_root: str, src: str, cmd: Any, rules: list[copyfiles.IgnoreRule], what: str
) -> list[copyfiles.SourceItem]:
    """A COPY/ADD source's items, with --exclude applied and --parents' sub-directories worked out."""
    found = copyfiles.select(src_root, src, rules, what)
    if cmd.exclude:
        exclude = copyfiles.patterns_to_rules(cmd.exclude, lambda n: f"{what} --exclude")
        found = [it for it in found if not copyfiles.ignored(os.path.basename(it.rel), exclude)]
        for it in found:
            it.exclude = exclude
    if cmd.parents:  # keep the path below the context (or below a /./ pivot in the source)
        pivot = src.split("/./", 1)[0] if "/./" in src else ""
        base = os.path.normpath("/" + pivot).lstrip("/")
        for it in found:
            kept = os.path.relpath(it.rel, base) if base else it.rel
            it.sub = kept if os.path.isdir(it.host) else os.path.dirname(kept)
    return found


def _image_path(path: object, merged: str) -> str:
    """A host path in the tree mounted at merged as the image names it (other paths as they are)."""
    if not isinstance(path, str):
        return ""
    rel = os.path.relpath(path, merged)
    if rel == ".." or rel.startswith("../"):
        return path
    return "/" if rel == "." else "/" + rel


def _holds_nul(cmd: Any, desc: str, run_args: dict[str, str]) -> bool:
    """Whether an instruction that reaches files or runs a process would pass on a NUL byte, which no path,
    argument or environment variable can hold."""
    from rootless.frontend import instructions as ins

    if isinstance(cmd, ins.RunCmd):
        texts = [desc, *cmd.mounts, *run_args, *run_args.values()]
    elif isinstance(cmd, ins.CopyCmd | ins.AddCmd | ins.WorkdirCmd | ins.EnvCmd | ins.UserCmd):
        texts = [desc]
    else:
        return False
    return any("\0" in t for t in texts)


def _mount_point_fault(root: str, target: str) -> str | None:
    """Why no mount point can be made at target in the tree at root (a directory on the way is a file, or
    a symlink leading nowhere), or None."""
    parts = [p for p in target.split("/") if p]
    for n in range(1, len(parts) + 1):
        path = "/" + "/".join(parts[:n])
        try:
            host = secure_join(root, path)
        except RbuildError as e:
            return str(e)
        if os.path.lexists(host):
            if n < len(parts) and not os.path.isdir(host):
                return f"{path} is not a directory in the image"
            continue
        if os.path.islink(secure_join(root, path, follow_final=False)):
            return f"{path} is a symbolic link to nothing in the image"
        return None  # the rest is made
    return None


def _prune_copied_up(upper: str, lowers: list[str], paths: list[str]) -> None:
    """Drop directories the overlay copied up only because a mount point was made (and removed) in them.

    The upper dir holds what the RUN wrote, so nothing in it is followed: directories are reached by fd
    without symlinks, and one is removed only if empty and identical to the layer below.
    """
    for p in sorted(set(paths), key=lambda x: -x.count("/")):
        rel = p.strip("/")
        try:
            pfd = open_beneath(upper, os.path.dirname(rel))
        except OSError:
            continue
        try:
            name = os.path.basename(rel)
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                continue
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
            try:
                if os.listdir(dfd) or "user.overlay.opaque" in os.listxattr(dfd):
                    continue
            finally:
                os.close(dfd)
            for lower in lowers:
                try:
                    lfd = open_beneath(lower, os.path.dirname(rel))
                except OSError:
                    continue
                try:
                    lst = os.stat(name, dir_fd=lfd, follow_symlinks=False)
                except OSError:
                    continue
                finally:
                    os.close(lfd)
                if (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (
                    lst.st_mode,
                    lst.st_uid,
                    lst.st_gid,
                    lst.st_mtime_ns,
                ):
                    os.rmdir(name, dir_fd=pfd)
                break
        except OSError:
            continue
        finally:
            os.close(pfd)


def _port(p: str) -> str:
    return p if "/" in p else p + "/tcp"


def _is_url(src: str) -> bool:
    return src.startswith(("http://", "https://"))


def _is_archive(path: str) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
    except (ValueError, EOFError):  # a tar header whose contents are damaged: the unpacker says how
        return True


@dataclass
class Download:
    item: copyfiles.SourceItem
    digest: str  # sha256 hex of the content

    def check(self, checksum: str, url: str, what: str) -> None:
        """ADD --checksum=ALGO:HEX (sha256 when no algorithm is named)."""
        algo, _, want = checksum.partition(":") if ":" in checksum else ("sha256", "", checksum)
        if algo not in ("sha256", "sha384", "sha512"):
            raise RbuildError(f"{what}: unsupported --checksum algorithm {algo!r} (use sha256, sha384 or sha512)")
        if algo == "sha256":
            got = self.digest
        else:
            h = hashlib.new(algo)
            with open(self.item.host, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            got = h.hexdigest()
        if got != want:
            raise RbuildError(f"{what}: {url} does not match --checksum={checksum} (got {algo}:{got})")


def _download(url: str, into: str, what: str) -> Download:
    import urllib.parse
    import urllib.request

    try:
        name = os.path.basename(urllib.parse.urlparse(url).path)
    except ValueError as e:  # a malformed URL, such as http://[::1
        raise RbuildError(f"{what}: cannot download {url}: {e}") from None
    if name in ("", ".", ".."):
        name = "index.html"
    d = tempfile.mkdtemp(dir=into)
    path = os.path.join(d, name)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as out:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            lm = resp.headers.get("Last-Modified")
    except (OSError, ValueError) as e:
        raise RbuildError(f"{what}: cannot download {url}: {e}") from None
    os.chmod(path, 0o600)
    if lm:
        import email.utils

        try:
            t = email.utils.parsedate_to_datetime(lm).timestamp()
            os.utime(path, (t, t))
        except (TypeError, ValueError):
            pass
    return Download(copyfiles.SourceItem(path, name), h.hexdigest())


def build(plan: Plan, store: Store, opts: BuildOptions) -> str:
    """Run the plan; return the image id."""
    start = time.monotonic()
    image_id = Executor(plan, store, opts).run()
    if not opts.quiet:
        print(f"--> built in {time.monotonic() - start:.2f}s", file=sys.stderr)
    return image_id
