"""Reliability of a training run (docs/reliability.md): resume, interruption by SIGTERM and SIGKILL, periodic
and atomic checkpoints, determinism, the non-finite guard, a full disk, checkpoints from elsewhere.

What this tests lives in helm_utils/ (checkpoints, runs, files), the same for the three scripts: it is tested
once, through one script, HELMv2 (SCRIPT), whose checkpoints hold the most (the encoder's running statistics).
What differs between the scripts is tested for each: that a resume restores everything exactly (each
encoder has its own state) and that a seed fixes the whole run (each encoder has its own randomness).

Every run is a few updates of the tiny random models on CPU. The runs of a script that several
tests read (an uninterrupted reference run, its twin, one with another seed, the interrupted runs and
their resumptions) are made once per module, independent ones side by side. Runs that need no process of
their own run in this process (conftest.run_in_process: no imports to pay for)."""

import copy
import errno
import importlib.util
import math
import os
import random
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import QUICK, ROOT, SCRIPTS, error_line, offline_env, run_in_process, run_script, tiny_args
from helm_utils import checkpoints, env_suites, files, frozen_models, runs

SCRIPT = "helmv2_ppo.py"  # the infrastructure's tests run through this one (see the docstring)

# episodes of a few dozen steps (the agent bumps into an obstacle), so returns get recorded
ENV = "MiniGrid-Dynamic-Obstacles-5x5-v0"
NUM_ENVS, NUM_STEPS, MINIBATCHES, EPOCHS = 4, 16, 2, 1
BATCH = NUM_ENVS * NUM_STEPS
UPDATES = 4
WAIT = 600  # seconds: generous, the machine is shared


def train_args(script, shared, **overrides):
    """QUICK with `overrides`, UPDATES updates on ENV, a checkpoint after every update."""
    overrides = {"env_id": ENV, "total_timesteps": UPDATES * BATCH, "checkpoint_every": 1, **overrides}
    args = list(QUICK)
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    for flag, value in [
        ("--num-envs", NUM_ENVS),
        ("--num-steps", NUM_STEPS),
        ("--num-minibatches", MINIBATCHES),
        ("--update-epochs", EPOCHS),
    ]:
        assert args[args.index(flag) + 1] == str(value), "QUICK changed: update the constants above"
    return args + tiny_args(script, shared)  # one embeddings file for all runs


def run_dir_of(cwd):
    dirs = list((Path(cwd) / "runs").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def load(path):
    """A checkpoint as any reader sees it: tensors and plain data only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def scalars(run_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows it (what a restart purged is gone), but for the
    perf/* timings: speed is not deterministic."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if not t.startswith("perf/")]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}


def assert_same(a, b, where="checkpoint"):
    """Equal nested checkpoint content: tensors bitwise, floats with NaN == NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def import_script(script):
    """The script as a module (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(f"reliability_{script[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: the package finds a script by its Args' module
    spec.loader.exec_module(module)
    return module


def start(script, args, cwd, group=False, **env):
    """A training run in the background, in cwd (created); its output goes to files there. One
    thread each (offline_env): runs side by side with torch's default threads spin against each other. group: in a
    process group of its own (its pid), as a shell's job, for signals to the whole group; env: more
    environment variables."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / script), *map(str, args)],
            cwd=cwd,
            env=dict(offline_env(), **env),
            stdout=out,
            stderr=err,
            process_group=0 if group else None,
        )
    proc.cwd = cwd
    return proc


def finish(proc):
    """Wait for a run from start(); the result reads like run_script's."""
    proc.wait(timeout=WAIT)
    return SimpleNamespace(
        returncode=proc.returncode,
        stdout=(proc.cwd / "stdout.txt").read_text(),
        stderr=(proc.cwd / "stderr.txt").read_text(),
    )


def side_by_side(script, made):
    """{name: (args, cwd)} run concurrently (independent runs; the machine has 2 cores) -> {name: result}."""
    procs = {name: start(script, args, cwd) for name, (args, cwd) in made.items()}
    return {name: finish(proc) for name, proc in procs.items()}


# ---------------------------------------------------------------------------------------------
# Shared runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def cache(shared):
    """Runs made once per script and module, read by several tests: {(kind, script): ...}."""
    return {}


@pytest.fixture
def script():
    """The infrastructure is the same for every script: its tests run through SCRIPT."""
    return SCRIPT


@pytest.fixture
def runs_of(script, shared, cache):
    """Run directories of an uninterrupted run of `script` (`reference`) and of the same run again (`twin`), each
    a process of its own (what they compare is the run's determinism across processes), made side by side on
    first use; meanwhile, in this process, one update with another seed (`other`)."""
    if ("runs", script) not in cache:
        base = shared / script[:-3]
        procs = {
            name: start(script, train_args(script, shared, save_model=True), base / name)
            for name in ("reference", "twin")
        }
        other = run_in_process(script, train_args(script, shared, seed=2, total_timesteps=BATCH), base / "other")
        results = {name: finish(proc) for name, proc in procs.items()} | {"other": other}
        for name, result in results.items():
            assert result.returncode == 0, f"{name}: {result.stderr}"
        cache["runs", script] = SimpleNamespace(**{name: run_dir_of(base / name) for name in results})
    return cache["runs", script]


@pytest.fixture
def reference(runs_of):
    """Run directory of the uninterrupted run (read only: copy it to change it)."""
    return runs_of.reference


@pytest.fixture
def interrupted(script, shared, cache):
    """One run stopped by SIGTERM and one killed by SIGKILL, each as soon as its first periodic
    checkpoint exists, then both resumed from runs/<run>/checkpoint.pt; side by side on first use.
    {signal: what each step left}."""
    if ("interrupted", script) not in cache:
        base = shared / script[:-3]
        procs = {
            sig: start(script, train_args(script, shared), base / sig.name) for sig in (signal.SIGTERM, signal.SIGKILL)
        }
        found, deadline = {}, time.time() + WAIT
        while len(found) < len(procs) and time.time() < deadline:
            for sig, proc in procs.items():
                if sig not in found and list(proc.cwd.glob("runs/*/checkpoint.pt")):
                    proc.send_signal(sig)
                    found[sig] = next(proc.cwd.glob("runs/*/checkpoint.pt"))
                elif sig not in found:
                    assert proc.poll() is None, (
                        f"{sig.name} run ended before its first checkpoint: {finish(proc).stderr}"
                    )
            time.sleep(0.02)
        assert len(found) == len(procs), "no checkpoint in time"
        result = {sig: SimpleNamespace(stopped=finish(proc), path=found[sig]) for sig, proc in procs.items()}
        for sig, r in result.items():  # each resumed in this process: what a signal left is for any process to go on
            r.saved = load(r.path)
            r.leftovers = [p.name for p in r.path.parent.iterdir() if ".tmp" in p.name]
            resume = ["--resume", r.path.relative_to(base / sig.name), "--no-progress-bar"]
            r.resumed = run_in_process(script, resume, base / sig.name)
            r.final = load(r.path)
            r.loss_steps = [s for s, _ in scalars(r.path.parent)["losses/value_loss"]]
        cache["interrupted", script] = result
    return cache["interrupted", script]


