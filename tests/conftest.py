"""Shared helpers: every test runs on tiny random models that the code builds itself, offline."""

import contextlib
import fcntl
import io
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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
    """The environment of the processes the tests start: offline, unbuffered, one torch thread (the tests' models
    are tiny and two test files run at once on two cores: more threads only spin against each other)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
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


def call_in_process(main, cwd):
    """main() in this process, in cwd (created), as a process would run it: offline as offline_env (the hub client
    read HF_HUB_OFFLINE when this process imported it, so its constant is set too), stdout and stderr captured, a
    SystemExit taken as the exit status. The result reads like run_script's. What the end of a process would undo
    is undone: the signal handlers, the RNGs, the working directory, sys.argv, the environment."""
    from huggingface_hub import constants

    Path(cwd).mkdir(parents=True, exist_ok=True)
    saved = os.getcwd(), sys.argv, np.random.get_state(), random.getstate(), constants.HF_HUB_OFFLINE
    environ = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "WANDB_MODE")}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    os.chdir(cwd)
    os.environ.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    constants.HF_HUB_OFFLINE = True
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        np.random.set_state(saved[2])
        random.setstate(saved[3])
        constants.HF_HUB_OFFLINE = saved[4]
        for name, value in environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    stderr = err.getvalue()
    if isinstance(code, str):  # what the interpreter does with SystemExit("message")
        stderr += code + "\n"
    return SimpleNamespace(returncode=1 if isinstance(code, str) else code, stdout=out.getvalue(), stderr=stderr)


def run_in_process(script, args, cwd, stop_after=None):
    """`python script args` (script: a path relative to the repository) run in this process, in cwd (created), by
    call_in_process: the result reads like run_script's. A process costs some 6 s of CPU importing torch, open_clip,
    tensorboard & co.; in this process a tiny run takes about one. Kept for real processes: what only they show
    (signals from outside, exit status and stderr as the shell sees them, runs side by side, determinism across
    processes). stop_after: SIGTERM (a real one, to this process) once that update has been logged, as a
    preemption would. The run directory's lock, which the end of the process would release, is released."""
    from helm_utils import runs

    update_done, claim_run_dir, locks = runs.Run.update_done, runs.claim_run_dir, []

    def update_done_then_stop(self, iteration, global_step):
        update_done(self, iteration, global_step)
        if iteration == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    def claim_and_remember(*claim_args):
        run_dir, lock = claim_run_dir(*claim_args)
        locks.append(lock)
        return run_dir, lock

    def main():
        sys.argv = [str(ROOT / script), *map(str, args)]
        runpy.run_path(str(ROOT / script), run_name="__main__")

    runs.Run.update_done, runs.claim_run_dir = update_done_then_stop, claim_and_remember
    try:
        return call_in_process(main, cwd)
    finally:
        runs.Run.update_done, runs.claim_run_dir = update_done, claim_run_dir
        for lock in locks:  # a finished run has closed its own already (and the number may be another file's now)
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{lock}").endswith("/.lock"):
                    os.close(lock)


def error_line(proc):
    """The one line a failed run printed last on stderr."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# Floating-point results computed two ways (another batch size or composition, chunks, a cache, another CPU's
# kernels: AVX2 and AVX-512 round differently) agree to rounding, not bitwise; docs/reliability.md says how to
# run the suite on other kernels of this machine. Ids chosen from such results (argmax, top-k) agree exactly only
# where the scores set them apart by more than rounding can move them.
CHOICE_GAP = 1e-4  # of a cosine (scale 1): float32 rounding moves one by ~1e-7


def assert_no_near_ties(scores, k=1, gap=CHOICE_GAP):
    """Test data whose top-k ids are set by `scores` (rows, candidates), not by rounding: each row's k best scores
    lead the next best by more than `gap`, so ids chosen from them by two computations may be compared exactly."""
    top = torch.as_tensor(scores).double().topk(k + 1, dim=-1).values
    lead = (top[:, :-1] - top[:, 1:]).min().item()
    assert lead > gap, f"the test data holds a near-tie ({lead:.2e}): its ids would be a matter of rounding"


def assert_same_choices(got, want, scores, tie=CHOICE_GAP):
    """Ids (rows, k) chosen from scores (rows, candidates) by two computations whose rounding differs: equal, but
    where the two choices' scores tie within `tie` (rounding may swap those, nothing else may)."""
    got, want, scores = torch.as_tensor(got), torch.as_tensor(want), torch.as_tensor(scores).double()
    got, want = got.reshape(len(scores), -1), want.reshape(len(scores), -1)
    tied = (scores.gather(1, got) - scores.gather(1, want)).abs() <= tie
    assert ((got == want) | tied).all(), (got, want)


@pytest.fixture(params=SCRIPTS)
def script(request):
    return request.param


# One trained SHELM run shared by tests/test_e2e.py and tests/test_enjoy.py: Empty-5x5 truncates an
# episode at 100 steps, so 2 envs x 128 steps end at least one episode per env in the second update,
# whatever the random policy does; two updates of two minibatches each
SHELM_RUN_ENV = "MiniGrid-Empty-5x5-v0"
SHELM_RUN = [
    *QUICK,
    "--env-id",
    SHELM_RUN_ENV,
    "--num-envs",
    "2",
    "--num-steps",
    "64",
    "--total-timesteps",
    "256",
    "--topk",
    "2",
    "--save-model",
    "--log-tokens-every",
    "1",
]


@pytest.fixture(scope="session")
def shelm_run(tmp_path_factory):
    """The run directory of a tiny SHELM training run (checkpoints, event files), trained once per test session:
    with test workers (pytest-xdist), by the first that asks, under a lock; the others wait and read the same
    run (its tests only read it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    cwd, done = shared / "e2e", shared / "e2e.done"
    with open(shared / "e2e.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(cwd, ignore_errors=True)  # what a failed attempt left
            cwd.mkdir()
            proc = subprocess.run(
                [sys.executable, str(ROOT / "shelm_ppo.py"), *SHELM_RUN, *tiny_args("shelm_ppo.py", cwd)],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=300,
                env=offline_env(),
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr
            done.touch()
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith(f"{SHELM_RUN_ENV}__shelm_ppo__1__")
    return runs[0]


# The device of the tests that take the `device` fixture: each runs on the CPU and, marked `cuda`, on the GPU.
# HELM_TEST_DEVICE decides what the `cuda` cases do: unset, they run where there is a GPU and are skipped
# elsewhere; "cuda", they must have one (fail without: benchmark/gpu_check.sh on the GPU machine); "cpu",
# they run on the CPU (gpu_check.sh --cpu-dry-run: the same selection, `-m cuda`, the same code, here).
CUDA_TEST_DEVICES = ("", "cuda", "cpu")


def cuda_test_device():
    value = os.environ.get("HELM_TEST_DEVICE", "")
    if value not in CUDA_TEST_DEVICES:
        raise pytest.UsageError(f"HELM_TEST_DEVICE must be cuda, cpu or unset, got {value!r}")
    return value


def pytest_configure(config):
    cuda_test_device()  # a wrong value stops the run at once


def device_of_case(case):
    """The device a test case of the `device` fixture runs on, or a skip (or a failure) where it cannot run."""
    if case == "cpu":
        return "cpu"
    forced = cuda_test_device()
    if forced == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if forced == "cuda":
            pytest.fail("HELM_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    return "cuda"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The device name: cpu, or for the `cuda` case cuda (cpu in a dry run, HELM_TEST_DEVICE=cpu)."""
    return device_of_case(request.param)
