"""tests/envsim.py's environments are real: each shows the kernel behaviour of the place it recreates.

Every check is also run in the plain environment (EnvSpec()), where it must come out the other way, so
a recreation that silently did nothing fails here.
"""

from __future__ import annotations

import os
import stat

import pytest
from conftest import IS_ROOT, Runner
from envsim import DOCKER_CAP_MASK, EnvSim, EnvSpec

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not IS_ROOT, reason="envsim builds its environments as root")]

CLONE3 = 435  # x86_64 and the generic table (arm64, riscv) agree
PY = "/usr/bin/python3"
MOUNT = "import ctypes; c=ctypes.CDLL(None,use_errno=True); c.mount(b'x',b'/mnt',b'tmpfs',0,None); "
MOUNT += "print(ctypes.get_errno())"


def status(env: EnvSim, key: str, user: Runner | None = None) -> str:
    res = env.run(["grep", f"^{key}:", "/proc/self/status"], user=user)
    assert res.returncode == 0, res.stderr
    return res.stdout.split(":", 1)[1].strip()


def test_masked_proc(rb: Runner) -> None:
    script = "unshare -Urmpf --mount-proc true"
    with EnvSim(EnvSpec()) as plain:
        assert plain.run(["sh", "-c", script], user=rb).returncode == 0
    with EnvSim(EnvSpec(masked_proc=True)) as env:
        res = env.run(["sh", "-c", script], user=rb)
        assert res.returncode != 0 and "Operation not permitted" in res.stderr
        # /proc/keys is /dev/null now, /proc/acpi an empty read-only tmpfs, /proc/sys read-only
        res = env.run(["stat", "-c", "%t:%T %s", "/proc/keys", "/proc/timer_list"], user=rb)
        assert res.stdout.split("\n")[:2] == ["1:3 0", "1:3 0"], res.stdout
        res = env.run(["sh", "-c", "grep -E ' /proc/(sys|acpi) ' /proc/self/mountinfo"], user=rb)
        lines = res.stdout.splitlines()
        assert len(lines) == 2 and all(" ro," in ln or " ro " in ln for ln in lines), lines
        # its own pid namespace: the command is pid 2, after the launcher's init
        assert env.run(["sh", "-c", "echo $$"], user=rb).stdout.strip() == "2"


def test_docker_caps(tmp_path: str) -> None:
    with EnvSim(EnvSpec(docker_caps=True)) as env:
        assert int(status(env, "CapEff"), 16) == DOCKER_CAP_MASK
        assert int(status(env, "CapBnd"), 16) == DOCKER_CAP_MASK
        assert env.run(["id", "-u"]).stdout.strip() == "0"
        res = env.run(["unshare", "-m", "true"])  # no CAP_SYS_ADMIN: not even a mount namespace
        assert res.returncode != 0 and "Operation not permitted" in res.stderr
        victim = os.path.join(str(tmp_path), "f")
        open(victim, "w").close()
        assert env.run(["chown", "1234:1234", victim]).returncode == 0  # CAP_CHOWN stays
        assert os.stat(victim).st_uid == 1234
    with EnvSim(EnvSpec()) as plain:
        assert int(status(plain, "CapEff"), 16) & (1 << 21)  # CAP_SYS_ADMIN
        assert plain.run(["unshare", "-m", "true"]).returncode == 0


def test_seccomp_no_userns(rb: Runner) -> None:
    clone3 = f"import ctypes,os; c=ctypes.CDLL(None,use_errno=True); c.syscall({CLONE3},0,0); print(ctypes.get_errno())"
    with EnvSim(EnvSpec(seccomp_no_userns=True)) as env:
        for user in (rb, None):
            res = env.run(["unshare", "-U", "true"], user=user)
            assert res.returncode != 0 and "Operation not permitted" in res.stderr
        assert status(env, "Seccomp", rb) == "2"
        assert status(env, "NoNewPrivs", rb) == "0"  # docker does not set it
        assert env.run([PY, "-c", clone3], user=rb).stdout.strip() == "38"  # ENOSYS
        assert env.run(["unshare", "-m", "true"]).returncode == 0  # only user namespaces are refused
    with EnvSim(EnvSpec()) as plain:
        assert plain.run(["unshare", "-U", "true"], user=rb).returncode == 0
        assert plain.run([PY, "-c", clone3], user=rb).stdout.strip() != "38"


