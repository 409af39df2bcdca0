"""rbuild's own image: the repository's Containerfile builds with rbuild (as an unprivileged user, from a
Debian base made here with debootstrap), and the image it makes builds images (with RUN) as its user `build`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import yaml
from conftest import Runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# a container of the image, made by hand: its root by pivot_root (a chroot would forbid user namespaces),
# a fresh /proc, the host's /dev, a private /tmp; then the image's own setpriv drops to its user `build`
INSIDE = """set -e
R=$1
mount --make-rprivate /
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
cd "$R"
mkdir -p .old
pivot_root . .old
cd /
umount -l /.old
rmdir /.old
shift
exec env -i PATH=/opt/rbuild/bin:/usr/sbin:/usr/bin:/sbin:/bin RBUILD_ROOT=/var/lib/rbuild HOME=/home/build "$@"
"""


def _ca_secret(rb: Runner) -> list[str]:
    """This machine reaches PyPI through a proxy whose CA only the host trusts: the Containerfile's hook."""
    found = [p for p in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt") if p and os.path.isfile(p)]
    if not found:
        return []
    bundle = found[0]
    copy = os.path.join(rb.mkdir(), "ca-bundle.crt")
    shutil.copy(bundle, copy)
    rb.own(copy)
    return ["--secret", f"id=ca-bundle,src={copy}"]


def _context(rb: Runner) -> str:
    ctx = rb.mkdir()
    for name in ("Containerfile", "pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(os.path.join(REPO, name), ctx)
    for name in ("rootless", "csrc"):
        shutil.copytree(
            os.path.join(REPO, name),
            os.path.join(ctx, name),
            ignore=shutil.ignore_patterns("__pycache__", "*.o", "libexec"),
        )
    rb.own(ctx)
    return ctx


@pytest.fixture(scope="module")
def own_image(rb: Runner, busybox: str, debian_layout: str) -> Iterator[str]:
    """The repository's Containerfile built by rbuild as `rb`; yields the image's unpacked root filesystem,
    with a busybox layout at /home/build/busybox for builds inside it."""
    root = rb.fresh_root()
    res = rb.run(
        "build",
        "-q",
        "--build-arg",
        f"BASE=oci:{debian_layout}",
        *_ca_secret(rb),
        "-t",
        "rbuild-self",
        _context(rb),
        root=root,
        timeout=1500,
    )
    image = res.stdout.strip().splitlines()[-1]
    config = rb.run("inspect", image, root=root).stdout
    assert '"User": "build"' in config and '"RBUILD_ROOT=/var/lib/rbuild"' in config
    out = rb.mkdir()
    rb.run("push", "rbuild-self", f"oci:{out}/layout:self", root=root)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        rootfs = os.path.join(tmp, "rootfs")
        subprocess.run(["umoci", "raw", "unpack", "--image", f"{out}/layout:self", rootfs], check=True)
        shutil.copytree(busybox, os.path.join(rootfs, "home/build/busybox"))
        yield rootfs


def _inside(
    rootfs: str, argv: list[str], env: dict[str, str] | None = None, nnp: bool = False
) -> subprocess.CompletedProcess:
    """Run argv in a container of the image as its user `build` (uid 1000); `nnp`: with no_new_privs, as a
    pod with allowPrivilegeEscalation: false runs it."""
    subprocess.run(["chown", "-R", "1000:1000", os.path.join(rootfs, "home/build")], check=True)
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    drop = ["setpriv", "--reuid=1000", "--regid=1000", "--init-groups", *(["--no-new-privs"] if nnp else [])]
    return subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", INSIDE, "inside", rootfs]
        + [*extra, *drop, *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _app(rootfs: str) -> str:
    ctx = os.path.join(rootfs, "home/build/app")
    os.makedirs(ctx, exist_ok=True)
    with open(os.path.join(ctx, "Containerfile"), "w") as f:
        f.write("FROM oci:/home/build/busybox\nRUN echo built-inside > /inside && chown 7:7 /inside\n")
    return ctx


def test_own_image_builds_images(own_image: str) -> None:
    helper = os.path.join(own_image, "opt/rbuild/lib/python3.11/site-packages/rootless/libexec/rbuild-fuse-overlay")
    assert os.access(helper, os.X_OK)
    assert os.stat(os.path.join(own_image, "usr/bin/newuidmap")).st_mode & 0o4000  # setuid kept
    _app(own_image)
    inner = _inside(own_image, ["sh", "-c", "cd /home/build && rbuild build -q -t inner app"])
    assert inner.returncode == 0, inner.stderr
    assert inner.stdout.strip().startswith("sha256:")


RECIPES = os.path.join(REPO, "examples", "ci")


def _substitute(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace(k, v)
    assert "${{" not in text and "$(params." not in text and "$(results." not in text, text
    return text


def _recipe(name: str, registry: str) -> tuple[str, dict[str, str], bool]:
    """A recipe's shell script, its environment and whether it forbids privilege escalation, with the
    engine's placeholders filled in as the engine would (the registry is the test's)."""
    with open(os.path.join(RECIPES, name)) as f:
        doc = yaml.safe_load(f)
    image, cache = f"{registry}/app/{name.split('.')[0]}:1", f"{registry}/app/{name.split('.')[0]}:buildcache"
    if name == "gitlab-ci.yml":
        job = doc["build-image"]
        env = {"CI_REGISTRY": registry, "CI_REGISTRY_USER": "ci", "CI_REGISTRY_PASSWORD": "secret"}
        env |= {"IMAGE": image.rsplit(":", 1)[0], "TAG": "1"}
        return "\n".join(job["script"]), env, False
    if name == "github-actions.yml":
        job = doc["jobs"]["build"]
        values = {"${{ secrets.GITHUB_TOKEN }}": "token", "${{ github.actor }}": "ci", "ghcr.io": registry}
        script = _substitute("\n".join(s["run"] for s in job["steps"] if "run" in s), values)
        return script, {"IMAGE": image.rsplit(":", 1)[0], "TAG": "1"}, False
    if name.startswith("kubernetes-job"):
        pod = doc["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = {e["name"]: e["value"] for e in c["env"] if e["name"] != "REGISTRY_AUTH_FILE"}
        env |= {"IMAGE": image.rsplit(":", 1)[0], "TAG": "1"}
        return c["args"][0], env, c["securityContext"]["allowPrivilegeEscalation"] is False
    if name == "tekton-task.yaml":
        step = doc["spec"]["steps"][0]
        values = {"$(params.IMAGE)": image, "$(params.CACHE)": cache, "$(params.CONTEXT)": "."}
        values["$(results.IMAGE_DIGEST.path)"] = "/tmp/digest"
        env = {e["name"]: _substitute(e["value"], values) for e in step["env"]}
        return step["script"], env, step["securityContext"]["allowPrivilegeEscalation"] is False
    step = doc["spec"]["steps"][0]  # shipwright
    values = {"$(params.shp-source-context)": ".", "$(params.shp-output-image)": image}
    values |= {"$(params.cache-ref)": cache, "$(results.shp-image-digest.path)": "/tmp/digest"}
    env = {e["name"]: _substitute(e["value"], values) for e in step["env"]}
    return step["args"][1], env, step["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(RECIPES) if n.endswith((".yml", ".yaml"))))
def test_recipe_runs_inside_own_image(own_image: str, registry: str, name: str) -> None:
    script, env, nnp = _recipe(name, registry)
    home = os.path.join(own_image, "home/build")
    os.makedirs(os.path.join(home, ".config/containers"), exist_ok=True)
    with open(os.path.join(home, ".config/containers/registries.conf"), "w") as f:
        f.write(f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n')
    _app(own_image)
    env["RBUILD_ROOT"] = f"/var/lib/rbuild/{name}"  # each job's own store (a pod's emptyDir)
    res = _inside(own_image, ["sh", "-c", f"set -e\ncd /home/build/app\n{script}"], env, nnp)
    assert res.returncode == 0, res.stderr
    out = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=false",
            f"docker://{env['IMAGE']}" + ("" if ":" in env["IMAGE"].rsplit("/", 1)[-1] else ":1"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr + res.stdout + res.stderr
