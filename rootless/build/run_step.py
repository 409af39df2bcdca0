"""RUN: the step's tree from the strategy's rootfs driver, the sandbox plan, --mount sources, the exit status.

A RUN's mounts (bind from the context or another stage, cache, tmpfs, secret) are resolved to host
paths next to the tree; secrets live on a tmpfs of the build's own mount namespace and never reach a
layer, the config or the cache key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import stat
import tempfile
from typing import Any

from rootless.build import copyfiles
from rootless.build.state import StageState, env_dict
from rootless.build.step import Step
from rootless.errors import RbuildError, RunFailed
from rootless.events import Output
from rootless.frontend import instructions as ins
from rootless.kernel.fspath import clean_abs, secure_join
from rootless.sandbox import spec as sandbox


class RunStep(Step[ins.RunCmd]):
    def describe(self, cmd: ins.RunCmd) -> str:
        return "RUN " + " ".join(self.run_argv(cmd)[0]) + " # buildkit"

    def run_argv(self, cmd: ins.RunCmd) -> tuple[list[str], bytes | None]:
        """argv (and stdin) for a RUN, following BuildKit's heredoc rules."""
        shell = self.ex.current_shell
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

    def cache_extra(self, state: StageState, cmd: ins.RunCmd) -> object:
        mounts = self.mount_key(cmd) if cmd.mounts else None
        network = self.network(cmd)
        return mounts if network == "host" else [mounts, network]  # keys of host-network RUNs stay as they were

    def network(self, cmd: ins.RunCmd) -> str:
        """The RUN's network: its own --network, else the build's (`default` is the build's, as in BuildKit)."""
        if cmd.network in (None, "default"):
            return self.ex.opts.network
        return cmd.network

    def mount_key(self, cmd: ins.RunCmd) -> list[Any]:
        """What RUN --mount adds to the cache key: bind sources' content, never a secret's value."""
        out: list[Any] = []
        for m in cmd.mount_specs():
            if m.type == "bind":
                kind, layer_list = self.ex.source_of(m.from_, cmd)
                if kind in ("context", "dir"):
                    h = hashlib.sha256()
                    what = f"{self.ex.plan.filename}:{cmd.node.start_line}: RUN --mount"
                    root = self.ex.plan.context if kind == "context" else (layer_list or [""])[0]
                    rules = self.ex.ignore_rules if kind == "context" else []
                    items = copyfiles.select(root, m.source or ".", rules, what)
                    copyfiles.hash_sources(items, root, rules, h, self.ex.file_digests)
                    out.append(["bind", m.source, m.target, m.readonly, h.hexdigest()])
                else:
                    out.append(["bind", m.source, m.target, m.readonly, kind, layer_list])
            else:
                out.append([m.type, m.cache_id, m.target, m.source, m.mode, m.uid, m.gid, m.size, m.env])
        self.ex.file_digests.save()
        return out

    def prepare_mounts(
        self, cmd: ins.RunCmd, stack: contextlib.ExitStack, merged: str, env: dict[str, str], scratch: str, workdir: str
    ) -> list[sandbox.MountSpec]:
        """Resolve RUN --mount specs to host paths (views mounted next to the tree at merged, kept open by
        stack), each target checked to be a place a mount point can be made."""
        mnt = os.path.dirname(merged)
        specs: list[sandbox.MountSpec] = []
        what = f"{self.ex.plan.filename}:{cmd.node.start_line}: RUN --mount"
        ssh_count = 0
        for i, m in enumerate(cmd.mount_specs()):
            target = clean_abs(m.target, workdir) if m.target else ""  # relative to WORKDIR, as BuildKit
            if target == "/":
                raise self.ex.err(cmd.node, "RUN --mount cannot be mounted on /")
            if m.type == "bind":
                if not target:
                    raise self.ex.err(cmd.node, "RUN --mount=type=bind needs a target")
                kind, layer_list = self.ex.source_of(m.from_, cmd)
                view = self.ex.plan.context if kind != "dir" else (layer_list or [""])[0]
                if kind not in ("context", "dir"):
                    view = self.ex.layers_view(layer_list or [], os.path.join(mnt, f"from{i}"), stack)
                rules = self.ex.ignore_rules if kind == "context" else []
                item = copyfiles.select(view, m.source or ".", rules, what)[0]
                source = item.host
                if not os.path.isdir(source):
                    if not stat.S_ISREG(os.stat(source).st_mode):
                        raise self.ex.err(
                            cmd.node, f"RUN --mount: {m.source}: only a directory or a regular file can be bound"
                        )
                    if not m.readonly:  # BuildKit's rw: the RUN writes to a copy, thrown away after the step
                        source = os.path.join(scratch, f"file{i}")
                        copyfiles.copy_entry(item.host, source)
                layers = [source]
                mask = os.path.join(scratch, f"mask{i}")
                if (
                    rules
                    and os.path.isdir(source)
                    and copyfiles.write_mask(item, view, rules, mask, self.ex.strategy.layer_format)
                ):
                    layers = [mask, source]  # .dockerignore'd files stay hidden, as from COPY
                writable = not m.readonly and os.path.isdir(source)
                if writable or len(layers) > 1:
                    at = os.path.join(mnt, f"view{i}")
                    os.mkdir(at)
                    if writable:  # writes are kept apart and thrown away with the scratch dir
                        work = os.path.join(scratch, f"rw{i}")
                        os.mkdir(work, 0o700)
                        source = stack.enter_context(self.ex.driver.writable(layers, work, at)).path
                    else:
                        source = stack.enter_context(self.ex.driver.view(layers, at))
                specs.append(
                    sandbox.MountSpec("bind", target, source, m.readonly and True, is_file=not os.path.isdir(source))
                )
            elif m.type == "cache":
                if not target:
                    raise self.ex.err(cmd.node, "RUN --mount=type=cache needs a target")
                cid = m.cache_id or target
                d = os.path.join(self.ex.store.root, "cache-mounts", hashlib.sha256(cid.encode()).hexdigest()[:32])
                if not os.path.isdir(d):
                    os.makedirs(d, exist_ok=True)
                    os.chmod(d, m.mode if m.mode is not None else 0o755)
                    if not self.ex.recorded:
                        os.chown(d, m.uid or 0, m.gid or 0)
                if m.sharing == "locked":
                    import fcntl

                    lock = stack.enter_context(open(d + ".lock", "w"))
                    fcntl.flock(lock, fcntl.LOCK_EX)
                specs.append(sandbox.MountSpec("bind", target, d, readonly=m.readonly))
            elif m.type == "tmpfs":
                if not target:
                    raise self.ex.err(cmd.node, "RUN --mount=type=tmpfs needs a target")
                specs.append(sandbox.MountSpec("tmpfs", target, size=m.size))
            elif m.type == "secret":
                sid = m.cache_id or (os.path.basename(m.target) if m.target else None) or m.env or ""
                data = self.ex.opts.secrets.get(sid)
                if data is None:
                    if m.required:
                        raise self.ex.err(
                            cmd.node, f"secret {sid} is required but was not given (--secret id={sid},...)"
                        )
                    continue
                if m.env:
                    env[m.env] = data.decode(errors="replace")
                    if not m.target:
                        continue
                copy = os.path.join(self.secret_dir(stack, mnt), f"secret{i}")
                with open(copy, "wb") as f:
                    f.write(data)
                os.chmod(copy, m.mode if m.mode is not None else 0o400)
                if not self.ex.recorded:
                    os.chown(copy, m.uid or 0, m.gid or 0)
                specs.append(sandbox.MountSpec("bind", target or f"/run/secrets/{sid}", copy, True, is_file=True))
            elif m.type == "ssh":
                # BuildKit (client/llb/exec.go AddSSHSocket): the agent's socket at /run/buildkit/ssh_agent.N
                # unless a target is given, SSH_AUTH_SOCK naming the first; a missing id is an error only when
                # required. The socket is bound for the RUN alone: its mount point is removed afterwards.
                sid = m.cache_id or "default"
                sock = self.ex.opts.ssh.get(sid)
                if sock is None:
                    if m.required:
                        raise self.ex.err(cmd.node, f"no SSH agent {sid} was given (--ssh {sid}[=SOCKET|KEY])")
                    continue
                target = target or f"/run/buildkit/ssh_agent.{ssh_count}"
                if ssh_count == 0:
                    env["SSH_AUTH_SOCK"] = target
                ssh_count += 1
                specs.append(sandbox.MountSpec("bind", target, sock, readonly=False, is_file=True))
            else:
                raise self.ex.err(cmd.node, f"RUN --mount=type={m.type} is not supported")
        for spec in specs:
            fault = _mount_point_fault(merged, spec.target)
            if fault:
                raise self.ex.err(cmd.node, f"RUN --mount target {spec.target}: {fault}")
        return specs

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

    def apply(self, state: StageState, cmd: ins.RunCmd) -> bool:
        run_args = self.ex.run_args(state)
        env = dict(run_args)
        env.update(env_dict(state.config))
        argv, script = self.run_argv(cmd)
        status = 0

        def action(merged: str, scratch: str) -> None:
            nonlocal status
            c = state.config["config"]
            try:
                user = sandbox.resolve_user(merged, c.get("User") or "0")
            except RbuildError as e:
                raise self.ex.err(cmd.node, str(e)) from None
            emulate = self.ex.strategy.isolation == "userns-single"
            if emulate:  # the supervisor emulates USER and records owners (sandbox.notify)
                self.ex.emulated_owner = (user.uid, user.gid)
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
                    namespaces=self.ex.strategy.isolation != "none-privileged",
                    emulate=emulate,
                    lowers=self.ex.store.layer_dirs(state.layers) if emulate else [],
                    upper=self.ex.step_upper,
                    records=self.ex.store.layers_hold_records(state.layers) if emulate else None,
                    network=self.network(cmd),
                    cancel_fd=self.ex.cancel_fd,
                )
                if self.ex.opts.quiet:
                    with tempfile.TemporaryFile() as out:
                        spec.output_fd = out.fileno()
                        status = self.sandbox_run(merged, spec, scratch, cmd)
                        if status != 0:  # quiet: a failed RUN's output is shown after all
                            out.seek(0)
                            while chunk := out.read(65536):
                                self.ex.reporter.emit(Output(chunk))
                else:
                    fd = self.ex.reporter.output_fd
                    if fd is None:
                        spec.output = lambda data: self.ex.reporter.emit(Output(data))
                    else:
                        spec.output_fd = fd
                    status = self.sandbox_run(merged, spec, scratch, cmd)
            if status != 0:
                shown = " ".join(shlex.quote(a) for a in argv) if not cmd.shell_form else " ".join(argv)
                raise RunFailed(
                    f'{self.ex.plan.filename}:{cmd.node.start_line}: RUN: process "{shown}" did not '
                    f"complete successfully: exit code: {status}",
                    status,
                )

        return self.ex.with_rootfs(state, action, untrusted=True)

    def sandbox_run(self, merged: str, spec: sandbox.RunSpec, scratch: str, cmd: ins.RunCmd) -> int:
        try:
            return sandbox.run(merged, spec, scratch, self.ex.touched, self.ex.log if self.ex.opts.debug else None)
        except RbuildError as e:
            raise self.ex.err(cmd.node, str(e)) from None
        finally:
            for w in dict.fromkeys(spec.warnings):  # loud even with -q: the image may differ from a subuid build
                self.ex.warn(f"WARNING: {self.ex.plan.filename}:{cmd.node.start_line}: RUN: {w}")


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
