"""A checkpoint written by an older version of the code still resumes and plays as it did.

tests/fixtures/legacy/helmv2_checkpoint.pt was written by helmv2_ppo.py of commit
bf89a3b26cd618edb5b779bdedf7a76e040fb204 (a run of 4 updates stopped by SIGTERM after its 2nd), and
helmv2_resumed.json / helmv2_enjoy_trace.jsonl hold what that commit's helmv2_ppo.py --resume and
enjoy.py made of it (tests/fixtures/legacy/README.md: how, and why these files are never regenerated
with newer code). Today's code must resume the checkpoint to the same final checkpoint and the same logged
scalars, and play it to the same trace.

"The same" is exact for everything discrete: counters, arguments, RNG states, episodes, actions, words,
returns. It is not bitwise for what is computed in floating point: the expected results were made on one
machine, the test runs on another, whose kernels round otherwise (AVX2, AVX-512, none: ATEN_CPU_CAPABILITY)
and even draw the tiny random models' weights otherwise (torch's normal_ has a vectorised and a scalar
kernel); HELMv2's standardisation of the tiny random CLIP's embeddings magnifies such differences. With
ATEN_CPU_CAPABILITY=default the losses move by up to 1% of their scale and the weights' change in the resumed
updates by up to 5%, while every discrete outcome stays: the tolerances below are 5x that. A resume that
restores something wrongly changes what follows by far more: other episodes (the RNG), other updates (the
optimizer's moments, the encoder's statistics, the reward normalisation).

The expected results hold for the library versions recorded in the fixtures (`meta.versions`): with
other versions of torch & co. the numbers may legitimately differ (see the README)."""

import dataclasses
import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, offline_env, run_in_process
from helm_utils import checkpoints, runs
from helm_utils.arguments import COMPUTED, RESUME_OVERRIDES

LEGACY = ROOT / "tests" / "fixtures" / "legacy"
CHECKPOINT = LEGACY / "helmv2_checkpoint.pt"
RESUMED = LEGACY / "helmv2_resumed.json"
TRACE = LEGACY / "helmv2_enjoy_trace.jsonl"
ENJOY_ARGS = ["--episodes", "2", "--seed", "7", "--no-cuda", "--trace", "jsonl"]
TIMEOUT = 300
# the arguments the checkpoint was written with
ARGS = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["args"]
PROBES = 8  # projections kept of each floating-point tensor
# a float tensor: its projections within this share of the change the resumed updates made to it (the largest
# seen with other kernels: 5%); a projection on random signs is about as large as the vector, so a tensor that
# differs by as much as that change shows in one of 8 projections but with a chance of 0.24^8 = 1e-5
CHANGE_SHARE = 0.3
SCALAR_SHARE = 0.05  # a logged loss: within this share of its tag's largest magnitude (other kernels: 1%)
CLIPFRAC_SAMPLES = 2 / 64  # the share of the 64 samples whose ratio left the clip range: two may cross its edge
VALUE_SHARE = 0.02  # a value in the trace: within this share of the trace's largest (other kernels: 0.2%)


def probes(t):
    """PROBES projections of a float tensor on random signs (NumPy's generator: the same on every machine)."""
    flat = t.double().reshape(-1).numpy()
    signs = np.random.default_rng(flat.size).integers(0, 2, (PROBES, flat.size)) * 2 - 1
    return (signs @ flat).tolist()


def digest(value, before=None):
    """`value` (a checkpoint or part of one) as JSON data: a tensor of floats (not a 0-dim count) as its dtype,
    shape, norm, PROBES projections and the norm of its change from `before` (the same part of the checkpoint
    resumed, if it has it); any other tensor as its dtype, shape and the sha256 of its bytes; dicts, lists and
    tuples (as lists) walked; everything else as it is."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        entry = {"dtype": str(t.dtype), "shape": list(t.shape)}
        if t.is_floating_point() and t.dim() > 0:
            change = t.double() - (before.double() if isinstance(before, torch.Tensor) else 0)
            return entry | {"norm": t.double().norm().item(), "probes": probes(t), "change": change.norm().item()}
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 and 0-dim included
        return entry | {"sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(value, dict):
        before = before if isinstance(before, dict) else {}
        return {str(k): digest(v, before.get(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        before = before if isinstance(before, (list, tuple)) and len(before) == len(value) else [None] * len(value)
        return [digest(v, b) for v, b in zip(value, before)]
    assert value is None or isinstance(value, (bool, int, float, str)), type(value)
    return value


def checkpoint_digest(path):
    """digest() of a checkpoint file (its changes from the fixture's checkpoint), without args['resume'] (the
    path it was resumed from), as it reads back from JSON (dict keys as strings, tuples as lists)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k != "resume"}
    return json.loads(json.dumps(digest(ckpt, torch.load(CHECKPOINT, map_location="cpu", weights_only=True))))


