"""The Python API (rootless/api.py): docs/api.md's examples run as the `rb` user, and the API's own
contracts (a light `import rootless`, events in the caller's process, typed errors)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import Runner

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")


def doc_script() -> str:
    with open(DOC) as f:
        return "\n".join(re.findall(r"```python\n(.*?)```", f.read(), re.S))


def test_the_documented_examples_run(rb: Runner, busybox: str) -> None:
    script = doc_script()
    assert script.count("rootless.build(") >= 4
    path = rb.write(os.path.join(rb.mkdir(), "api_examples.py"), script)
    python = os.path.join(os.path.dirname(rb.bin), "python")
    res = rb.sh(f"{python} {path}", env={"BASE": f"oci:{busybox}", "RBUILD_ROOT": rb.fresh_root()})
    # the prints: the RUN step's text, the image's command (busybox's), the failing RUN's file and line
    assert res.stdout.splitlines() == ["RUN echo built by the API > /hello", "['sh']", "Containerfile:2"], res.stderr
    assert res.stderr == ""  # nothing below the command line prints


def test_import_rootless_is_light() -> None:
    """`import rootless` loads no builder, store or registry module; the first call does."""
    code = (
        "import sys, rootless\n"
        "heavy = [m for m in sys.modules if m.startswith('rootless.') or m in ('requests', 'pickle')]\n"
        "assert heavy == [], heavy\n"
        "assert callable(rootless.build) and 'rootless.api' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors_cross_the_process_boundary_with_their_fields() -> None:
    """The API pickles a child's error to the caller: subclasses keep their class and fields."""
    import pickle

    from rootless.errors import ContainerfileError, RbuildError, RunFailed

    for err in (RbuildError("plain", 3), ContainerfileError("bad", "Containerfile", 4), RunFailed("f:2: RUN", 7)):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.__dict__ == err.__dict__
        assert back.exit_code == err.exit_code
