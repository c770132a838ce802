"""Shared helpers: every test runs on tiny random models that the code builds itself, offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the tests' tensors are tiny: threads only contend with each other (and with parallel runs)
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRIPTS = ["shelm_ppo.py", "helm_ppo.py", "helmv2_ppo.py"]

# a run short enough for tests: 2 updates of 4 envs x 16 steps on DoorKey-5x5
QUICK = [
    "--env-id",
    "MiniGrid-DoorKey-5x5-v0",
    "--num-envs",
    "4",
    "--num-steps",
    "16",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "1",
    "--total-timesteps",
    "128",
    "--n-layer",
    "2",
    "--no-progress-bar",
]


def tiny_args(script, tmp_path):
    """Arguments that make `script` use the tiny random models (and keep its files under tmp_path)."""
    args = ["--trxl-model", "tiny-random"]
    if script in ("shelm_ppo.py", "helmv2_ppo.py"):
        args += ["--clip-model", "tiny-random"]
    if script == "shelm_ppo.py":
        args += ["--embeddings-dir", str(tmp_path / "data")]
    return args


def offline_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(script, args, cwd, timeout=300, **kwargs):
    """Run a training script in `cwd` (its runs/ land there) and return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def error_line(proc):
    """The one line a failed run printed last on stderr."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(params=SCRIPTS)
def script(request):
    return request.param
