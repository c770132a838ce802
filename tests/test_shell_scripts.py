"""benchmark/*.sh after README's install (python3 -m venv .venv; .venv/bin/pip install ...; the virtualenv is made,
not activated): each finds the repository's .venv/bin/python, and each of its launcher calls is a valid grid. A file
of its own, so that the suite's two workers share the load (pytest -n 2 --dist loadfile)."""

import contextlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import tyro

from conftest import ROOT

# the scripts that hand their arguments to the launcher (gpu_check.sh and gpu_wheels.sh: tests/test_gpu_check.py)
LAUNCHING_SCRIPTS = sorted(p.name for p in (ROOT / "benchmark").glob("*.sh") if not p.name.startswith("gpu_"))

# stands in for the Python tools the scripts call: records which Python ran it, and with which arguments
RECORDER = """import json, sys
with open({record!r}, "a") as f:
    f.write(json.dumps([{tool!r}, sys.executable, sys.argv[1:]]) + "\\n")
print("# 0 runs: 0 new, 0 to resume, 0 finished")
"""


def real_launcher():
    spec = importlib.util.spec_from_file_location("shell_scripts_launch", ROOT / "benchmark" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the tests run outside a virtualenv")
def test_shell_scripts_find_the_virtualenv_of_readme(tmp_path, monkeypatch):
    """Each benchmark/*.sh with --dry-run, from a shell whose PATH has no virtualenv and no PYTHON set, as after
    README's install: every tool it calls runs on the repository's .venv/bin/python. The scripts are copied into a
    repository of their own whose .venv is this virtualenv and whose tools record their calls (a real launcher per
    call would import torch some twenty times). Each recorded launcher call is then a valid grid: the real
    launcher's dry run, in this process, lists its runs and writes nothing."""
    repo = tmp_path / "repo"
    (repo / "benchmark").mkdir(parents=True)
    record = tmp_path / "calls.jsonl"
    for name in LAUNCHING_SCRIPTS:
        shutil.copy(ROOT / "benchmark" / name, repo / "benchmark" / name)
    tools = sorted(
        {m for p in LAUNCHING_SCRIPTS for m in re.findall(r"benchmark/(\w+\.py)", (ROOT / "benchmark" / p).read_text())}
    )
    assert "launch.py" in tools and "plot.py" in tools
    for tool in tools:
        (repo / "benchmark" / tool).write_text(RECORDER.format(record=str(record), tool=tool))
    (repo / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8"}
    calls = {}
    for name in LAUNCHING_SCRIPTS:
        record.unlink(missing_ok=True)
        done = subprocess.run(
            [shutil.which("bash"), str(repo / "benchmark" / name), "--dry-run"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        calls[name] = [json.loads(line) for line in record.read_text().splitlines()]
        assert [tool for tool, _, _ in calls[name]].count("launch.py") >= 1, name
        for tool, python, _ in calls[name]:
            assert python == f"{repo}/.venv/bin/python", f"{name} ran {tool} with {python}"

    launch = real_launcher()
    monkeypatch.chdir(repo)
    for name, script_calls in calls.items():
        for tool, _, argv in script_calls:
            if tool != "launch.py":
                continue
            assert "--dry-run" in argv, f"{name}: {argv}"
            args, unknown = tyro.cli(launch.Args, args=argv, return_unknown_args=True)
            args.extra = list(unknown)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                launch.main(args)
            assert re.search(r"^# [1-9]\d* runs: [1-9]\d* new", printed.getvalue(), re.M), f"{name}: {argv}"
    assert not list(repo.glob("**/runs")), "a dry run writes nothing"
