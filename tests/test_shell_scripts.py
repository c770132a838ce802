"""benchmark/*.sh after README's install (python3 -m venv .venv; .venv/bin/pip install ...; the virtualenv is made,
not activated): each finds the repository's .venv/bin/python. A file of its own, so that the suite's two workers
share the load (pytest -n 2 --dist loadfile)."""

import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# the scripts that hand their arguments to the launcher (gpu_check.sh and gpu_wheels.sh: tests/test_gpu_check.py)
LAUNCHING_SCRIPTS = sorted(p.name for p in (ROOT / "benchmark").glob("*.sh") if not p.name.startswith("gpu_"))


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests run outside a virtualenv")
def test_shell_scripts_find_the_virtualenv_of_readme(tmp_path):
    """Each benchmark/*.sh with --dry-run, from a shell whose PATH has no virtualenv and no PYTHON set, as after
    README's install (python3 -m venv .venv; .venv/bin/pip install ...): it runs the launcher with the repository's
    .venv/bin/python. The scripts are copied into a repository of their own whose .venv is this virtualenv."""
    repo = tmp_path / "repo"
    (repo / "benchmark").mkdir(parents=True)
    for name in LAUNCHING_SCRIPTS:
        shutil.copy(ROOT / "benchmark" / name, repo / "benchmark" / name)
    for name in ("launch.py", "plot.py"):
        (repo / "benchmark" / name).symlink_to(ROOT / "benchmark" / name)
    (repo / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8"}
    procs = {
        name: subprocess.Popen(
            [shutil.which("bash"), str(repo / "benchmark" / name), "--dry-run"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in LAUNCHING_SCRIPTS
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {out}"
        assert re.search(r"^# \d+ runs: \d+ new", out, re.M), f"{name}: {out}"
        assert f"{repo}/.venv/bin/python " in out, f"{name}: {out}"  # the commands name the virtualenv's Python
    assert not list(repo.glob("**/runs")), "a dry run writes nothing"