def scalars(run_dir):
    """{tag: [[step, value], ...]} of the run's tensorboard logs, as TensorBoard shows them, but for
    the perf/* timings and charts/SPS (speed is not deterministic)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = sorted(t for t in acc.Tags()["scalars"] if not t.startswith("perf/") and t != "charts/SPS")
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags}


def run(root, script, args, cwd):
    """`python root/script args` in cwd: this repository's in this process (conftest.run_in_process), another
    checkout's (the legacy commit's, which made the expected results) in a process of its own."""
    if Path(root).resolve() == ROOT:
        return run_in_process(script, args, cwd)
    return subprocess.run(
        [sys.executable, str(Path(root) / script), *map(str, args)],
        cwd=cwd,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def resume(root, cwd, checkpoint=CHECKPOINT):
    """Resume `checkpoint` with the helmv2_ppo.py of `root`, laid out in cwd as runs/<its run_name>/:
    (the process, {"checkpoint": digest of the final checkpoint.pt, "scalars": the logged scalars})."""
    run_name = torch.load(checkpoint, map_location="cpu", weights_only=True)["run_name"]
    run_dir = Path(cwd) / "runs" / run_name
    run_dir.mkdir(parents=True)
    shutil.copyfile(checkpoint, run_dir / "checkpoint.pt")
    path = f"runs/{run_name}/checkpoint.pt"
    proc = run(root, "helmv2_ppo.py", ["--resume", path, "--no-progress-bar", "--no-cuda"], cwd)
    if proc.returncode != 0:
        return proc, None
    return proc, {"checkpoint": checkpoint_digest(run_dir / "checkpoint.pt"), "scalars": scalars(run_dir)}


def play(root, cwd, checkpoint=CHECKPOINT):
    """Play `checkpoint` with the enjoy.py of `root`: (the process, the trace's records)."""
    out_dir = Path(cwd) / "enjoy"
    proc = run(root, "enjoy.py", [checkpoint, *ENJOY_ARGS, "--out-dir", out_dir], cwd)
    if proc.returncode != 0:
        return proc, None
    return proc, [json.loads(line) for line in (out_dir / "trace.jsonl").read_text().splitlines()]


def assert_same_digest(got, want, where):
    """The same digest(), with the first difference named: a float tensor's projections within CHANGE_SHARE of
    the change the resumed updates made to it (and a millionth of its norm); a Python float (computed from
    rewards and returns, in float64) to a millionth; everything else exactly."""
    if isinstance(want, dict) and "probes" in want:
        assert isinstance(got, dict) and "probes" in got, f"{where}: {got!r}"
        assert (got["dtype"], got["shape"]) == (want["dtype"], want["shape"]), where
        off = max(abs(g - w) for g, w in zip(got["probes"], want["probes"]))
        allowed = CHANGE_SHARE * want["change"] + 1e-6 * want["norm"]
        assert off <= allowed, f"{where}: off by {off:.3g} (allowed {allowed:.3g}), changed by {want['change']:.3g}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {set(got) ^ set(want)}"
        for key in want:
            assert_same_digest(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_digest(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12), f"{where}: {got!r}"
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def assert_same_scalars(got, want):
    """The same tags at the same steps; the same values where they count what happened (episodes, returns, the
    cache's hits, the learning rate's schedule), the losses within SCALAR_SHARE of their tag's scale."""
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for tag, rows in want.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in rows], tag
        if tag == "losses/clipfrac":
            allowed = CLIPFRAC_SAMPLES
        elif tag.startswith("losses/"):
            allowed = SCALAR_SHARE * max(abs(value) for _, value in rows)
        else:
            allowed = 0.0
        for (step, g), (_, w) in zip(got[tag], rows):
            assert abs(g - w) <= allowed, f"{tag} at step {step}: {g!r} != {w!r} (allowed {allowed:.3g})"


def test_legacy_checkpoint_resumes_bit_identically(tmp_path):
    expected = json.loads(RESUMED.read_text())
    proc, got = resume(ROOT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    versions = got["checkpoint"]["meta"]["versions"]
    assert versions == expected["checkpoint"]["meta"]["versions"], (
        f"library versions {versions} differ from those of the expected results "
        f"{expected['checkpoint']['meta']['versions']}: see tests/fixtures/legacy/README.md"
    )
    assert_same_scalars(got["scalars"], expected["scalars"])
    # arguments added since that commit are written with their defaults, which leave the run as it was
    added = {name: got["checkpoint"]["args"].pop(name) for name in set(got["checkpoint"]["args"]) - set(ARGS)}
    defaults = dataclasses.asdict(import_module("helmv2_ppo").Args())
    assert added == {name: defaults[name] for name in added}
    assert_same_digest(got["checkpoint"], expected["checkpoint"], "checkpoint")


def test_legacy_checkpoint_plays_identically(tmp_path):
    expected = [json.loads(line) for line in TRACE.read_text().splitlines()]
    proc, got = play(ROOT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # the same steps, actions, rewards, words and attention; the critic's values to VALUE_SHARE of their scale
    assert [{k: v for k, v in row.items() if k != "value"} for row in got] == [
        {k: v for k, v in row.items() if k != "value"} for row in expected
    ]
    scale = max(abs(row["value"]) for row in expected)
    for i, (g, w) in enumerate(zip(got, expected)):
        assert abs(g["value"] - w["value"]) <= VALUE_SHARE * scale, f"trace[{i}]['value']: {g['value']} != {w['value']}"


# ---------------------------------------------------------------------------------------------
# Checkpoints that lack arguments: completed from what they record, or refused
# ---------------------------------------------------------------------------------------------

# arguments of the fixture that a checkpoint may lack, and why: what else it records, the command line of a resumed
# run (RESUME_OVERRIDES), or the value the code had before the argument existed (arguments.ADDED_LATER)
TAKEN_FROM_THE_CHECKPOINT = [
    ["total_timesteps"],  # its update count times its batch (the default made a 4-update run one of 31,250)
    ["num_envs"],  # its batch over --num-steps
    ["num_steps"],  # its batch over --num-envs
    ["num_minibatches"],  # its minibatch size
    ["learning_rate"],  # its optimizer's rate (no --anneal-lr)
    ["total_timesteps", "num_envs", "num_minibatches", "learning_rate", "frozen_dtype"],
    ["async_envs", "checkpoint_every", "batch_size"],  # the command line's and the computed ones
]
# arguments it records nowhere else: today's defaults would make another run
REFUSED = [["seed"], ["gamma", "clip_coef"], ["num_envs", "num_steps"], ["total_timesteps", "num_iterations"]]


def without(tmp_path, names):
    """A copy of the legacy checkpoint whose arguments lack `names`, in tmp_path."""
    ckpt = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k not in names}
    path = tmp_path / "checkpoint.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("names", TAKEN_FROM_THE_CHECKPOINT, ids="-".join)
def test_an_argument_the_checkpoint_lacks_is_taken_from_it(names, tmp_path):
    script = import_module("helmv2_ppo")
    args = checkpoints.load(without(tmp_path, names), script)["args"]
    assert set(args) == {field.name for field in dataclasses.fields(script.Args)}
    # the run it was: every argument as the checkpoint was written with (it was written before --async-envs), but
    # those of a resumed run's command line (their defaults where it does not give them) and the computed ones
    defaults = dataclasses.asdict(script.Args())
    given_or_computed = [name for name in names if name in (*RESUME_OVERRIDES, *COMPUTED)]
    assert {name: args[name] for name in ARGS} == {
        n: defaults[n] if n in given_or_computed else v for n, v in ARGS.items()
    }
    assert args["async_envs"] is False


def test_a_resumed_checkpoint_without_its_step_count_makes_its_updates(tmp_path, monkeypatch):
    """Through --resume's own parsing (in this process): the run keeps its 4 updates."""
    path = without(tmp_path, ["total_timesteps", "frozen_dtype"])
    monkeypatch.setattr(sys, "argv", ["helmv2_ppo.py", "--resume", str(path), "--no-cuda"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args, _ = runs.parse(import_module("helmv2_ppo"))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert (args.total_timesteps, args.num_iterations, args.frozen_dtype) == (256, 4, "float32")


@pytest.mark.parametrize("names", REFUSED, ids="-".join)
def test_an_argument_the_checkpoint_records_nowhere_else_is_refused(names, tmp_path):
    path = without(tmp_path, names)
    with pytest.raises(SystemExit) as stop:
        checkpoints.load(path, import_module("helmv2_ppo"))
    flags = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(names, key=list(ARGS).index) if n != "num_iterations")
    assert stop.value.code.startswith(f"error: checkpoint {path} lacks {flags}, which it records nowhere else")
