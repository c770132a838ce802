"""benchmark/gpu_check.sh and gpu_check.py (issue 19): what they write and how a step fails, without running
the check itself (its CPU dry run, `bash benchmark/gpu_check.sh OUT --cpu-dry-run`, takes minutes); and the
`device` fixture of conftest.py, whose dry-run mode runs the `cuda` cases on the CPU."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conftest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import gpu_check  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="3.25">
<testcase classname="tests.test_trxl" name="test_a[cuda]" time="0.1"/>
<testcase classname="tests.test_trxl" name="test_b[cuda]" time="0.1"/>
<testcase classname="tests.test_trxl" name="test_c[cuda]" time="0.1">
<failure message="AssertionError: step 3 output&#10;more">x</failure></testcase>
<testcase classname="tests.test_trxl" name="test_d[cuda]" time="0.1">
<error message="fixture failed">y</error></testcase>
<testcase classname="tests.test_trxl" name="test_e[cuda]" time="0.1"><skipped message="no CUDA"/></testcase>
</testsuite></testsuites>
"""


def test_pytest_summary_counts_and_names_the_failures(tmp_path):
    (tmp_path / "pytest.xml").write_text(JUNIT)
    summary = gpu_check.pytest_summary(tmp_path / "pytest.xml")
    assert {k: summary[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == {
        "tests": 5,
        "passed": 2,
        "failures": 1,
        "errors": 1,
        "skipped": 1,
    }
    assert summary["failed_tests"] == [
        {"test": "tests.test_trxl::test_c[cuda]", "message": "AssertionError: step 3 output"},
        {"test": "tests.test_trxl::test_d[cuda]", "message": "fixture failed"},
    ]


def throughput_json(path, label, gpu_memory):
    """A throughput.py results file as it writes one (the fields gpu_check reads)."""
    variant = {"sps": 500.0, "ratio_to_cnn_ppo": 1.0, "peak_rss_gb": 1.0}
    variants = {
        "env": dict(variant, sps=2000.0, ratio_to_cnn_ppo=4.0),
        "cnn-ppo": dict(variant, cuda_max_memory_gb=0.2),
        "shelm_ppo.py --n-layer 2": dict(variant, sps=400.0, ratio_to_cnn_ppo=0.8),
    }
    if gpu_memory:
        variants["shelm_ppo.py --n-layer 2"]["cuda_max_memory_gb"] = 2.5
    run = {"variants": variants, "steps_measured": 1536, "warmup_steps": 1536, "command": "python throughput.py"}
    path.write_text(json.dumps({"runs": {label: run}}))
    return path


def test_throughput_summary_reads_the_figures_and_checks_the_gpu_was_used(tmp_path):
    summary = gpu_check.throughput_summary(throughput_json(tmp_path / "t.json", "n2", True), "n2", cuda=True)
    assert summary["problems"] == []
    shelm = summary["variants"]["shelm_ppo.py --n-layer 2"]
    assert shelm == {"sps": 400.0, "ratio_to_cnn_ppo": 0.8, "cuda_max_memory_gb": 2.5, "peak_rss_gb": 1.0}
    assert summary["variants"]["env"]["cuda_max_memory_gb"] is None  # the env baseline never uses the GPU
    # a script that fell back to the CPU (no peak CUDA memory) fails the step on the GPU, not in the dry run
    cpu_only = throughput_json(tmp_path / "c.json", "n2", False)
    assert gpu_check.throughput_summary(cpu_only, "n2", cuda=True)["problems"] == [
        "shelm_ppo.py --n-layer 2 did not run on the GPU (no peak CUDA memory)"
    ]
    assert gpu_check.throughput_summary(cpu_only, "n2", cuda=False)["problems"] == []


def test_a_failed_step_is_recorded_and_the_next_runs(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=True, python=sys.executable, start=time.time(), budget_s=60)
    check.result["steps"]["install"] = {"ok": True}

    def broken():
        raise RuntimeError("no GPU")

    record = check.step("environment", broken)
    assert record["ok"] is False and record["error"] == "RuntimeError: no GPU" and "seconds" in record
    check.step("pytest", lambda: {"ok": True, "passed": 6})
    result = json.loads((tmp_path / "gpu_check.json").read_text())  # rewritten after every step
    assert result["ok"] is False and result["failed_steps"] == ["environment"]
    assert result["steps"]["pytest"]["ok"] and result["steps"]["pytest"]["passed"] == 6
    assert not list(tmp_path.glob("*.tmp"))


def test_a_timeout_ends_the_whole_process_group(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=True, python=sys.executable, start=time.time(), budget_s=60)
    pid_file = tmp_path / "child.pid"
    # a child of the command (as the training scripts are throughput.py's) must not outlive the timeout
    t = time.time()
    rc, _, timed_out = check.run(["bash", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], timeout=1)
    assert timed_out and rc is None and time.time() - t < 10
    child = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    for _ in range(50):  # gone, or a zombie waiting for init
        if not child.exists() or child.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the command's child outlived the timeout")


def test_gpu_check_sh_refuses_bad_arguments(tmp_path):
    for argv in ([], ["--cpu-dry-run"], [str(tmp_path), "--gpu"]):
        proc = subprocess.run(["bash", str(ROOT / "benchmark" / "gpu_check.sh"), *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage: bash benchmark/gpu_check.sh OUT_DIR" in proc.stderr, argv
    assert not (tmp_path / "gpu_check.json").exists()


def test_helm_test_device_values(monkeypatch):
    for value in ("", "cuda", "cpu"):
        monkeypatch.setenv("HELM_TEST_DEVICE", value)
        assert conftest.cuda_test_device() == value
    monkeypatch.setenv("HELM_TEST_DEVICE", "gpu")
    with pytest.raises(pytest.UsageError, match="HELM_TEST_DEVICE must be cuda, cpu or unset, got 'gpu'"):
        conftest.cuda_test_device()


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])
def test_device_of_each_case(monkeypatch, gpu):
    # the `device` fixture: the cuda case runs on the GPU where there is one, is skipped where there is none,
    # fails without one under HELM_TEST_DEVICE=cuda (the GPU check), and runs on the CPU under =cpu (its dry run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    for forced in ("", "cuda", "cpu"):
        monkeypatch.setenv("HELM_TEST_DEVICE", forced)
        assert conftest.device_of_case("cpu") == "cpu"
    monkeypatch.setenv("HELM_TEST_DEVICE", "cpu")
    assert conftest.device_of_case("cuda") == "cpu"
    for forced, outcome in (("", pytest.skip.Exception), ("cuda", pytest.fail.Exception)):
        monkeypatch.setenv("HELM_TEST_DEVICE", forced)
        if gpu:
            assert conftest.device_of_case("cuda") == "cuda"
        else:
            with pytest.raises(outcome, match="is_available"):
                conftest.device_of_case("cuda")


# ---------------------------------------------------------------------------------------------
# gpu_check.sh and gpu_wheels.sh: inputs checked before anything runs, results replaced as a set (issue 24)
# ---------------------------------------------------------------------------------------------

# PYTHON for the shell scripts: the real one, except for the long work, which it fakes (FAKE says how): the check's
# steps (gpu_check.py OUT_DIR: they end, or crash half-way) and the wheels' download (pip download: it fails, or
# "downloads" a small wheel)
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = benchmark/gpu_check.py ] && [ "$2" != --check-only ]; then
  case "$FAKE" in
    finish) echo "the steps"; printf '{"finished": true, "ok": true}\\n' > "$2/gpu_check.json"
            echo '{}' > "$2/throughput_n2.json"; exit 0 ;;
    crash) printf '{"ok": null}\\n' > "$2/gpu_check.json"; echo "Traceback" >&2; exit 1 ;;
  esac
