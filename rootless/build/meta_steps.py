"""The instructions that change only the image config (no layer, no tree): one small handler each."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rootless.build.state import StageState, set_env
from rootless.build.step import Step
from rootless.frontend import instructions as ins
from rootless.kernel.fspath import clean_abs

if TYPE_CHECKING:
    from rootless.build.executor import Executor


def port(p: str) -> str:
    """PORT[/PROTO] as BuildKit records it: tcp by default, the protocol in lower case (convert_expose.go)."""
    number, _, proto = p.partition("/")
    return f"{number}/{(proto or 'tcp').lower()}"


class EnvStep(Step[ins.EnvCmd]):
    def describe(self, cmd: ins.EnvCmd) -> str:
        return "ENV " + " ".join(f"{k}={v}" for k, v in cmd.env)

    def apply(self, state: StageState, cmd: ins.EnvCmd) -> bool:
        for k, v in cmd.env:
            set_env(state.config, k, v)
        return False


class LabelStep(Step[ins.LabelCmd]):
    def describe(self, cmd: ins.LabelCmd) -> str:
        return "LABEL " + " ".join(f"{k}={v}" for k, v in cmd.labels)

    def apply(self, state: StageState, cmd: ins.LabelCmd) -> bool:
        c = state.config["config"]
        labels = dict(c.get("Labels") or {})
        labels.update(dict(cmd.labels))
        c["Labels"] = labels
        return False


class WorkdirStep(Step[ins.WorkdirCmd]):
    def describe(self, cmd: ins.WorkdirCmd) -> str:
        return f"WORKDIR {cmd.path}"

    def apply(self, state: StageState, cmd: ins.WorkdirCmd) -> bool:
        c = state.config["config"]
        # BuildKit's NormalizeWorkdir (util/system/path.go): an absolute path is kept as written
        # (`/var/lib/etcd/`), a relative one is joined to the current WORKDIR and cleaned
        path = cmd.path
        c["WorkingDir"] = path if path.startswith("/") else clean_abs(path, c.get("WorkingDir") or "/")
        if clean_abs(c["WorkingDir"]) != "/":
            # and the directory is made at once, owned by USER (dispatchWorkdir's llb.Mkdir)
            return self.ex.with_rootfs(state, lambda merged, scratch: None)
        return False


class UserStep(Step[ins.UserCmd]):
    def describe(self, cmd: ins.UserCmd) -> str:
        return f"USER {cmd.user}"

    def apply(self, state: StageState, cmd: ins.UserCmd) -> bool:
        state.config["config"]["User"] = cmd.user
        return False


class ExposeStep(Step[ins.ExposeCmd]):
    def describe(self, cmd: ins.ExposeCmd) -> str:
        return "EXPOSE map[" + " ".join(f"{port(p)}:{{}}" for p in cmd.ports) + "]"

    def apply(self, state: StageState, cmd: ins.ExposeCmd) -> bool:
        c = state.config["config"]
        ports = dict(c.get("ExposedPorts") or {})
        for p in cmd.ports:
            ports[port(p)] = {}
        c["ExposedPorts"] = ports
        return False


class VolumeStep(Step[ins.VolumeCmd]):
    def describe(self, cmd: ins.VolumeCmd) -> str:
        return "VOLUME " + json.dumps(cmd.volumes)

    def apply(self, state: StageState, cmd: ins.VolumeCmd) -> bool:
        c = state.config["config"]
        vols = dict(c.get("Volumes") or {})
        for v in cmd.volumes:
            if not v.strip():
                raise self.ex.err(cmd.node, "VOLUME specified can not be an empty string")
            vols[v] = {}
        c["Volumes"] = vols
        return False


class _ExecForm:
    """CMD and ENTRYPOINT: a shell form runs under the stage's SHELL at the time of the instruction."""

    ex: Executor

    def argv(self, cmd: ins.CmdCmd | ins.EntrypointCmd) -> list[str]:
        shell = self.ex.current_shell
        return list(cmd.args) if not cmd.shell_form else shell + [" ".join(cmd.args)]


