"""The training paths on the GPU: each script trains to the end with --cuda (the frozen models in bfloat16 where
the GPU has it: --frozen-dtype auto), resumes on the GPU, and its checkpoints move between devices (a GPU
checkpoint plays on the CPU, a CPU one on the GPU).

These are the `cuda` cases of the suite (the `cuda` marker; conftest.py's HELM_TEST_DEVICE): skipped without a
GPU, run by benchmark/gpu_check.sh on one, and run on the CPU by its dry run (HELM_TEST_DEVICE=cpu). The same
runs on the CPU are the rest of the suite's (tests/test_reliability.py, tests/test_enjoy.py, ...), so there
is no CPU case here. The runs are made in this process (runpy, as `python script.py` would), so that a
GPU machine pays the imports once."""

import json
import runpy
import signal
import sys

import pytest
import torch

from conftest import QUICK, ROOT, SCRIPTS, device_of_case, tiny_args

BATCH = 4 * 16  # QUICK: 4 envs x 16 steps, 2 updates


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda)])
def gpu(request):
    """cuda (cpu in the GPU check's dry run); skipped without a GPU."""
    return device_of_case(request.param)


def run_main(path, args, cwd, monkeypatch):
    """`python path args` in this process, in cwd: the SystemExit code (None or 0: it ended normally)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, args)])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            runpy.run_path(str(path), run_name="__main__")
        return None
    except SystemExit as e:
        return e.code
    finally:  # the scripts install their own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def device_flag(device):
    return "--cuda" if device == "cuda" else "--no-cuda"


def on_device(ckpt):
    """The device the run's optimizer state was on when saved (torch.save keeps it; AdamW's moments follow the
    parameters), read back without moving it."""
    moments = [t for state in ckpt["optimizer"]["state"].values() for k, t in state.items() if k == "exp_avg"]
    return {t.device.type for t in moments}


@pytest.mark.parametrize("script", SCRIPTS)
def test_trains_and_resumes_on_the_gpu(script, gpu, tmp_path, monkeypatch):
    args = [*QUICK, *tiny_args(script, tmp_path), device_flag(gpu), "--checkpoint-every", "1", "--save-model"]
    assert run_main(ROOT / script, args, tmp_path, monkeypatch) in (None, 0)
    (run_dir,) = (tmp_path / "runs").iterdir()
    path = run_dir / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert (ckpt["iteration"], ckpt["global_step"]) == (2, 2 * BATCH)
    assert all(torch.isfinite(t).all() for t in ckpt["agent"].values())
    assert on_device(torch.load(path, weights_only=True)) == {gpu}  # it trained where it was asked to
    if gpu == "cuda":
        assert ckpt["rng"]["cuda"], "the GPU's RNG state is saved"

    # one update more, resumed on the GPU: the restored optimizer, RNG and encoder states on the device
    ckpt["args"]["total_timesteps"] = 3 * BATCH
    torch.save(ckpt, path)
    assert run_main(ROOT / script, ["--resume", path, "--no-progress-bar"], tmp_path, monkeypatch) in (None, 0)
    resumed = torch.load(path, map_location="cpu", weights_only=True)
    assert (resumed["iteration"], resumed["global_step"]) == (3, 3 * BATCH)
    assert resumed["run_name"] == ckpt["run_name"] and all(torch.isfinite(t).all() for t in resumed["agent"].values())
    assert any(not torch.equal(resumed["agent"][k], ckpt["agent"][k]) for k in ckpt["agent"])  # it did update


@pytest.mark.parametrize("trained_on", ["cpu", "gpu"])
def test_checkpoints_play_on_the_other_device(trained_on, gpu, tmp_path, monkeypatch):
    """SHELM trained on one device, played by enjoy.py on the other: the trace's memory words are those the
    encoder retrieves on that device, and it plays the episodes asked for."""
    script = "shelm_ppo.py"
    train_on, play_on = ("cpu", gpu) if trained_on == "cpu" else (gpu, "cpu")
    args = [*QUICK, *tiny_args(script, tmp_path), device_flag(train_on), "--save-model"]
    assert run_main(ROOT / script, args, tmp_path, monkeypatch) in (None, 0)
    (run_dir,) = (tmp_path / "runs").iterdir()
    enjoy_args = [run_dir / "model_final.pt", "--episodes", "2", "--trace", "jsonl", "--out-dir", tmp_path / "out"]
    assert run_main(ROOT / "enjoy.py", [*enjoy_args, device_flag(play_on)], tmp_path, monkeypatch) in (None, 0)
    trace = [json.loads(line) for line in (tmp_path / "out" / "trace.jsonl").read_text().splitlines()]
    assert {row["episode"] for row in trace} >= {1, 2}
    assert all(row["words"] and isinstance(row["value"], float) for row in trace)