# ---------------------------------------------------------------------------------------------
# Interruption and resume
# ---------------------------------------------------------------------------------------------


def assert_resumed_to_the_end(r, reference):
    """The resumed run did the updates that were left: it ends with the uninterrupted run's counts,
    in the same run directory, with one logged loss per update (none lost, none logged twice)."""
    assert r.resumed.returncode == 0, r.resumed.stderr
    assert f"at step {r.saved['global_step']} (update {r.saved['iteration']} of {UPDATES})" in r.resumed.stdout
    uninterrupted = load(reference / "checkpoint.pt")
    assert (r.final["iteration"], r.final["global_step"]) == (uninterrupted["iteration"], uninterrupted["global_step"])
    assert (r.final["iteration"], r.final["global_step"]) == (UPDATES, UPDATES * BATCH)
    assert r.final["run_name"] == r.saved["run_name"] == r.path.parent.name
    assert r.loss_steps == [i * BATCH for i in range(1, UPDATES + 1)]


def test_sigterm_saves_boundary_and_resume_completes_the_run(interrupted, reference):
    r = interrupted[signal.SIGTERM]
    assert r.stopped.returncode == 128 + signal.SIGTERM, r.stopped.stderr
    assert "Traceback" not in r.stopped.stderr
    assert (
        r.stopped.stderr.strip()
        .splitlines()[-1]
        .endswith(f"--resume {Path('runs') / r.path.parent.name / 'checkpoint.pt'}")
    )
    # the checkpoint of the last finished update: the steps of the interrupted rollout are not in it
    assert 1 <= r.saved["iteration"] < UPDATES, "the run finished before the signal: nothing was tested"
    assert r.saved["global_step"] == r.saved["iteration"] * BATCH
    assert r.leftovers == []
    assert_resumed_to_the_end(r, reference)


def test_sigkill_then_resume_from_the_periodic_checkpoint(interrupted, reference):
    r = interrupted[signal.SIGKILL]
    assert r.stopped.returncode == -signal.SIGKILL
    assert 1 <= r.saved["iteration"] < UPDATES, "the run finished before the kill: nothing was tested"
    assert r.saved["global_step"] == r.saved["iteration"] * BATCH
    # and what was logged up to the checkpoint survived the kill (the loss steps of the resumed run)
    assert_resumed_to_the_end(r, reference)


# ---------------------------------------------------------------------------------------------
# --async-envs: the same promises with the envs in worker processes
# ---------------------------------------------------------------------------------------------


def workers_of(proc):
    """The pids of a run's env workers: its child processes."""
    return [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]


@pytest.fixture
def async_runs(script, shared, cache):
    """Runs with --async-envs side by side, each in a process group of its own: SIGINT and SIGTERM to the whole
    group (Ctrl-C; a cluster's SIGTERM to every process) after the first periodic checkpoint, then resumed; and
    one whose second worker is killed with SIGKILL after the first checkpoint."""
    if ("async", script) not in cache:
        base = shared / f"{script[:-3]}-async"
        args = train_args(script, shared, async_envs=True)
        procs = {name: start(script, args, base / name, group=True) for name in ["SIGINT", "SIGTERM", "kill"]}
        done, deadline = {}, time.time() + WAIT
        while len(done) < len(procs) and time.time() < deadline:
            for name, proc in procs.items():
                checkpoint = next(proc.cwd.glob("runs/*/checkpoint.pt"), None)
                if name in done or checkpoint is None:
                    assert name in done or proc.poll() is None, f"{name} ended before its signal: {finish(proc).stderr}"
                elif name == "kill":
                    pid = workers_of(proc)[1]
                    os.kill(pid, signal.SIGKILL)
                    done[name] = SimpleNamespace(path=checkpoint, pid=pid, iteration=load(checkpoint)["iteration"])
                else:
                    os.killpg(proc.pid, signal.Signals[name])
                    done[name] = SimpleNamespace(path=checkpoint)
            time.sleep(0.01)
        assert len(done) == len(procs), "no checkpoint in time"
        result = {name: SimpleNamespace(stopped=finish(proc), **vars(done[name])) for name, proc in procs.items()}
        for r in result.values():
            r.saved = load(r.path)
            r.leftovers = [p.name for p in r.path.parent.iterdir() if ".tmp" in p.name]
        resumed = side_by_side(
            script,
            {
                name: (["--resume", result[name].path.relative_to(base / name), "--no-progress-bar"], base / name)
                for name in ["SIGINT", "SIGTERM"]
            },
        )
        for name, proc in resumed.items():
            r = result[name]
            r.resumed, r.final = proc, load(r.path)
            r.loss_steps = [s for s, _ in scalars(r.path.parent)["losses/value_loss"]]
        cache["async", script] = result
    return cache["async", script]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_async_envs_signal_to_the_group_saves_and_resumes(sig, async_runs, reference):
    """The workers ignore the signal (they used to die, each saying that no run was written, and the run ended in
    a traceback without its checkpoint): the run ends as without them, and its resumption completes it."""
    r = async_runs[sig.name]
    assert r.stopped.returncode == 128 + sig, r.stopped.stderr
    assert "Traceback" not in r.stopped.stderr and "no run was written" not in r.stopped.stderr, r.stopped.stderr
    resume_path = Path("runs") / r.path.parent.name / "checkpoint.pt"
    assert (
        r.stopped.stderr.strip().splitlines()[-1] == f"interrupted by signal {sig}; resume with --resume {resume_path}"
    )
    assert 1 <= r.saved["iteration"] < UPDATES, "the run finished before the signal: nothing was tested"
    assert r.saved["global_step"] == r.saved["iteration"] * BATCH and r.saved["args"]["async_envs"]
    assert r.leftovers == []
    assert "Traceback" not in r.resumed.stderr, r.resumed.stderr
    assert_resumed_to_the_end(r, reference)


