"""What a new user runs into first: tracking with wandb, resuming with other flags, starting without a
network, and a repository that names nothing outside itself."""

import importlib.util
import json
import socket
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import QUICK, ROOT, SCRIPTS, error_line, offline_env, tiny_args
from helm_utils import arguments

BATCH = 4 * 16  # QUICK: 4 envs x 16 steps, 2 updates


def import_script(script):
    """The script as a module (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(f"first_use_{script[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: the package finds a script by its Args' module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# --resume takes exactly the flags given on its command line
# ---------------------------------------------------------------------------------------------


def test_resume_takes_exactly_the_flags_given(monkeypatch):
    script = "shelm_ppo.py"  # helm_utils.arguments.resume_args; SHELM has a directory flag (OUTPUT_DIRS)
    module = import_script(script)
    saved = module.Args(cuda=False, track=True, checkpoint_every=5, seed=7, learning_rate=1e-3)
    ckpt = {"args": asdict(saved)}

    def resume(*flags):
        monkeypatch.setattr(sys, "argv", [script, "--resume", "run/checkpoint.pt", *flags])
        return arguments.resume_args(module.Args, ckpt, "run/checkpoint.pt", module.OUTPUT_DIRS)

    # nothing given: the checkpoint's arguments, whatever the defaults
    assert asdict(resume()) == asdict(saved) | {"resume": "run/checkpoint.pt"}
    # --cuda undoes the checkpoint's --no-cuda although it is the default; the same for the others
    args = resume("--cuda", "--no-track", "--checkpoint-every", "10")
    assert (args.cuda, args.track, args.checkpoint_every) == (True, False, 10)
    assert (args.seed, args.learning_rate) == (7, 1e-3)
    # a flag outside RESUME_OVERRIDES that repeats the checkpoint's value changes nothing: accepted
    assert resume("--seed", "7").seed == 7
    # one that would change the run: one error line naming it and what may be given
    with pytest.raises(SystemExit) as stop:
        resume("--cuda", "--seed", "8", "--learning-rate", "0.1")
    message = str(stop.value)
    assert message.startswith("error: --seed --learning-rate: a resumed run keeps its checkpoint's arguments")
    assert "--cuda" in message.split("only")[1] and "\n" not in message


# ---------------------------------------------------------------------------------------------
# --track, offline: the run's wandb directory holds what was logged
# ---------------------------------------------------------------------------------------------


def wandb_history(run_dir):
    """The rows logged to an offline wandb run, read back by wandb's own reader of its run files."""
    (path,) = run_dir.glob("run-*.wandb")
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    records = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    records = [json.loads(line) for line in records.splitlines()]
    return [record["history"]["item"] for record in records if record["type"] == "history"]


def run_tracked(script, args, cwd):
    env = dict(offline_env(), WANDB_MODE="offline")
    env.update(WANDB_CONFIG_DIR=str(cwd / "wandb-config"), WANDB_CACHE_DIR=str(cwd / "wandb-cache"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def offline_runs(cwd):
    return sorted((cwd / "wandb").glob("offline-run-*"))


def assert_losses_logged(rows, steps):
    losses = [row for row in rows if "losses/value_loss" in row]
    assert [row["global_step"] for row in losses] == steps
    assert all(isinstance(row["losses/value_loss"], float) for row in losses)


# the tracking code is shared (helm_utils.runs), and a tracked run costs a wandb service start: SHELM with
# videos, then resumed (one more update, the same wandb run); without --capture-video no video is logged
@pytest.mark.parametrize("video", [True, False], ids=["videos", "no-videos"])
def test_track_offline(video, tmp_path):
    script = "shelm_ppo.py"
    run_tracked(script, [*QUICK, *tiny_args(script, tmp_path), "--track", *(["--capture-video"] * video)], tmp_path)
    (first,) = offline_runs(tmp_path)
    run_id = first.name.split("-")[-1]
    rows = wandb_history(first)
    assert_losses_logged(rows, [BATCH, 2 * BATCH])
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = run_dir / "checkpoint.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["wandb_id"] == run_id
    videos = [row["videos.path"] for row in rows if "videos.path" in row]
    if not video:
        assert not videos and not (tmp_path / "videos").exists()
        return
    # the episode under way at the end is written at envs.close() and handed to wandb once
    assert len(videos) == 1 and (first / "files" / videos[0]).stat().st_size > 0

    ckpt["args"]["total_timesteps"] = 3 * BATCH  # one update more to go
    torch.save(ckpt, checkpoint)
    run_tracked(script, ["--resume", str(checkpoint), "--track"], tmp_path)
    second = next(path for path in offline_runs(tmp_path) if path != first)
    assert second.name.split("-")[-1] == run_id
    rows = wandb_history(second)
    assert_losses_logged(rows, [3 * BATCH])
    assert len([row for row in rows if "videos.path" in row]) == 1  # the resumed run's own video only
    assert torch.load(checkpoint, weights_only=True)["wandb_id"] == run_id


# ---------------------------------------------------------------------------------------------
# Without a network: one line, at once; a cached model loads (tests/test_trxl.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def silent_hub():
    """An address where connections are accepted (by the kernel, into the backlog) and never answered:
    a network that hangs. The hub client would wait 10 s per attempt there, 6 attempts, plus 23 s of
    back-off; without retries, the probe gives up after HUB_PROBE_TIMEOUT (3 s)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize(
    "args, missing",
    [
        ([], "config.json of 'transfo-xl/transfo-xl-wt103'"),  # the README's main command
        (["--trxl-model", "tiny-random"], "CLIP ViT-B-16 weights 'openai'"),
    ],
)
def test_no_network_ends_at_once(args, missing, tmp_path, silent_hub):
    # nothing cached, HF_HUB_OFFLINE not set, and the hub's address does not answer: the timeout below is
    # well under the hub client's 80 s of retries and well over a slow start of Python and torch
    env = {k: v for k, v in offline_env().items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=silent_hub, NO_PROXY="127.0.0.1")
    command = [*("--env-id", "MiniGrid-MemoryS11-v0", "--n-layer", "2"), *args, "--embeddings-dir", "data"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "shelm_ppo.py"), *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [error_line(proc)] and missing in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Nothing names a path outside the repository or on a particular machine
# ---------------------------------------------------------------------------------------------


def test_no_path_outside_the_repository():
    forbidden = ["../" + "shared", "/" + "work/", "/" + "tmp/", "/" + "root/", "/" + "home/", "/" + "opt/"]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout")
    found = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if not path.is_file() or path.suffix in (".safetensors", ".pkl", ".png", ".pt"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            found += [f"{name}:{number}: {line.strip()}" for text in forbidden if text in line]
    assert not found, "\n".join(found)


def test_lines_fit_in_120_columns_and_help_strings_are_one_line():
    # ruff (E501) checks the code; .ci/run runs it. The help strings are the docstrings under Args' fields
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        assert max(len(line) for line in text.splitlines()) <= 120, script
        body = text[text.index("class Args") : text.index("\n\n\n", text.index("class Args"))]
        docstrings = [line.strip() for line in body.splitlines() if line.strip().startswith('"""')]
        assert docstrings and all(d.endswith('"""') and len(d) > 6 for d in docstrings), script
