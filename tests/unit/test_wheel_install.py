"""The wheel is the whole package: built from the repository and installed into a fresh
virtual environment outside it, `infercept --help`, `infercept sim` and the policy run.

The fresh environment sees the project environment's installed dependencies (vLLM, torch,
matplotlib) through a .pth line naming that site-packages folder. A .pth line only adds its
folder to sys.path (the .pth files inside that folder are not run), so the editable install
there, whose .pth installs a finder mapping ``infercept`` to the repository, stays inert;
the fresh site-packages comes first on sys.path, so its copy of ``infercept`` is the one
imported. Both are checked, as is that no folder of the repository is on sys.path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Not part of a source distribution: the working tree's environments, builds and outputs.
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "results",
               ".pytest_cache", ".hypothesis", ".whl")
TIMEOUT_S = 600  # a hang fails the test rather than holding it; far above the need

WHERE_FROM = """
import json, sys
import infercept, infercept.bench.workload, infercept.policy, infercept.sim.runner
print(json.dumps({"file": infercept.__file__, "path": sys.path,
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] == "benchmarks")}))
"""


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, (command, result.stdout[-4000:], result.stderr[-4000:])
    return result


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A virtual environment outside the repository with only the wheel installed."""
    root = tmp_path_factory.mktemp("wheel-install")
    assert not _inside(root, REPO), f"{root} must lie outside the repository"
    # Built from a copy, so the build writes nothing (build/, egg-info) into the working tree.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(root / "dist"), str(source)], cwd=root)
    (wheel,) = (root / "dist").glob("infercept-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "-q", str(wheel)], cwd=root)
    fresh_site = Path(_run([str(python), "-c", "import sysconfig; "
                            "print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    project_site = Path(sysconfig.get_paths()["purelib"])
    assert not _inside(fresh_site, project_site) and _inside(fresh_site, venv)
    (fresh_site / "_infercept_project_dependencies.pth").write_text(f"{project_site}\n")
    shutil.rmtree(source)  # nothing of the sources is left to import from
    (root / "work").mkdir()
    return venv


@pytest.mark.slow
def test_the_installed_package_imports_from_the_fresh_environment_only(fresh_venv):
    work = fresh_venv.parent / "work"
    found = json.loads(_run([str(fresh_venv / "bin" / "python"), "-c", WHERE_FROM],
                            cwd=work).stdout)
    assert _inside(Path(found["file"]), fresh_venv), found["file"]
    for entry in found["path"]:
        assert not _inside(Path(entry or work), REPO) or _inside(Path(entry), REPO / ".venv"), \
            f"the repository is on sys.path: {entry}"
    assert found["modules"] == []  # the package needs nothing from the repository's benchmarks


@pytest.mark.slow
def test_the_console_script_and_the_simulator_run_from_the_wheel(fresh_venv):
    work = fresh_venv.parent / "work"
    infercept = str(fresh_venv / "bin" / "infercept")
    assert "sim" in _run([infercept, "--help"], cwd=work).stdout

    out = work / "sim-out"
    result = _run([infercept, "sim", "--profile", "gptj-6b-a100", "--workload", "mix",
                   "--rates", "1", "--duration-s", "20", "--policies", "vllm,min-waste",
                   "--out", str(out), "--quiet"], cwd=work)
    assert f"wrote {out}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"vllm", "min-waste"}
    for entry in summary["policies"].values():
        (run,) = entry["runs"]
        assert run["num_requests"] > 0 and run["num_completed"] == run["num_requests"]
    for name in ("summary.md", "sim_stats.json", "latency_vs_rate.png", "recompute_waste.png"):
        assert (out / name).stat().st_size > 0
