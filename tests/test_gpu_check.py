"""benchmark/gpu_check.sh and gpu_check.py (issue 19): what they write and how a step fails, without running
the check itself (its CPU dry run, `bash benchmark/gpu_check.sh OUT --cpu-dry-run`, takes minutes); and the
`device` fixture of conftest.py, whose dry-run mode runs the `cuda` cases on the CPU."""

import json
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