fi
if [ "$1 $2 $3" = "-m pip download" ]; then
  [ "$FAKE" = offline ] && { echo "ERROR: No matching distribution (no network)" >&2; exit 1; }
  dest=""; prev=""
  for a in "$@"; do [ "$prev" = -d ] && dest="$a"; prev="$a"; done
  exec {python} -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1] + "/fresh-1.0-py3-none-any.whl", "w") as z:
    z.writestr("fresh-1.0.dist-info/METADATA", "Name: fresh\\nVersion: 1.0\\n")' "$dest"
fi
exec {python} "$@"
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON.replace("{python}", sys.executable))
    path.chmod(0o755)
    return path


def shell(script, argv, env, cwd):
    full = dict(os.environ, **env)
    return subprocess.run(
        ["bash", str(ROOT / "benchmark" / script), *argv],
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd,
        timeout=120,
    )


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_gpu_check_keeps_the_earlier_results_until_a_check_finishes(tmp_path, fake_python):
    """A check that does not finish (gpu_check.py crashed) leaves the earlier results byte-identical (the log was
    truncated at the start, the JSON rewritten after the first step) and its own in a folder of its own; one that
    finishes replaces the whole set, removing what the new set lacks (an --n-layer not measured this time)."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"gpu_check.json": b'{"ok": true}\n', "gpu_check.log": b"the earlier log\n", "throughput_n18.json": b"{}"}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    proc = shell("gpu_check.sh", [str(out)], {"PYTHON": str(fake_python), "FAKE": "crash"}, tmp_path)
    assert proc.returncode == 1 and "the check did not finish" in proc.stderr, proc.stderr
    (stage,) = [p for p in out.iterdir() if p.name.startswith(".gpu_check.")]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p != stage} == earlier
    assert (stage / "gpu_check.json").exists() and b"Traceback" in (stage / "gpu_check.log").read_bytes()
    shutil.rmtree(stage)
    env = {"PYTHON": str(fake_python), "FAKE": "finish", "GPU_CHECK_N_LAYERS": "2"}
    proc = shell("gpu_check.sh", [str(out)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = files_of(out)
    assert sorted(results) == ["gpu_check.json", "gpu_check.log", "throughput_n2.json"]  # no folder of its own left
    assert json.loads(results["gpu_check.json"]) == {"finished": True, "ok": True}
    assert b"the steps" in results["gpu_check.log"] and b"writing into" in results["gpu_check.log"]


@pytest.mark.parametrize(
    "setup, env, phrase",
    [
        ("link-at-log", {}, "gpu_check.log is a link, which an output never replaces"),
        ("folder-at-json", {}, "gpu_check.json is not a plain file"),
        ("out-a-link", {}, "is a link; outputs never go through a link"),
        ("out-a-file", {}, "is not a folder"),
        ("", {"GPU_CHECK_N_LAYERS": "2 x"}, "GPU_CHECK_N_LAYERS must be distinct --n-layer values in [1, 18]"),
        ("", {"GPU_CHECK_N_LAYERS": "2 2"}, "GPU_CHECK_N_LAYERS must be"),
        ("", {"GPU_CHECK_N_LAYERS": "19"}, "GPU_CHECK_N_LAYERS must be"),
        ("", {"GPU_CHECK_WARMUP": "-1"}, "GPU_CHECK_WARMUP must be updates in [0, 10000]"),
        ("", {"GPU_CHECK_MEASURED": "0"}, "GPU_CHECK_MEASURED must be updates in [1, 10000]"),
        ("", {"GPU_CHECK_BUDGET_S": "nan"}, "GPU_CHECK_BUDGET_S must be seconds in (0, 86400]"),
        ("", {"GPU_CHECK_START": "1e300"}, "GPU_CHECK_START must be a time"),
        ("", {"GPU_CHECK_SITE": "{file}"}, "GPU_CHECK_SITE"),
    ],
)
def test_gpu_check_refuses_bad_input_before_anything_runs(setup, env, phrase, tmp_path, fake_python):
    """One `error:` line and exit 2 before the first step (they failed minutes later, or never: a link at the log
    was followed and its target truncated); nothing written, the link's target untouched."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "target").write_text("someone's file")
    out = tmp_path / "out"
    if setup in ("link-at-log", "folder-at-json"):
        out.mkdir()
        if setup == "link-at-log":
            (out / "gpu_check.log").symlink_to(tmp_path / "target")
        else:
            (out / "gpu_check.json").mkdir()
    elif setup == "out-a-link":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    elif setup == "out-a-file":
        out = tmp_path / "file"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    env = {k: v.replace("{file}", str(tmp_path / "file")) for k, v in env.items()}
    proc = shell("gpu_check.sh", [str(out)], {"PYTHON": str(fake_python), "FAKE": "finish", **env}, tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and phrase in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "target").read_text() == "someone's file" and (tmp_path / "file").read_text() == "mine"


