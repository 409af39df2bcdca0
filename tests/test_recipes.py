"""The CI and cluster recipes in examples/ci validate offline against their engines' schemas.

(tests/test_selfhost.py runs each recipe's build command inside rbuild's own image.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ci")
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.unit


def _load(name: str) -> dict:
    with open(os.path.join(RECIPES, name)) as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize(
    ("name", "schema"), [("gitlab-ci.yml", "gitlab-ci"), ("github-actions.yml", "github-workflows")]
)
def test_ci_recipes_match_the_vendor_schemas(name: str, schema: str) -> None:
    res = subprocess.run(
        [os.path.join(BIN, "check-jsonschema"), "--builtin-schema", f"vendor.{schema}", os.path.join(RECIPES, name)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", ["kubernetes-job.yaml", "kubernetes-job-userns.yaml"])
def test_kubernetes_jobs_validate_strictly(name: str) -> None:
    res = subprocess.run(
        [os.path.join(BIN, "kubernetes-validate"), "--strict", os.path.join(RECIPES, name)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed" in res.stdout + res.stderr


def _params_used(text: str, prefix: str) -> set[str]:
    import re

    return set(re.findall(re.escape(prefix) + r"([A-Za-z0-9_.-]+?)\)", text))


def test_tekton_task_is_well_formed() -> None:
    """No published schema is available offline for Tekton's CRDs: the fields its controller requires."""
    doc = _load("tekton-task.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("tekton.dev/v1", "Task")
    spec = doc["spec"]
    declared = {p["name"] for p in spec["params"]}
    assert all(p.get("type", "string") in ("string", "array", "object") for p in spec["params"])
    text = yaml.safe_dump(spec)
    assert _params_used(text, "$(params.") <= declared
    assert _params_used(text, "$(results.") <= {r["name"] + ".path" for r in spec["results"]}
    assert _params_used(text, "$(workspaces.") <= {w["name"] + ".path" for w in spec["workspaces"]}
    for step in spec["steps"]:
        assert step["name"] and step["image"]
        assert ("script" in step) != ("command" in step)  # Tekton refuses both
        assert step["script"].startswith("#!")


def test_shipwright_strategy_is_well_formed() -> None:
    doc = _load("shipwright-strategy.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("shipwright.io/v1beta1", "ClusterBuildStrategy")
    spec = doc["spec"]
    builtin = {"shp-source-root", "shp-source-context", "shp-output-image", "shp-output-insecure"}
    declared = {p["name"] for p in spec["parameters"]} | builtin
    text = yaml.safe_dump(spec)
    assert _params_used(text, "$(params.") <= declared
    assert _params_used(text, "$(results.") <= {"shp-image-digest.path", "shp-image-size.path"}
    for step in spec["steps"]:
        assert step["name"] and step["image"] and step["command"]