def test_async_envs_killed_worker_is_one_line_and_keeps_the_checkpoint(async_runs, script):
    """A worker killed with SIGKILL: one line naming it, exit status 1, and checkpoint.pt the last good state,
    one that --resume takes (it used to end in a traceback)."""
    r = async_runs["kill"]
    assert r.stopped.returncode == 1, r.stopped.stderr
    assert "Traceback" not in r.stopped.stderr, r.stopped.stderr
    assert sum(line.startswith("error:") for line in r.stopped.stderr.splitlines()) == 1
    path = Path("runs") / r.path.parent.name / "checkpoint.pt"
    assert re.fullmatch(
        rf"error: env worker [0-3] of 4 \(pid {r.pid}\) was killed by SIGKILL; the run stops here "
        rf"\(last periodic checkpoint: {re.escape(str(path))}\)",
        error_line(r.stopped),
    ), r.stopped.stderr
    ckpt = checkpoints.load(r.path, import_script(script))  # what --resume checks
    assert ckpt["iteration"] >= r.iteration >= 1 and ckpt["global_step"] == ckpt["iteration"] * BATCH
    assert r.leftovers == []


class CountingEnv(gym.Env):
    """Observes its step count; raises at step `fail_at` (0: never), or when made in a process other than
    `made_in` (None: anywhere)."""

    observation_space = gym.spaces.Box(0, 1000, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, fail_at=0, made_in=None):
        if made_in is not None and os.getpid() != made_in:
            raise ValueError("this env cannot be made in a worker")
        self.fail_at, self.steps = fail_at, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError(f"the env broke at step {self.steps}")
        return np.full(1, self.steps, np.float32), 0.0, False, False, {}


def async_envs(*make):
    envs = env_suites.AsyncVectorEnv(list(make))
    envs.reset(seed=0)
    return envs


def test_async_env_workers_keep_the_promises():
    """In this process: the workers ignore SIGINT and SIGTERM and go on stepping; a worker that is killed, or
    whose env raises in step or cannot be made, stops the run with one line naming it, every worker ended."""
    envs = async_envs(CountingEnv, CountingEnv)
    for pid in [p.pid for p in envs.processes]:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    assert envs.step(np.zeros(2, np.int64))[0].tolist() == [[1], [1]]
    envs.close()
    assert [p.exitcode for p in envs.processes] == [0, 0]

    envs = async_envs(CountingEnv, CountingEnv)
    pid = envs.processes[1].pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(SystemExit) as stop:
        envs.step(np.zeros(2, np.int64))
    assert stop.value.code == (
        f"error: env worker 1 of 2 (pid {pid}) was killed by SIGKILL; the run stops here (nothing was saved after it)"
    )
    assert not any(p.is_alive() for p in envs.processes) and envs.closed

    envs = async_envs(CountingEnv, lambda: CountingEnv(fail_at=2))
    envs.step(np.zeros(2, np.int64))
    pid = envs.processes[1].pid
    with pytest.raises(SystemExit) as stop:
        envs.step(np.zeros(2, np.int64))
    assert stop.value.code == (
        f"error: env worker 1 of 2 (pid {pid}) failed: RuntimeError: the env broke at step 2; the run stops here "
        "(nothing was saved after it)"
    )
    assert not any(p.is_alive() for p in envs.processes)

    parent = os.getpid()
    with pytest.raises(SystemExit) as stop:
        async_envs(*[lambda: CountingEnv(made_in=parent)] * 2)
    assert re.fullmatch(
        r"error: env worker 0 of 2 \(pid \d+\) failed: ValueError: this env cannot be made in a worker; the run "
        r"stops here \(nothing was saved after it\)",
        stop.value.code,
    ), stop.value.code


