"""A checkpoint written by an older version of the code still resumes and plays, bit for bit.

tests/fixtures/legacy/helmv2_checkpoint.pt was written by helmv2_ppo.py of commit
bf89a3b26cd618edb5b779bdedf7a76e040fb204 (a run of 4 updates stopped by SIGTERM after its 2nd), and
helmv2_resumed.json / helmv2_enjoy_trace.jsonl hold what that commit's helmv2_ppo.py --resume and
enjoy.py made of it (tests/fixtures/legacy/README.md: how, and why these files are never regenerated
with newer code). Today's code must resume the checkpoint to the same final checkpoint (every tensor
bitwise, every other value equal) and the same logged scalars, and play it to the same trace.

The expected results hold for the library versions recorded in the fixtures (`meta.versions`): with
other versions of torch & co. the numbers may legitimately differ (see the README)."""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import torch

from conftest import ROOT, offline_env

LEGACY = ROOT / "tests" / "fixtures" / "legacy"
CHECKPOINT = LEGACY / "helmv2_checkpoint.pt"
RESUMED = LEGACY / "helmv2_resumed.json"
TRACE = LEGACY / "helmv2_enjoy_trace.jsonl"
ENJOY_ARGS = ["--episodes", "2", "--seed", "7", "--no-cuda", "--trace", "jsonl"]
TIMEOUT = 300
# the arguments the checkpoint was written with
ARGS = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["args"]


def digest(value):
    """`value` (a checkpoint or part of one) as JSON data: each tensor as its dtype, shape and the
    sha256 of its bytes; dicts, lists and tuples (as lists) walked; everything else as it is."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 and 0-dim included
        return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(value, dict):
        return {str(k): digest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [digest(v) for v in value]
    assert value is None or isinstance(value, (bool, int, float, str)), type(value)
    return value


def checkpoint_digest(path):
    """digest() of a checkpoint file, without args['resume'] (the path it was resumed from), as it reads
    back from JSON (dict keys as strings, tuples as lists)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k != "resume"}
    return json.loads(json.dumps(digest(ckpt)))


def scalars(run_dir):
    """{tag: [[step, value], ...]} of the run's tensorboard logs, as TensorBoard shows them, but for
    the perf/* timings and charts/SPS (speed is not deterministic)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = sorted(t for t in acc.Tags()["scalars"] if not t.startswith("perf/") and t != "charts/SPS")
    return {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags}


def run(root, script, args, cwd):
    return subprocess.run(
        [sys.executable, str(Path(root) / script), *map(str, args)],
        cwd=cwd,
        env=dict(offline_env(), OMP_NUM_THREADS="1"),
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


def assert_equal_json(got, want, where):
    """Equal JSON data, with the first difference named (floats exactly)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {set(got) ^ set(want)}"
        for key in want:
            assert_equal_json(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_equal_json(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


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
    assert_equal_json(got["scalars"], expected["scalars"], "scalars")
    # arguments added since that commit are written with their defaults, which leave the run as it was
    added = {name: got["checkpoint"]["args"].pop(name) for name in set(got["checkpoint"]["args"]) - set(ARGS)}
    defaults = dataclasses.asdict(import_module("helmv2_ppo").Args())
    assert added == {name: defaults[name] for name in added}
    assert_equal_json(got["checkpoint"], expected["checkpoint"], "checkpoint")


def test_legacy_checkpoint_plays_identically(tmp_path):
    expected = [json.loads(line) for line in TRACE.read_text().splitlines()]
    proc, got = play(ROOT, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_equal_json(got, expected, "trace")