def test_gpu_check_py_refuses_unknown_arguments_and_writes_through_no_link(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([str(tmp_path / "out"), "--gpu"])  # it was ignored
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("error: unknown arguments")
    assert not (tmp_path / "out").exists()
    # its result file has no fixed temporary name: a link planted at the old one (gpu_check.json.tmp) is not written
    (tmp_path / "target").write_text("someone's file")
    (tmp_path / "gpu_check.json.tmp").symlink_to(tmp_path / "target")
    gpu_check.write_result(tmp_path, {"ok": True})
    assert (tmp_path / "target").read_text() == "someone's file"
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.json.tmp", "target"]
    # its bound of the throughput's updates is throughput.py's
    import throughput

    assert gpu_check.MAX_UPDATES == throughput.MAX_UPDATES


def test_gpu_wheels_keeps_the_earlier_wheels_until_the_new_ones_are_checked(tmp_path, fake_python):
    """A download that fails (no network) leaves the earlier wheels as they were (they were deleted before it);
    one that succeeds replaces the folder whole, with no folder of its own left beside it."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "old-0.1-py3-none-any.whl").write_bytes(b"an earlier wheel")
    env = {"PYTHON": str(fake_python), "WHEEL_DIR": str(wheels)}
    proc = shell("gpu_wheels.sh", [], {**env, "FAKE": "offline"}, tmp_path)
    assert proc.returncode != 0 and "No matching distribution" in proc.stderr
    assert files_of(wheels) == {"old-0.1-py3-none-any.whl": b"an earlier wheel"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["python", "whl"]
    proc = shell("gpu_wheels.sh", [], {**env, "FAKE": "download"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(files_of(wheels)) == ["fresh-1.0-py3-none-any.whl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["python", "whl"]
    # the budget is checked before the new wheels replace the earlier ones
    proc = shell("gpu_wheels.sh", [], {**env, "FAKE": "download", "CARRY_BUDGET_MIB": "1"}, tmp_path)
    assert proc.returncode == 1 and "error: the wheels and the working tree take more than 1 MiB" in proc.stderr
    assert sorted(files_of(wheels)) == ["fresh-1.0-py3-none-any.whl"]


@pytest.mark.parametrize(
    "setup, env, phrase",
    [
        ("notes", {}, "holds {whl}/notes.txt, not a wheel"),
        ("link", {}, "is a link; give the folder it points to"),
        ("file", {}, "is not a folder"),
        ("", {"WHEEL_DIR": "{tmp}/missing/whl"}, "its folder {tmp}/missing does not exist"),
        ("", {"WHEEL_BUDGET_MIB": "forty"}, "WHEEL_BUDGET_MIB must be a whole number of MiB"),
        ("", {"CARRY_BUDGET_MIB": "0"}, "CARRY_BUDGET_MIB must be a whole number of MiB"),
    ],
)
def test_gpu_wheels_refuses_bad_input_before_downloading(setup, env, phrase, tmp_path, fake_python):
    wheels = tmp_path / "whl"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a-1.0-py3-none-any.whl").write_bytes(b"a wheel")
    if setup == "notes":
        wheels.mkdir()
        (wheels / "notes.txt").write_text("mine")
    elif setup == "link":
        wheels.symlink_to(tmp_path / "elsewhere")
    elif setup == "file":
        wheels.write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    full = {"PYTHON": str(fake_python), "WHEEL_DIR": str(wheels), "FAKE": "download"}
    full |= {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    proc = shell("gpu_wheels.sh", [], full, tmp_path)
    phrase = phrase.replace("{whl}", str(wheels)).replace("{tmp}", str(tmp_path))
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and phrase in proc.stderr, proc.stderr
    assert "downloading" not in proc.stdout
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