@pytest.mark.parametrize("script", SCRIPTS)
def test_resuming_a_finished_run_changes_nothing(script, reference, tmp_path):
    """No update is left: the script restores everything and saves it again, so every restored
    part (weights, optimizer, reward normalization, RNG states, counters, best return) must come
    back exactly as saved; a part restored wrongly or not at all would differ."""
    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    before, logged = load(run_dir / "checkpoint.pt"), scalars(run_dir)
    # the arguments that --resume takes from the command line, as the reference run had them
    proc = run_in_process(
        script,
        ["--resume", Path("runs") / reference.name / "checkpoint.pt", "--no-progress-bar", "--checkpoint-every", "1"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    after = load(run_dir / "checkpoint.pt")
    assert after["args"].pop("resume") == str(Path("runs") / reference.name / "checkpoint.pt")
    assert before["args"].pop("resume") is None
    assert_same(before, after)
    assert_same(load(run_dir / "model_final.pt")["agent"], before["agent"])
    assert scalars(run_dir) == logged  # nothing logged twice, nothing lost


def test_checkpoint_content_matches_the_run(script, reference):
    """What was saved is what the run had, read back the way the script reads it."""
    module = import_script(script)
    ckpt = checkpoints.load(reference / "checkpoint.pt", module)
    args = module.Args(**ckpt["args"])
    env = module.make_env(ENV, 0, False, "test")()
    obs_shape, action_dims = env.observation_space.shape, env_suites.action_dims(env.action_space)
    env.close()
    d_model = frozen_models.TINY_TRXL_CONFIG["d_model"]

    # weights and optimizer, loaded into the objects the script builds
    torch.manual_seed(12345)
    agent = module.Agent(obs_shape, action_dims, d_model)
    fresh = {k: v.clone() for k, v in agent.state_dict().items()}
    agent.load_state_dict(ckpt["agent"])
    assert_same(agent.state_dict(), ckpt["agent"])
    assert any(not torch.equal(fresh[k], v) for k, v in agent.state_dict().items())
    optimizer = torch.optim.AdamW(agent.parameters(), lr=args.learning_rate, eps=1e-8)
    optimizer.load_state_dict(ckpt["optimizer"])
    assert_same(optimizer.state_dict(), ckpt["optimizer"])
    steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {UPDATES * MINIBATCHES * EPOCHS}  # every minibatch of every update stepped once
    assert len(ckpt["optimizer"]["state"]) == len(list(agent.parameters()))

    # counters; reward normalization has seen every reward (count starts at gymnasium's 1e-4)
    assert (ckpt["iteration"], ckpt["global_step"]) == (UPDATES, UPDATES * BATCH)
    mean, var, count = ckpt["reward_rms"]
    assert count == pytest.approx(UPDATES * BATCH + 1e-4) and var > 0 and math.isfinite(mean)

    # best-return bookkeeping, recomputed from the returns TensorBoard shows
    returns = scalars(reference)["charts/episodic_return"]
    assert 0 < len(returns) < 100, "no episode ended: the returns were not tested"
    assert ckpt["recent_returns"] == pytest.approx([r for _, r in returns])
    best, best_iteration = -math.inf, None
    for i in range(1, UPDATES + 1):
        seen = [r for step, r in returns if step <= i * BATCH][-100:]
        if seen and np.mean(seen) > best:
            best, best_iteration = float(np.mean(seen)), i
    assert ckpt["best_return"] == pytest.approx(best)
    model_best = checkpoints.load(reference / "model_best.pt", module)
    assert (model_best["iteration"], model_best["best_return"]) == (best_iteration, pytest.approx(best))

    # RNG states: restoring them twice gives the same draws; the save/restore round trip is exact
    def draws():
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    checkpoints.set_rng_state(ckpt["rng"])
    assert_same(checkpoints.rng_state(), ckpt["rng"], "rng")
    first = draws()
    assert draws() != first
    checkpoints.set_rng_state(ckpt["rng"])
    assert draws() == first


def test_resume_with_weights_of_another_shape_fails_cleanly(script, reference, tmp_path, monkeypatch):
    ckpt = load(reference / "checkpoint.pt")
    name = next(k for k, v in ckpt["agent"].items() if v.dim() == 2)
    ckpt["agent"][name] = torch.zeros(ckpt["agent"][name].shape[0] + 1, ckpt["agent"][name].shape[1])
    torch.save(ckpt, tmp_path / "other.pt")
    # `python script --resume other.pt`, in this process (runpy) as it stops before training: a
    # script stops by raising SystemExit("error: ..."), which Python prints alone, with exit status 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--resume", "other.pt", "--no-progress-bar"])
    with torch.random.fork_rng(devices=[]), pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("error: checkpoint other.pt does not match this model") and name in message
    assert os.listdir(tmp_path) == ["other.pt"]  # nothing written


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_run(runs_of):
    a, b = scalars(runs_of.reference), scalars(runs_of.twin)
    a.pop("charts/SPS"), b.pop("charts/SPS")  # speed is not deterministic
    assert a.keys() == b.keys() and "losses/value_loss" in a and "charts/episodic_return" in a
    for tag in a:
        np.testing.assert_array_equal(np.array(a[tag]), np.array(b[tag]), err_msg=tag)
    ca, cb = load(runs_of.reference / "checkpoint.pt"), load(runs_of.twin / "checkpoint.pt")
    for part in ["agent", "optimizer", "rng", "reward_rms", "recent_returns", "best_return"]:
        assert_same(ca[part], cb[part], part)

    # the comparison can tell runs apart: another seed gives other losses from the first update on
    c = scalars(runs_of.other)
    for tag in ["losses/value_loss", "losses/policy_loss"]:
        assert c[tag][0][0] == a[tag][0][0] == BATCH
        assert c[tag][0][1] != a[tag][0][1], tag


# ---------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------


def test_nonfinite_losses_abort_with_a_checkpoint(script, reference, tmp_path):
    """Two more updates of the reference run at a learning rate of 1e20 (finite and positive, so
    accepted): the first optimizer step wrecks the weights and every later loss is non-finite, i.e.
    minibatch 2 of update 5, then both of update 6; the third in a row aborts. (A fresh run with
    --learning-rate 1e20 does the same; going on from a checkpoint shows that it survives.)"""
    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    ckpt = load(run_dir / "checkpoint.pt")
    ckpt["args"].update(total_timesteps=(UPDATES + 2) * BATCH, nonfinite_limit=3, learning_rate=1e20)
    ckpt["optimizer"]["param_groups"][0]["lr"] = 1e20  # a restored optimizer keeps its own
    torch.save(ckpt, run_dir / "checkpoint.pt")
    good = (run_dir / "checkpoint.pt").read_bytes()
    resume = Path("runs") / reference.name / "checkpoint.pt"
    proc = run_script(
        script, ["--resume", resume, "--no-progress-bar", "--checkpoint-every", "1"], tmp_path, timeout=WAIT
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if "UserWarning: non-finite loss or gradient" in line]
    assert [line.split("(")[-1] for line in skipped] == ["1 in a row)", "2 in a row)", "3 in a row)"]
    line = error_line(proc)
    assert line.startswith(f"error: 3 non-finite losses or gradients in a row at step {(UPDATES + 2) * BATCH}; ")
    # the saved state may be one --resume refuses (NaN weights): the line then says so after this
    assert f"state saved to {resume.with_name('checkpoint_nonfinite.pt')} (last periodic checkpoint: {resume})" in line
    saved = load(run_dir / "checkpoint_nonfinite.pt")
    assert (saved["iteration"], saved["global_step"]) == (UPDATES + 2, (UPDATES + 2) * BATCH)
    # update 5 ended inside the run of non-finite losses: a periodic checkpoint would have put the
    # wrecked weights in place of the last good ones
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# Atomic writes and a full disk
# ---------------------------------------------------------------------------------------------


def limit_file_size(nbytes):
    """preexec_fn: files cannot grow past nbytes (writes fail with EFBIG; Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_checkpoint_that_cannot_be_written_leaves_the_previous_one(script, reference, tmp_path):
    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    previous = (run_dir / "checkpoint.pt").read_bytes()
    resume = Path("runs") / reference.name / "checkpoint.pt"
    # room for the log, not for the checkpoint (written again at the end of a resumed finished run)
    proc = run_script(
        script,
        ["--resume", resume, "--no-progress-bar"],
        tmp_path,
        timeout=WAIT,
        preexec_fn=limit_file_size(len(previous) // 2),
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_line(proc) == f"error: could not write {resume}: File too large; nothing was overwritten"
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [error_line(proc)]
    assert (run_dir / "checkpoint.pt").read_bytes() == previous
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_embeddings_that_cannot_be_written_leave_nothing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prepare_embeddings.py"),
            "--clip-model",
            "tiny-random",
            "--trxl-model",
            "tiny-random",
            "--out-dir",
            "data",
        ],
        cwd=tmp_path,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
        preexec_fn=limit_file_size(64 * 1024),
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_line(proc).startswith("error: could not write data/shelm_vocab__")
    assert error_line(proc).endswith(": File too large; nothing was overwritten")
    assert list((tmp_path / "data").iterdir()) == []


def test_write_atomically_on_a_full_disk(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"previous")

    def half_then_full(f):
        f.write(b"half a")
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SystemExit) as exit_info:
        files.write_atomically(path, half_then_full)
    assert str(exit_info.value) == f"error: could not write {path}: No space left on device; nothing was overwritten"
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_write_atomically_on_a_crash(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"previous")

    def half_then_interrupted(f):
        f.write(b"half a")
        f.flush()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(path, half_then_interrupted)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]

    # killed outright in the middle of the write: no cleanup can run, the previous file is intact
    code = (
        "import os, signal, helm_utils.files as p\n"
        "def w(f):\n    f.write(b'half a')\n    f.flush()\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"p.write_atomically({str(path)!r}, w)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=offline_env())
    assert proc.wait(timeout=WAIT) == -signal.SIGKILL
    assert path.read_bytes() == b"previous"
    left = sorted(p.name for p in tmp_path.iterdir())  # documented: .<name>.<random>.tmp
    assert len(left) == 2 and left[1] == "state.pt" and re.fullmatch(r"\.state\.pt\.[0-9a-f]{16}\.tmp", left[0])
    assert Path(tmp_path / left[0]).read_bytes() == b"half a"


def test_write_atomically_protocol(tmp_path, monkeypatch):
    """Temporary file in the same directory, written, fsynced, renamed over the target, directory fsynced."""
    path = tmp_path / "state.pt"
    path.write_bytes(b"previous")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)

    def write(f):
        events.append(("write", os.readlink(f"/proc/self/fd/{f.fileno()}")))
        f.write(b"new")

    files.write_atomically(path, write)
    tmp = events[0][1]
    assert Path(tmp).parent == tmp_path and tmp != str(path)
    assert events == [("write", tmp), ("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


# ---------------------------------------------------------------------------------------------
# Checkpoints from elsewhere (docs/reliability.md, trust model): every crafted one ends in one line
# ---------------------------------------------------------------------------------------------


def setter(*keys, value):
    def edit(ckpt):
        target = ckpt
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value

    return edit


def first_float(state):
    return next(k for k, v in state.items() if v.is_floating_point())


def nan_first(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


CHECKPOINT_CASES = {
    "not-a-dict": (lambda c: c.clear(), ["is not a checkpoint of these scripts"]),
    "missing-agent": (lambda c: c.pop("agent"), ["agent is missing"]),
    "missing-rng": (lambda c: c.pop("rng"), ["rng is missing"]),
    "iteration-a-string": (setter("iteration", value="4"), ["iteration is str"]),
    "iteration-a-bool": (setter("iteration", value=True), ["iteration is bool"]),
    "args-a-list": (setter("args", value=[]), ["args is list"]),
    "args-unknown": (setter("args", "no_such_flag", value=1), ["other arguments than this script has: no_such_flag"]),
    "args-string-for-int": (setter("args", "num_envs", value="4"), ["argument num_envs is '4'"]),
    "args-bool-for-int": (setter("args", "num_steps", value=True), ["argument num_steps is True"]),
    "args-not-in-literal": (setter("args", "memory_reset", value="sideways"), ["memory_reset is 'sideways'"]),
    "args-negative-seed": (setter("args", "seed", value=-1), ["out of range", "--seed"]),
    "args-infinite-vf-coef": (setter("args", "vf_coef", value=math.inf), ["out of range", "--vf-coef"]),
    "args-exp-name-escapes": (setter("args", "exp_name", value="../../x"), ["--exp-name"]),
    "run-name-absolute": (setter("run_name", value="/elsewhere"), ["run_name '/elsewhere' leaves runs/"]),
    "run-name-dotdot": (setter("run_name", value="a/../../elsewhere"), ["leaves runs/"]),
    "run-name-a-number": (setter("run_name", value=5), ["run_name is int"]),
    "run-name-too-long": (setter("run_name", value="x" * 300), ["300 bytes long"]),
    "wandb-id-a-path": (setter("wandb_id", value="../../x"), ["not a wandb run id"]),
    "agent-nan": (lambda c: setter("agent", first_float(c["agent"]), value=nan_first)(c), ["NaN", "agent"]),
    "agent-nested": (setter("agent", value=lambda a: {"query": a}), ["entry 'query' is a", "not a named tensor"]),
    "agent-a-list": (lambda c: setter("agent", next(iter(c["agent"])), value=[1.0])(c), ["is a list"]),
    "encoder-nan": (setter("encoder", value={"x": torch.tensor([math.nan])}), ["encoder state", "NaN"]),
    "optimizer-lr-nan": (setter("optimizer", "param_groups", 0, "lr", value=math.nan), ["learning rate"]),
    "optimizer-no-groups": (setter("optimizer", value={}), ["optimizer state is malformed"]),
    "optimizer-state-inf": (setter("optimizer", "state", 0, "exp_avg", value=lambda t: t / 0), ["optimizer state"]),
    "global-step-off": (setter("global_step", value=lambda s: s + 1), ["inconsistent counters"]),
    "iteration-beyond-the-run": (
        lambda c: c.update(iteration=UPDATES + 1, global_step=(UPDATES + 1) * BATCH),
        ["inconsistent counters"],
    ),
    "iteration-negative": (lambda c: c.update(iteration=-1, global_step=-BATCH), ["inconsistent counters"]),
    "recent-returns-nan": (setter("recent_returns", value=[math.nan]), ["recent_returns"]),
    "recent-returns-too-many": (setter("recent_returns", value=[0.0] * 101), ["recent_returns"]),
    "best-return-nan": (setter("best_return", value=math.nan), ["best_return"]),
    "best-return-inf": (setter("best_return", value=math.inf), ["best_return"]),
    "reward-rms-negative-variance": (setter("reward_rms", value=(0.0, -1.0, 5.0)), ["reward_rms"]),
    "reward-rms-short": (setter("reward_rms", value=(0.0, 1.0)), ["reward_rms"]),
    "rng-missing-numpy": (lambda c: c["rng"].pop("numpy"), ["RNG states"]),
    # every field of the optimizer state (it was used as it came: a NaN eps trained on into NaN weights)
    "optimizer-eps-nan": (setter("optimizer", "param_groups", 0, "eps", value=math.nan), ["eps"]),
    "optimizer-eps-zero-in-float32": (setter("optimizer", "param_groups", 0, "eps", value=1e-50), ["eps"]),
    "optimizer-betas-above-1": (setter("optimizer", "param_groups", 0, "betas", value=(2.0, 0.999)), ["betas"]),
    "optimizer-betas-a-string": (setter("optimizer", "param_groups", 0, "betas", value="x"), ["betas"]),
    "optimizer-weight-decay-nan": (setter("optimizer", "param_groups", 0, "weight_decay", value=math.nan), ["decay"]),
    "optimizer-amsgrad": (setter("optimizer", "param_groups", 0, "amsgrad", value=True), ["amsgrad is True"]),
    "optimizer-without-betas": (lambda c: c["optimizer"]["param_groups"][0].pop("betas"), ["missing betas"]),
    "optimizer-two-groups": (lambda c: c["optimizer"]["param_groups"].append({}), ["2 parameter groups"]),
    "optimizer-params-repeated": (
        setter("optimizer", "param_groups", 0, "params", value=lambda p: [0] * len(p)),
        ["distinct"],
    ),
    "optimizer-step-negative": (setter("optimizer", "state", 0, "step", value=torch.tensor(-5.0)), ["step must be"]),
    "optimizer-step-a-list": (setter("optimizer", "state", 0, "step", value=[1]), ["step must be a scalar"]),
    "optimizer-moment-complex": (setter("optimizer", "state", 0, "exp_avg", value=lambda t: t.cfloat()), ["complex64"]),
    "optimizer-moment-float64": (setter("optimizer", "state", 0, "exp_avg", value=lambda t: t.double()), ["float32"]),
    "optimizer-second-moment-negative": (
        setter("optimizer", "state", 0, "exp_avg_sq", value=lambda t: -t - 1),
        [">= 0"],
    ),
    "optimizer-unknown-state": (setter("optimizer", "state", 0, "momentum", value=torch.zeros(1)), ["malformed"]),
    # RNG states, tried on generators of their own (a list for NumPy's key was an AttributeError)
    "rng-numpy-key-a-list": (
        lambda c: c["rng"].update(numpy=(c["rng"]["numpy"][0], c["rng"]["numpy"][1].tolist(), *c["rng"]["numpy"][2:])),
        ["RNG states", "int64 tensor"],
    ),
    "rng-torch-short": (setter("rng", "torch", value=lambda t: t[:10]), ["RNG states"]),
    "rng-python-garbage": (setter("rng", "python", value=(3, (1, 2), None)), ["RNG states"]),
    # dtypes: loading casts another one without a word (a complex one with torch's warning)
    "agent-complex": (lambda c: setter("agent", first_float(c["agent"]), value=lambda t: t.cfloat())(c), ["complex64"]),
    "agent-float64": (lambda c: setter("agent", first_float(c["agent"]), value=lambda t: t.double())(c), ["float64"]),
    "agent-sparse": (lambda c: setter("agent", first_float(c["agent"]), value=lambda t: t.to_sparse())(c), ["dense"]),
    "meta-versions-a-list": (setter("meta", "versions", value=[1]), ["meta is malformed"]),
    # numbers that pass as float64 and overflow once used in float32
    "recent-returns-beyond-float32": (setter("recent_returns", value=[1e308]), ["float32"]),
    "reward-rms-beyond-float32": (setter("reward_rms", value=(1e308, 1e308, 1e308)), ["reward_rms"]),
    "args-learning-rate-zero-in-float32": (
        setter("args", "learning_rate", value=1e-50),
        ["--learning-rate", "float32"],
    ),
    # sizes: what the run would allocate
    "args-mem-len-beyond-memory": (setter("args", "mem_len", value=10**9), ["--mem-len 1000000000", "more than"]),
    # an env id of a file from elsewhere names no module to import
    "env-id-names-a-module": (setter("args", "env_id", value="this:Foo-v0"), ["names a module", "--env-id this:Foo"]),
    "env-id-unregistered": (setter("args", "env_id", value="NoSuchEnv-v0"), ["neither a registered environment"]),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES.values(), ids=CHECKPOINT_CASES.keys())
def test_crafted_checkpoint_refused(script, reference, case, cache):
    """checkpoints.check, which --resume and enjoy.py both call on the one read of a checkpoint."""
    if ("module", script) not in cache:
        cache["module", script] = import_script(script), load(reference / "checkpoint.pt")
    module, good = cache["module", script]
    ckpt = copy.deepcopy(good)
    edit, phrases = case
    edit(ckpt)
    with pytest.raises(SystemExit) as stop:
        checkpoints.check(ckpt, "crafted.pt", module)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert checkpoints.check(copy.deepcopy(good), "good.pt", module) is not None  # the edit's doing


def run_main(script, args, cwd, monkeypatch):
    """`python script args` in this process; returns the SystemExit code (a message: exit status 1)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *map(str, args)])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with torch.random.fork_rng(devices=[]), pytest.raises(SystemExit) as stop:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:  # the script installs its own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return stop.value.code


