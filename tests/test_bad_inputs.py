"""Bad input stops a training script before it writes anything, with one `error: ...` line and no
traceback.

Most cases run the script in this process (runpy, as `python script.py args` would): a script stops
by raising SystemExit("error: ..."), which the interpreter prints as the last stderr line with exit
status 1. Subprocesses, which cost an import of torch and open_clip each, are kept for what only a
real process shows: that it does end that way, and the offline hub lookup."""

import os
import runpy
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import QUICK, ROOT, error_line, run_script, tiny_args


def run_in_process(script, args, cwd, monkeypatch, capsys):
    """Run `script` as __main__ in cwd; the result reads like the CompletedProcess of a real run."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *map(str, args)])
    capsys.readouterr()
    with torch.random.fork_rng(devices=[]):  # the script seeds the global generators
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # what the interpreter does with SystemExit("message")
        err, code = err + code + "\n", 1
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def assert_clean_failure(proc, cwd, before, *phrases):
    line = error_line(proc)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith("error: "), proc.stderr[-3000:]
    assert sum(err.startswith("error:") for err in proc.stderr.splitlines()) == 1
    for phrase in phrases:
        assert phrase in line, line
    assert not (cwd / "runs").exists()
    assert sorted(os.listdir(cwd)) == before  # nothing written at all


def base_args(script, tmp_path):
    # a valid quick run: a case that is not refused trains for seconds, not for hours
    return [*QUICK, *tiny_args(script, tmp_path)]


def write_resume_files(tmp_path):
    torch.save({"format": "helm-checkpoint/1", "algorithm": "other", "args": {}}, tmp_path / "other.pt")
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(4096))
    return {"missing": tmp_path / "missing.pt", "corrupt": tmp_path / "corrupt.pt", "other": tmp_path / "other.pt"}


CASES = {
    "unknown-env": (["--env-id", "MiniGrid-NoSuchThing-v0"], ["MiniGrid-NoSuchThing-v0"]),
    "non-image-env": (["--env-id", "CartPole-v1"], ["CartPole-v1", "RGB images"]),
    "n-layer-0": (["--n-layer", "0"], ["--n-layer", "got 0"]),
    "n-layer-19": (["--n-layer", "19"], ["--n-layer", "between 1 and 18", "got 19"]),
    "trxl-missing-dir": (["--trxl-model", "/nonexistent/dir"], ["/nonexistent/dir"]),
    "resume-missing": (["--resume", "{missing}"], ["missing.pt", "does not exist"]),
    "resume-corrupt": (["--resume", "{corrupt}"], ["corrupt.pt", "corrupt"]),
    "resume-other-algorithm": (["--resume", "{other}"], ["other.pt", "other_ppo.py"]),
    "num-envs-0": (["--num-envs", "0"], ["--num-envs", "got 0"]),
    "learning-rate-negative": (["--learning-rate", "-1"], ["--learning-rate", "-1"]),
}
SHELM_CASES = {
    "embeddings-file-missing": (
        ["--embeddings-file", "/missing.safetensors"],
        ["/missing.safetensors", "does not exist"],
    ),
    "topk-0": (["--topk", "0"], ["--topk", "got 0"]),
    "prompt-without-slot": (["--prompts", "a photo of"], ["'a photo of'", "{}", "dmlab"]),
}


def check_case(script, case, tmp_path, monkeypatch, capsys):
    files = write_resume_files(tmp_path)
    before = sorted(os.listdir(tmp_path))
    extra, phrases = case
    extra = [a.format(**files) for a in extra]
    proc = run_in_process(script, [*base_args(script, tmp_path), *extra], tmp_path, monkeypatch, capsys)
    assert_clean_failure(proc, tmp_path, before, *phrases)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refused(script, case, tmp_path, monkeypatch, capsys):
    check_case(script, case, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("case", SHELM_CASES.values(), ids=SHELM_CASES.keys())
def test_refused_shelm(case, tmp_path, monkeypatch, capsys):
    check_case("shelm_ppo.py", case, tmp_path, monkeypatch, capsys)


def test_in_process_reads_like_a_real_process(tmp_path, monkeypatch, capsys):
    # the same refusal, once as a real process: exit status, last line and silence agree
    args = [*base_args("shelm_ppo.py", tmp_path), "--env-id", "CartPole-v1"]
    real = run_script("shelm_ppo.py", args, tmp_path)
    emulated = run_in_process("shelm_ppo.py", args, tmp_path, monkeypatch, capsys)
    assert real.returncode == emulated.returncode == 1
    assert error_line(real) == error_line(emulated)
    assert_clean_failure(real, tmp_path, [], "CartPole-v1")


def test_hub_weights_absent_offline(script, tmp_path):
    # a real process: the hub client reads HF_HUB_OFFLINE when it is first imported
    # (without HF_HUB_OFFLINE and without a network: tests/test_first_use.py)
    args = [*base_args(script, tmp_path), "--trxl-model", "transfo-xl/transfo-xl-wt103"]
    proc = run_script(script, args, tmp_path, timeout=60)  # no waiting on a network that is not there
    assert_clean_failure(proc, tmp_path, [], "transfo-xl/transfo-xl-wt103", "download it once", "tiny-random")
