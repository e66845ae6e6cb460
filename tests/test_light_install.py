"""The light install: `cmscale results`, `fit` and `report` run where torch is not installed.

Each command runs in a subprocess whose import system cannot find torch, torchvision,
torch-fidelity or scikit-learn (a sitecustomize on PYTHONPATH hides them the way a venv without
the `train` extra lacks them), on a real store built from real run folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_sweep import SWEEP, build_sweep

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("torch", "torchvision", "torch_fidelity", "sklearn")

# Hides the train extra's packages: find_spec answers None and `import torch` raises
# ModuleNotFoundError, exactly as in an environment where they were never installed.
SITECUSTOMIZE = f'''
import sys
from importlib.machinery import PathFinder

HIDDEN = {set(HIDDEN)!r}


class HideTrainExtra(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [HideTrainExtra if finder is PathFinder else finder for finder in sys.meta_path]
'''


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """(run cmscale without torch, the results root of a stored synthetic sweep)."""
    base = tmp_path_factory.mktemp("light")
    (base / "site").mkdir()
    (base / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    root = base / "results"
    build_sweep(root)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(base / "site"), str(REPO)]),
                        "OMP_NUM_THREADS": "1", "CMSCALE_NUM_THREADS": "1"}

    def cmscale(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from cmscale.cli import main; main()", *args],
                              capture_output=True, text=True, env=env, cwd=base, timeout=600)

    return cmscale, root


def test_the_blocker_hides_torch(light):
    cmscale, _ = light
    # `train` needs torch: the light install says which extra to install instead of a traceback.
    answer = cmscale("train", str(REPO / "examples" / "train_digits_edm.toml"))
    assert answer.returncode == 1, answer.stderr
    assert "pip install 'cmscale[train]'" in answer.stderr
    assert "Traceback" not in answer.stderr


def test_results_fit_and_report_run_without_torch(light, tmp_path):
    cmscale, root = light
    ingested = cmscale("results", "ingest", "--root", str(root))
    assert ingested.returncode == 0, ingested.stderr
    query = cmscale("results", "query", "--root", str(root), "--format", "json",
                    f"SELECT count(*) AS runs FROM runs WHERE sweep = '{SWEEP}'")
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout) == [{"runs": 29}]
    fit = cmscale("fit", "powerlaw", "--root", str(root), "--sweep", SWEEP, "--metric", "fid_2step",
                  "--n-draws", "0", "--json")
    assert fit.returncode == 0, fit.stderr
    assert {entry["method"] for entry in json.loads(fit.stdout)} == {"edm", "ect", "scd"}
    report = cmscale("report", SWEEP, "--root", str(root), "--out", str(tmp_path / "report"), "--n-draws", "0",
                     "--no-ingest")
    assert report.returncode == 0, report.stderr
    findings = json.loads((tmp_path / "report" / "report.json").read_text())
    assert findings["sweep"] == SWEEP
    assert (tmp_path / "report" / "report.html").is_file()


def test_sweep_status_runs_without_torch(light):
    cmscale, root = light
    runs = [{"run_id": folder.name, "config": json.loads((folder / "config.json").read_text())}
            for folder in sorted((root / SWEEP).iterdir()) if (folder / "config.json").is_file()]
    (root / SWEEP / "sweep.json").write_text(json.dumps({"sweep": SWEEP, "runs": runs}))
    status = cmscale("sweep", "status", SWEEP, "--root", str(root), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"] == {"done": 28, "failed": 1}


def test_every_imported_package_is_declared_in_pyproject():
    """Each third-party module that cmscale imports belongs to a distribution that pyproject.toml
    declares (in the base dependencies or an extra): nothing works only because torch brought it."""
    import ast
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [req for extra in project["optional-dependencies"].values()
                                              for req in extra]
    declared = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-") for req in requirements}
    distributions = importlib.metadata.packages_distributions()
    imported: dict[str, str] = {}
    for path in (REPO / "cmscale").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top != "cmscale" and top not in sys.stdlib_module_names:
                    imported.setdefault(top, str(path.relative_to(REPO)))
    undeclared = {module: where for module, where in imported.items()
                  if not {dist.lower().replace("_", "-") for dist in distributions.get(module, [])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