def test_resume_of_a_crafted_checkpoint_writes_nothing(script, reference, tmp_path, monkeypatch):
    # end to end: a run_name that leaves runs/ (the checkpoint would decide where files go)
    ckpt = load(reference / "checkpoint.pt")
    ckpt["run_name"] = "../../elsewhere"
    torch.save(ckpt, tmp_path / "crafted.pt")
    message = run_main(script, ["--resume", "crafted.pt", "--no-progress-bar"], tmp_path, monkeypatch)
    assert message == "error: checkpoint crafted.pt: run_name '../../elsewhere' leaves runs/: it must be relative, " + (
        "without '..', control characters or '\\'"
    )
    assert os.listdir(tmp_path) == ["crafted.pt"]


def test_enjoy_refuses_a_crafted_checkpoint(reference, tmp_path, monkeypatch, capsys):
    """enjoy.py reads a checkpoint once and validates it as --resume does (an unknown argument was a TypeError)."""
    import enjoy

    ckpt = load(reference / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    torch.save({**ckpt, "args": {**ckpt["args"], "no_such_flag": 1}}, tmp_path / "crafted.pt")
    ckpt["args"]["env_id"] = "this:Foo-v0"  # gymnasium would import the module `this` (it prints a poem)
    torch.save(ckpt, tmp_path / "module.pt")
    for cli, phrase in [
        (enjoy.Args(checkpoint="crafted.pt"), "other arguments than this script has: no_such_flag"),
        (enjoy.Args(checkpoint="module.pt"), "env_id 'this:Foo-v0' names a module to import"),
        (enjoy.Args(checkpoint=str(reference / "checkpoint.pt"), seed=-1), "--seed must be >= 0 and < 2**32, got -1"),
    ]:
        with pytest.raises(SystemExit) as stop:
            enjoy.main(cli)
        assert stop.value.code.startswith("error: ") and phrase in stop.value.code, stop.value.code
    assert sorted(os.listdir(tmp_path)) == ["crafted.pt", "module.pt"]


@pytest.mark.parametrize("script", ["shelm_ppo.py"])  # the one script with a directory to write: OUTPUT_DIRS
def test_checkpoint_cannot_have_embeddings_written_elsewhere(reference, tmp_path, monkeypatch):
    """SHELM's embeddings_dir in a checkpoint lies outside the working directory: read there, never written."""
    ckpt = load(reference / "checkpoint.pt")
    elsewhere = tmp_path / "elsewhere"
    ckpt["args"]["embeddings_dir"] = str(elsewhere)
    (tmp_path / "cwd").mkdir()
    torch.save(ckpt, tmp_path / "cwd" / "crafted.pt")
    message = run_main("shelm_ppo.py", ["--resume", "crafted.pt", "--no-progress-bar"], tmp_path / "cwd", monkeypatch)
    assert (
        message.startswith(f"error: embeddings file {elsewhere}/shelm_vocab__") and "give --embeddings-dir" in message
    )
    assert not elsewhere.exists() and os.listdir(tmp_path / "cwd") == ["crafted.pt"]


# ---------------------------------------------------------------------------------------------
# Run directories: one process each, never moved back in time; atomic writes follow no link
# ---------------------------------------------------------------------------------------------


def test_run_directory_is_claimed_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, first_lock = runs.claim_run_dir("env__exp__1__100", new=True)
    second, second_lock = runs.claim_run_dir("env__exp__1__100", new=True)  # started in the same second
    assert (first, second) == (Path("runs/env__exp__1__100"), Path("runs/env__exp__1__100-2"))
    with pytest.raises(SystemExit) as stop:  # resumed while the first process runs: one line
        runs.claim_run_dir("env__exp__1__100", new=False)
    assert stop.value.code == (
        "error: runs/env__exp__1__100 is in use by another process (it holds runs/env__exp__1__100/.lock); "
        "one run, one process"
    )
    os.close(first_lock)  # the first process ends: its lock goes with it
    again, _ = runs.claim_run_dir("env__exp__1__100", new=False)
    assert again == first and sorted(os.listdir("runs")) == ["env__exp__1__100", "env__exp__1__100-2"]


def test_resume_of_a_run_in_use_is_refused(script, reference, tmp_path, monkeypatch):
    import fcntl

    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    lock = os.open(run_dir / ".lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the process running it holds it
    try:
        resume = Path("runs") / reference.name / "checkpoint.pt"
        message = run_main(script, ["--resume", resume, "--no-progress-bar"], tmp_path, monkeypatch)
    finally:
        os.close(lock)
    assert message.startswith(f"error: runs/{reference.name} is in use by another process")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_resume_from_an_older_checkpoint_goes_on_in_a_new_run(script, reference, tmp_path):
    """model_best.pt of update 3 of a run whose checkpoint.pt is at update 4: resuming it in place would move
    checkpoint.pt and model_final.pt back in time. It goes on in a new run directory instead."""
    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    older = load(run_dir / "checkpoint.pt")
    older.update(iteration=UPDATES - 1, global_step=(UPDATES - 1) * BATCH)
    torch.save(older, run_dir / "model_best.pt")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    resume = Path("runs") / reference.name / "model_best.pt"
    proc = run_in_process(script, ["--resume", resume, "--no-progress-bar"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"is further than {resume}: going on in a new run" in proc.stdout
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # the old run as it was
    (new_dir,) = [d for d in (tmp_path / "runs").iterdir() if d != run_dir]
    final = load(new_dir / "checkpoint.pt")
    assert final["run_name"] == new_dir.name and final["wandb_id"] is None
    assert (final["iteration"], final["global_step"]) == (UPDATES, UPDATES * BATCH)
    assert [s for s, _ in scalars(new_dir)["losses/value_loss"]] == [UPDATES * BATCH]  # the one update left


def test_runs_started_together_and_a_late_signal(script, shared, tmp_path):
    """Two identical runs started at once (the same name if in the same second) get a directory each; a
    SIGTERM right after a run's last checkpoint lets it end as it was going to (it used to die with -15)."""
    args = train_args(script, shared, save_model=True, total_timesteps=BATCH)
    procs = []
    for i in range(2):
        with open(tmp_path / f"out{i}.txt", "w") as out, open(tmp_path / f"err{i}.txt", "w") as err:
            command = [sys.executable, str(ROOT / script), *map(str, args)]
            env = offline_env()
            procs.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err))
    signalled, deadline = set(), time.time() + WAIT
    while len(signalled) < 2 and time.time() < deadline:
        for i, proc in enumerate(procs):
            if i not in signalled and "model saved to" in (tmp_path / f"out{i}.txt").read_text():
                proc.send_signal(signal.SIGTERM)
                signalled.add(i)
        time.sleep(0.01)
    codes = [proc.wait(timeout=WAIT) for proc in procs]
    assert codes == [0, 0], [(tmp_path / f"err{i}.txt").read_text()[-2000:] for i in range(2)]
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        final = load(run_dir / "checkpoint.pt")
        assert final["run_name"] == run_dir.name and final["iteration"] == 1
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # one process's logs each


def test_write_atomically_follows_no_link(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "run" / "state.pt"
    path.parent.mkdir()
    # a link at the target's name: the rename replaces the link, its target stays as it was
    path.symlink_to(victim)
    files.write_atomically(path, lambda f: f.write(b"new"))
    assert not path.is_symlink() and path.read_bytes() == b"new" and victim.read_bytes() == b"precious"
    # a link at the temporary file's name (were its random part guessed): refused, nothing followed or removed
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "0" * 2 * n)
    planted = path.with_name(f".state.pt.{'0' * 16}.tmp")
    planted.symlink_to(victim)
    with pytest.raises(SystemExit) as stop:
        files.write_atomically(path, lambda f: f.write(b"newer"))
    assert stop.value.code == f"error: could not write {path}: File exists; nothing was overwritten"
    assert victim.read_bytes() == b"precious" and path.read_bytes() == b"new" and planted.is_symlink()


# ---------------------------------------------------------------------------------------------
# A run never writes what its own --resume refuses; a checkpoint of another run never continues in place
# ---------------------------------------------------------------------------------------------


def test_env_id_from_a_checkpoint_imports_nothing(script, reference, tmp_path, monkeypatch, cache):
    """gymnasium imports the module of an env id `module:Env-v0` before it looks the env up: from a file made
    elsewhere only registered envs and the known suites pass, before anything is imported; from the command line
    (or the run's own, when a run saves) the id is the user's own."""
    (tmp_path / "planted_env_module.py").write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n")
    monkeypatch.syspath_prepend(tmp_path)
    module = import_script(script)
    ckpt = load(reference / "checkpoint.pt")
    ckpt["args"]["env_id"] = "planted_env_module:Foo-v0"
    with pytest.raises(SystemExit) as stop:
        checkpoints.check(copy.deepcopy(ckpt), "crafted.pt", module)
    assert "names a module to import" in stop.value.code
    assert checkpoints.check(ckpt, "crafted.pt", module, env_id="planted_env_module:Foo-v0") is ckpt
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("case", ["moments-of-another-shape", "encoder-state-of-another-dtype"])
def test_resume_refuses_a_state_that_does_not_fit_the_model(script, reference, case, tmp_path, monkeypatch):
    """What only the model built for the checkpoint can tell: AdamW's moments of another shape (torch loads them,
    the first step fails), an encoder state of another dtype (loading would cast it without a word)."""
    ckpt = load(reference / "checkpoint.pt")
    if case == "moments-of-another-shape":
        ckpt["optimizer"]["state"][0].update(exp_avg=torch.zeros(3, 3), exp_avg_sq=torch.zeros(3, 3))
        phrase = "the optimizer state of parameter 0 is (3, 3)"
    else:
        ckpt["encoder"]["mean"] = ckpt["encoder"]["mean"].float()  # HELMv2's running statistics are float64
        phrase = "the encoder state's mean is float32, this model's float64"
    torch.save(ckpt, tmp_path / "crafted.pt")
    message = run_main(script, ["--resume", "crafted.pt", "--no-progress-bar"], tmp_path, monkeypatch)
    assert message.startswith("error: checkpoint crafted.pt") and phrase in message, message
    assert os.listdir(tmp_path) == ["crafted.pt"]


def test_a_state_that_resume_refuses_is_never_saved(script, reference, tmp_path, monkeypatch):
    """Every checkpoint a run writes (periodic, best, final, on a signal) is checked as --resume checks it: a state
    that fails (here NaN weights) replaces no file; it goes to checkpoint_nonfinite.pt and the run stops, one line."""
    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    monkeypatch.chdir(tmp_path)
    module = import_script(script)
    ckpt = checkpoints.load(run_dir / "checkpoint.pt", module)
    weights = copy.deepcopy(ckpt["agent"])
    weights[first_float(weights)] = nan_first(weights[first_float(weights)])
    run = runs.Run.__new__(runs.Run)  # a run's save() alone: what it needs, as start() leaves it
    run.args, run.script, run.dir = module.Args(**ckpt["args"]), module, Path("runs") / reference.name
    run.info = {key: ckpt[key] for key in ("algorithm", "args", "meta", "run_name", "wandb_id")}
    run.agent = SimpleNamespace(state_dict=lambda: weights)
    run.optimizer = SimpleNamespace(state_dict=lambda: ckpt["optimizer"])
    run.writer = SimpleNamespace(flush=lambda: None, close=lambda: None)
    state = {key: ckpt[key] for key in ("iteration", "global_step", "best_return", "recent_returns", "rng")}
    state.update(reward_rms=ckpt["reward_rms"], encoder=ckpt["encoder"])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    for name in ["checkpoint.pt", "model_final.pt", "model_best.pt"]:
        with pytest.raises(SystemExit) as stop:
            run.save(name, state)
        message = stop.value.code
        assert message.startswith(f"error: the state at step {UPDATES * BATCH} fails --resume's checks (")
        assert "holds NaN or infinite values" in message and "checkpoint_nonfinite.pt" in message
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != "checkpoint_nonfinite.pt"} == before
    assert torch.isnan(load(run_dir / "checkpoint_nonfinite.pt")["agent"][first_float(weights)]).any()


def test_a_run_that_ends_skipping_updates_fails_and_keeps_its_files(script, reference, tmp_path, monkeypatch):
    """Two more updates at a learning rate of 1e20, the non-finite limit out of reach: every minibatch after the
    first is skipped. The run used to end with exit 0, its checkpoint.pt and model_final.pt replaced by the wrecked
    weights; it now ends as the guard does (one line, exit 1, checkpoint_nonfinite.pt), the good files untouched."""
    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    ckpt = load(run_dir / "checkpoint.pt")
    ckpt["args"].update(total_timesteps=(UPDATES + 2) * BATCH, nonfinite_limit=1000, learning_rate=1e20)
    ckpt["optimizer"]["param_groups"][0]["lr"] = 1e20
    torch.save(ckpt, run_dir / "checkpoint.pt")
    before = {name: (run_dir / name).read_bytes() for name in ["checkpoint.pt", "model_final.pt", "model_best.pt"]}
    resume = Path("runs") / reference.name / "checkpoint.pt"
    with pytest.warns(UserWarning, match="update skipped"):
        message = run_main(
            script, ["--resume", resume, "--no-progress-bar", "--checkpoint-every", "1"], tmp_path, monkeypatch
        )
    assert message.startswith("error: the run ended with ") and "non-finite losses or gradients in a row" in message
    assert f"state saved to {resume.with_name('checkpoint_nonfinite.pt')}" in message
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_a_checkpoint_of_another_run_does_not_continue_in_place(script, reference, tmp_path, monkeypatch, capsys):
    """A checkpoint that names a local run continues it in place only if it is that run's own (the same defining
    arguments) and not behind it; another run's file (here another env_id, at the same step) starts a new run, so
    that it cannot rewrite the local run's files. Run() decides it and writes nothing."""
    shutil.copytree(reference.parent, tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    module = import_script(script)
    own = load(reference / "checkpoint.pt")

    def run_of(ckpt, path):
        torch.save(ckpt, path)
        args = module.Args(**ckpt["args"])
        args.resume = str(path)
        return runs.Run(args, ckpt, module)

    # a copy of the run's own latest state, and its checkpoint with an override (--checkpoint-every): in place
    assert not run_of(own, tmp_path / "copy.pt").new
    assert not run_of({**own, "args": {**own["args"], "checkpoint_every": 7}}, tmp_path / "copy.pt").new
    foreign = copy.deepcopy(own)
    foreign["args"]["env_id"] = "MiniGrid-Empty-5x5-v0"
    run = run_of(foreign, tmp_path / "foreign.pt")
    assert run.new and run.name != own["run_name"]
    assert "is of another run than" in capsys.readouterr().out
    # a run directory without checkpoints (its first update never ended) is not taken over either
    for name in runs.CHECKPOINT_FILES:
        (tmp_path / "runs" / reference.name / name).unlink(missing_ok=True)
    assert run_of(own, tmp_path / "copy.pt").new
    assert not (tmp_path / "runs" / own["run_name"] / "checkpoint.pt").exists()


def test_a_resumed_run_keeps_its_earlier_videos(tmp_path, monkeypatch, capsys):
    """gymnasium's RecordVideo numbers a resumed run's episodes from 0 again, in the run's video folder: the videos
    of the earlier processes move to a folder of their own first, so that none is replaced."""
    monkeypatch.chdir(tmp_path)
    video_dir = Path("videos") / "env__exp__1__100"
    video_dir.mkdir(parents=True)
    (video_dir / "rl-video-episode-0.mp4").write_bytes(b"first process")
    (video_dir / "before-step-64").mkdir()  # resumed at this step before
    runs.keep_earlier_videos(video_dir, 64)
    assert (video_dir / "before-step-64-2" / "rl-video-episode-0.mp4").read_bytes() == b"first process"
    assert not list(video_dir.glob("*.mp4"))
    assert f"kept in {video_dir / 'before-step-64-2'}" in capsys.readouterr().out


def test_a_checkpoint_from_elsewhere_continues_under_its_name(script, reference, tmp_path, monkeypatch):
    """A checkpoint whose run directory does not exist here goes on in runs/<its run_name>, created for it."""
    shutil.copy(reference / "checkpoint.pt", tmp_path / "downloaded.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--resume", "downloaded.pt", "--no-progress-bar"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with torch.random.fork_rng(devices=[]):
            runpy.run_path(str(ROOT / script), run_name="__main__")  # a finished run: saved again, exit 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert load(tmp_path / "runs" / reference.name / "checkpoint.pt")["run_name"] == reference.name