class CmdStep(_ExecForm, Step[ins.CmdCmd]):
    def describe(self, cmd: ins.CmdCmd) -> str:
        return f"CMD {json.dumps(self.argv(cmd))}"

    def apply(self, state: StageState, cmd: ins.CmdCmd) -> bool:
        state.config["config"]["Cmd"] = self.argv(cmd)
        state.cmd_set = True
        return False


class EntrypointStep(_ExecForm, Step[ins.EntrypointCmd]):
    def describe(self, cmd: ins.EntrypointCmd) -> str:
        return f"ENTRYPOINT {json.dumps(self.argv(cmd))}"

    def apply(self, state: StageState, cmd: ins.EntrypointCmd) -> bool:
        c = state.config["config"]
        c["Entrypoint"] = self.argv(cmd)
        if not state.cmd_set:
            c.pop("Cmd", None)
        return False


class ShellStep(Step[ins.ShellCmd]):
    def describe(self, cmd: ins.ShellCmd) -> str:
        return f"SHELL {json.dumps(cmd.shell)}"

    def apply(self, state: StageState, cmd: ins.ShellCmd) -> bool:
        state.config["config"]["Shell"] = list(cmd.shell)
        return False


class StopsignalStep(Step[ins.StopsignalCmd]):
    def describe(self, cmd: ins.StopsignalCmd) -> str:
        return f"STOPSIGNAL {cmd.signal}"

    def apply(self, state: StageState, cmd: ins.StopsignalCmd) -> bool:
        state.config["config"]["StopSignal"] = cmd.signal
        return False


class HealthcheckStep(Step[ins.HealthcheckCmd]):
    def apply(self, state: StageState, cmd: ins.HealthcheckCmd) -> bool:
        hc: dict[str, object] = {"Test": list(cmd.test) if cmd.test else ["NONE"]}
        for name, val in (
            ("Interval", cmd.interval),
            ("Timeout", cmd.timeout),
            ("StartPeriod", cmd.start_period),
            ("StartInterval", cmd.start_interval),
            ("Retries", cmd.retries),
        ):
            if val:
                hc[name] = val
        state.config["config"]["Healthcheck"] = hc
        return False


class OnbuildStep(Step[ins.OnbuildCmd]):
    def describe(self, cmd: ins.OnbuildCmd) -> str:
        return f"ONBUILD {cmd.expression}"

    def apply(self, state: StageState, cmd: ins.OnbuildCmd) -> bool:
        c = state.config["config"]
        c["OnBuild"] = list(c.get("OnBuild") or []) + [cmd.expression]
        return False


class MaintainerStep(Step[ins.MaintainerCmd]):
    def describe(self, cmd: ins.MaintainerCmd) -> str:
        return f"MAINTAINER {cmd.maintainer}"

    def apply(self, state: StageState, cmd: ins.MaintainerCmd) -> bool:
        state.config["author"] = cmd.maintainer
        return False


def handlers(ex: Executor) -> dict[type[ins.Command], Step[Any]]:
    return {
        ins.EnvCmd: EnvStep(ex),
        ins.LabelCmd: LabelStep(ex),
        ins.WorkdirCmd: WorkdirStep(ex),
        ins.UserCmd: UserStep(ex),
        ins.ExposeCmd: ExposeStep(ex),
        ins.VolumeCmd: VolumeStep(ex),
        ins.CmdCmd: CmdStep(ex),
        ins.EntrypointCmd: EntrypointStep(ex),
        ins.ShellCmd: ShellStep(ex),
        ins.StopsignalCmd: StopsignalStep(ex),
        ins.HealthcheckCmd: HealthcheckStep(ex),
        ins.OnbuildCmd: OnbuildStep(ex),
        ins.MaintainerCmd: MaintainerStep(ex),
    }
