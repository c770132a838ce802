"""Reliability of the training scripts (docs/reliability.md): resume, interruption by SIGTERM and
SIGKILL, periodic and atomic checkpoints, determinism, the non-finite guard, a full disk.

Every run is a few updates of the tiny random models on CPU. The runs of a script that several
tests read (an uninterrupted reference run, its twin, one with another seed, the interrupted runs and
their resumptions) are made once per module, independent ones side by side."""

import errno
import importlib.util
import math
import os
import random
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import prepare_embeddings
from conftest import QUICK, ROOT, error_line, offline_env, run_script, tiny_args

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
    spec.loader.exec_module(module)
    return module


def start(script, args, cwd):
    """A training run in the background, in cwd (created); its output goes to files there. One
    thread each: runs side by side with torch's default threads spin against each other."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / script), *map(str, args)],
            cwd=cwd,
            env=dict(offline_env(), OMP_NUM_THREADS="1"),
            stdout=out,
            stderr=err,
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


def side_by_side(script, runs):
    """{name: (args, cwd)} run concurrently (independent runs; the machine has 2 cores) -> {name: result}."""
    procs = {name: start(script, args, cwd) for name, (args, cwd) in runs.items()}
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
def runs(script, shared, cache):
    """Run directories of an uninterrupted run of `script` (`reference`), of the same run again
    (`twin`), and of one update with another seed (`other`), made side by side on first use."""
    if ("runs", script) not in cache:
        base = shared / script[:-3]
        results = side_by_side(
            script,
            {
                "reference": (train_args(script, shared, save_model=True), base / "reference"),
                "twin": (train_args(script, shared, save_model=True), base / "twin"),
                "other": (train_args(script, shared, seed=2, total_timesteps=BATCH), base / "other"),
            },
        )
        for name, result in results.items():
            assert result.returncode == 0, f"{name}: {result.stderr}"
        cache["runs", script] = SimpleNamespace(**{name: run_dir_of(base / name) for name in results})
    return cache["runs", script]


@pytest.fixture
def reference(runs):
    """Run directory of the uninterrupted run (read only: copy it to change it)."""
    return runs.reference


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
        for r in result.values():
            r.saved = load(r.path)
            r.leftovers = [p.name for p in r.path.parent.iterdir() if ".tmp" in p.name]
        resumed = side_by_side(
            script,
            {
                sig: (["--resume", r.path.relative_to(base / sig.name), "--no-progress-bar"], base / sig.name)
                for sig, r in result.items()
            },
        )
        for sig, r in result.items():
            r.resumed, r.final, r.loss_steps = (
                resumed[sig],
                load(r.path),
                [s for s, _ in scalars(r.path.parent)["losses/value_loss"]],
            )
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


def test_resuming_a_finished_run_changes_nothing(script, reference, tmp_path):
    """No update is left: the script restores everything and saves it again, so every restored
    part (weights, optimizer, reward normalization, RNG states, counters, best return) must come
    back exactly as saved; a part restored wrongly or not at all would differ."""
    shutil.copytree(reference.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / reference.name
    before, logged = load(run_dir / "checkpoint.pt"), scalars(run_dir)
    # the arguments that --resume takes from the command line, as the reference run had them
    proc = run_script(
        script,
        ["--resume", Path("runs") / reference.name / "checkpoint.pt", "--no-progress-bar", "--checkpoint-every", "1"],
        tmp_path,
        timeout=WAIT,
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
    ckpt = module.load_checkpoint(reference / "checkpoint.pt")
    args = module.Args(**ckpt["args"])
    env = module.make_env(ENV, 0, False, "test")()
    obs_shape, action_dims = env.observation_space.shape, module.action_dims(env.action_space)
    env.close()
    d_model = prepare_embeddings.TINY_TRXL_CONFIG["d_model"]

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
    model_best = module.load_checkpoint(reference / "model_best.pt")
    assert (model_best["iteration"], model_best["best_return"]) == (best_iteration, pytest.approx(best))

    # RNG states: restoring them twice gives the same draws; the save/restore round trip is exact
    def draws():
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    module.set_rng_state(ckpt["rng"])
    assert_same(module.rng_state(), ckpt["rng"], "rng")
    first = draws()
    assert draws() != first
    module.set_rng_state(ckpt["rng"])
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


def test_same_seed_same_run(runs):
    a, b = scalars(runs.reference), scalars(runs.twin)
    a.pop("charts/SPS"), b.pop("charts/SPS")  # speed is not deterministic
    assert a.keys() == b.keys() and "losses/value_loss" in a and "charts/episodic_return" in a
    for tag in a:
        np.testing.assert_array_equal(np.array(a[tag]), np.array(b[tag]), err_msg=tag)
    ca, cb = load(runs.reference / "checkpoint.pt"), load(runs.twin / "checkpoint.pt")
    for part in ["agent", "optimizer", "rng", "reward_rms", "recent_returns", "best_return"]:
        assert_same(ca[part], cb[part], part)

    # the comparison can tell runs apart: another seed gives other losses from the first update on
    c = scalars(runs.other)
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
    assert line.endswith(
        f"state saved to {resume.with_name('checkpoint_nonfinite.pt')} (last periodic checkpoint: {resume})"
    )
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

    def half_then_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a")
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SystemExit) as exit_info:
        prepare_embeddings.write_atomically(path, half_then_full)
    assert str(exit_info.value) == f"error: could not write {path}: No space left on device; nothing was overwritten"
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_write_atomically_on_a_crash(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"previous")

    def half_then_interrupted(tmp):
        Path(tmp).write_bytes(b"half a")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_embeddings.write_atomically(path, half_then_interrupted)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]

    # killed outright in the middle of the write: no cleanup can run, the previous file is intact
    code = (
        "import os, signal, prepare_embeddings as p\n"
        "def w(tmp):\n    open(tmp, 'wb').write(b'half a')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"p.write_atomically({str(path)!r}, w)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=offline_env())
    assert proc.wait(timeout=WAIT) == -signal.SIGKILL
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".state.pt.tmp{proc.pid}", "state.pt"]  # documented


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

    monkeypatch.setattr(prepare_embeddings.os, "fsync", fsync)
    monkeypatch.setattr(prepare_embeddings.os, "replace", replace)

    def write(tmp):
        events.append(("write", str(tmp)))
        Path(tmp).write_bytes(b"new")

    prepare_embeddings.write_atomically(path, write)
    tmp = events[0][1]
    assert Path(tmp).parent == tmp_path and tmp != str(path)
    assert events == [("write", tmp), ("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