def test_no_new_privs(rb: Runner) -> None:
    mapped = ["unshare", "-U", "--map-auto", "--map-root-user", "cat", "/proc/self/uid_map"]
    with EnvSim(EnvSpec(no_new_privs=True)) as env:
        assert status(env, "NoNewPrivs", rb) == "1"
        res = env.run(mapped, user=rb)
        assert res.returncode != 0 and "newuidmap" in res.stderr
    with EnvSim(EnvSpec()) as plain:
        assert plain.run(mapped, user=rb).returncode == 0


def test_userns_no_mount(rb: Runner) -> None:
    with EnvSim(EnvSpec(userns_no_mount=True)) as env:
        assert env.run(["unshare", "-Ur", "true"], user=rb).returncode == 0
        res = env.run(["unshare", "-Urm", "--propagation=unchanged", PY, "-c", MOUNT], user=rb)
        assert res.stdout.strip() == "1", res.stderr  # EPERM
    with EnvSim(EnvSpec()) as plain:
        res = plain.run(["unshare", "-Urm", "--propagation=unchanged", PY, "-c", MOUNT], user=rb)
        assert res.stdout.strip() == "0", res.stderr


def test_store_on_overlay(rb: Runner) -> None:
    with EnvSim(EnvSpec(store_on_overlay=True)) as env:
        env.own_overlay(rb)
        assert env.run(["stat", "-f", "-c", "%T", env.overlay_dir], user=rb).stdout.strip() == "overlayfs"
        assert env.run(["touch", f"{env.overlay_dir}/kept"], user=rb).returncode == 0
        # the mount lives only in the command's namespace; the upper dir keeps the data between runs
        assert not os.path.ismount(env.overlay_dir)
        assert os.path.exists(os.path.join(env.base, "upper", "kept"))
        assert env.run(["test", "-e", f"{env.overlay_dir}/kept"], user=rb).returncode == 0
        base = env.base
    assert not os.path.exists(base)


def test_runtime_dir_taken(rb: Runner) -> None:
    path = f"/tmp/rbuild-{rb.uid}"
    before = os.lstat(path) if os.path.lexists(path) else None
    with EnvSim(EnvSpec(runtime_dir_taken=True, taken_uid=rb.uid)) as env:
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 65534
        assert env.run(["stat", "-c", "%u", path], user=rb).stdout.strip() == "65534"
    if before is None:
        assert not os.path.lexists(path)
    else:
        assert os.lstat(path).st_ino == before.st_ino


def test_small_range() -> None:
    with EnvSim(EnvSpec()) as env:
        user = env.make_user(subids=1000)
        with open("/etc/subuid") as f:
            assert [ln.split(":")[2].strip() for ln in f if ln.startswith(user.name + ":")] == ["1000"]
        res = env.run(["unshare", "-U", "--map-auto", "--map-root-user", "cat", "/proc/self/uid_map"], user=user)
        assert res.returncode == 0, res.stderr
        assert sum(int(ln.split()[2]) for ln in res.stdout.splitlines()) == 1000  # root's own uid + 999
        name = user.name
    with open("/etc/subuid") as f:
        assert not any(ln.startswith(name + ":") for ln in f)
    assert not os.path.exists(f"/home/{name}")


def test_max_user_namespaces_zero(rb: Runner) -> None:
    with open("/proc/sys/user/max_user_namespaces") as f:
        host = f.read()
    with EnvSim(EnvSpec(max_userns_zero=True)) as env:
        assert env.run(["cat", "/proc/sys/user/max_user_namespaces"], user=rb).stdout.strip() == "0"
        assert env.run(["cat", "/proc/self/uid_map"], user=rb).stdout.split() == ["0", "0", "4294967295"]
        res = env.run(["unshare", "-U", "true"], user=rb)
        assert res.returncode != 0 and "No space left on device" in res.stderr
    with open("/proc/sys/user/max_user_namespaces") as f:
        assert f.read() == host  # the host's sysctl never changed
