"""benchmark/: the published configurations, the memory ablation, the launcher and the plots."""

import fcntl
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import tyro

import helm_ppo
import helmv2_ppo
import shelm_ppo
from conftest import QUICK, ROOT, SCRIPTS, call_in_process, offline_env, run_in_process, tiny_args

MODULES = {"shelm_ppo.py": shelm_ppo, "helm_ppo.py": helm_ppo, "helmv2_ppo.py": helmv2_ppo}
BASELINES = ["lstm_ppo.py", "cnn_ppo.py"]  # their configurations: tests/test_baselines.py
CONFIGS = json.loads((ROOT / "benchmark" / "configs.json").read_text())["configs"]
MINIGRID = [
    "MiniGrid-DoorKey-5x5-v0",
    "MiniGrid-DoorKey-6x6-v0",
    "MiniGrid-Dynamic-Obstacles-5x5-v0",
    "MiniGrid-KeyCorridorS3R1-v0",
    "MiniGrid-MemoryS11-v0",
    "MiniGrid-RedBlueDoors-6x6-v0",
    "MiniGrid-Unlock-v0",
]


def as_argv(flags):
    """{"--flag": value} -> ["--flag", "value"]; true stands for a flag without a value."""
    argv = []
    for flag, value in flags.items():
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def test_configs_cover_every_script_and_minigrid_env():
    for env_id in MINIGRID:
        assert sorted(CONFIGS[env_id]) == sorted(SCRIPTS + BASELINES), env_id


@pytest.mark.parametrize("env_id", sorted(CONFIGS))
def test_configs_parse_with_the_scripts_args(env_id):
    for script, entry in CONFIGS[env_id].items():
        if script in BASELINES:
            continue
        module = MODULES[script]
        args = tyro.cli(module.Args, args=as_argv(entry["flags"]))
        module.check_args(args)  # in range: a bad value would exit with one error line
        for flag, value in entry["flags"].items():
            name = flag.removeprefix("--").replace("-", "_")
            if name.startswith("no_"):
                assert getattr(args, name[3:]) is False, (script, flag)
            else:
                assert getattr(args, name) == value, (script, flag)
        # what has no flag is what the scripts always do
        assert entry["not_flags"]["optimizer"] == "AdamW" and entry["not_flags"]["lr_decay"] == "none"


def test_scripts_defaults_are_the_published_memory_configs():
    """The scripts' defaults were taken from the MiniGrid-Memory configurations: the two sources agree."""
    for script, entry in CONFIGS["MiniGrid-MemoryS11-v0"].items():
        if script in BASELINES:
            continue
        defaults = MODULES[script].Args()
        assert defaults.env_id == "MiniGrid-MemoryS11-v0"
        assert tyro.cli(MODULES[script].Args, args=as_argv(entry["flags"])) == defaults, script


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES.keys())
def test_memory_readout_ablated_is_zero(module):
    trxl_out = torch.randn(3, 5, 8)  # (tokens per step, envs, d_model)
    assert torch.equal(module.memory_readout(trxl_out, False), trxl_out[-1])
    ablated = module.memory_readout(trxl_out, True)
    assert ablated.shape == trxl_out[-1].shape and not ablated.any()


def test_ablated_agent_does_not_depend_on_the_memory(tmp_path):
    """With --ablate-memory the trained agent is bit-identical whatever the Transformer-XL computes
    (1 or 2 layers): the agent's computation is the same, on the same inputs, in the same shapes; without it,
    the number of layers changes the agent: its memory input is used. (The ablation is shared code of the three
    scripts; HELM's runs start fastest: no CLIP.)"""
    agents = {}
    for ablate in (True, False):
        for n_layer in (1, 2):
            cwd = tmp_path / f"{ablate}-{n_layer}"
            argv = [*tiny_args("helm_ppo.py", tmp_path), *QUICK, "--n-layer", str(n_layer), "--seed", "3"]
            proc = run_in_process("helm_ppo.py", argv + (["--ablate-memory"] if ablate else []), cwd)
            assert proc.returncode == 0, proc.stderr
            (ckpt,) = cwd.glob("runs/*/checkpoint.pt")
            agents[ablate, n_layer] = torch.load(ckpt, weights_only=True)["agent"]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(agents[True, 1], agents[True, 2])
    assert not same(agents[False, 1], agents[False, 2])


# ---------------------------------------------------------------------------------------------
# benchmark/launch.py and benchmark/plot.py, on runs of the tiny models in a temporary directory
# ---------------------------------------------------------------------------------------------

LAUNCH = [sys.executable, str(ROOT / "benchmark" / "launch.py")]
# an env whose random-walk episodes end within 100 steps, so that short runs log episodes
SMALL = ["--tiny", "--env-ids", "MiniGrid-Empty-5x5-v0", "--num-envs", "4", "--num-steps", "32"]
SMALL += ["--num-minibatches", "2", "--update-epochs", "1", "--n-layer", "1", "--checkpoint-every", "1"]
SMALL += ["--threads-per-run", "1"]  # more threads than free cores slow torch down badly
# the launched runs: 4 updates of 4 x 32 steps (each env's first episode ends by step 100, truncated, in the second
# half of the run, where plot.py takes the final return); the interrupted one 8, so that the signal comes before
# its end
STEPS, LONG_STEPS = 512, 1024


def launch(workdir, *argv, **kwargs):
    """`benchmark/launch.py --workdir workdir argv` in a process of its own (its runs are processes anyway)."""
    return subprocess.run(
        [*LAUNCH, "--workdir", str(workdir), *argv],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def commands(stdout):
    """The commands a dry run prints, split into arguments."""
    return [shlex.split(line)[1:] for line in stdout.splitlines() if line and not line.startswith("#")]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_dry_run_lists_the_grid(launch_module, tmp_path):
    envs = ["MiniGrid-DoorKey-5x5-v0", "MiniGrid-MemoryS7-v0"]
    argv = ["--scripts", "shelm_ppo.py", "helm_ppo.py", "--env-ids", *envs, "--seeds", "1", "2", "--published"]
    argv += ["--tiny", "--variants", "memory:", "ablated:--ablate-memory --ent-coef 0.05", "--ent-coef", "0.02"]
    proc = launch_here(launch_module, tmp_path, *argv, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cells = commands(proc.stdout)
    got = sorted((Path(c[1]).name, flag(c, "--env-id"), int(flag(c, "--seed")), "--ablate-memory" in c) for c in cells)
    want = sorted(itertools.product(["shelm_ppo.py", "helm_ppo.py"], envs, [1, 2], [False, True]))
    assert got == want
    for c in cells:
        # each flag once; the variant's value beats the common one, which beats the published one
        flags = [a for a in c if a.startswith("--")]
        assert len(flags) == len(set(flags)), c
        assert flag(c, "--ent-coef") == ("0.05" if "--ablate-memory" in c else "0.02")
        published = CONFIGS.get(flag(c, "--env-id"), {}).get(Path(c[1]).name)
        if published:  # DoorKey: the published configuration; MemoryS7 has none, the defaults hold
            assert flag(c, "--mem-len") == str(published["flags"]["--mem-len"])
        else:
            assert "--mem-len" not in c
        assert flag(c, "--trxl-model") == "tiny-random"
        assert ("--clip-model" in c) == (Path(c[1]).name == "shelm_ppo.py")
    # one run name per cell: the seeds of a cell share it, cells differ
    names = {(Path(c[1]).name, flag(c, "--env-id"), "--ablate-memory" in c): flag(c, "--exp-name") for c in cells}
    assert len(set(names.values())) == len(names) == 8
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def run_dirs(workdir):
    return sorted(p for p in (workdir / "runs").iterdir() if p.is_dir() and not p.name.startswith("."))


def iterations(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    args = ckpt["args"]
    return ckpt["iteration"], args["total_timesteps"] // (args["num_envs"] * args["num_steps"])


def launch_here(launch_module, workdir, *argv):
    """`benchmark/launch.py --workdir workdir argv` in this process (conftest.call_in_process; its runs are
    processes): the result reads like launch()'s, without a process's imports."""
    return call_in_process(lambda: launch_main(launch_module, workdir, *argv), workdir.parent)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, launch_module):
    """Runs of the tiny models, made by the launcher: 2 with 2 local workers, 1 interrupted and continued,
    1 through submitit's local executor, in a --workdir the first launch makes (a study's own folder). The
    launcher runs in this process where no signal or pickling needs its own. Returns (workdir, outputs)."""
    workdir = tmp_path_factory.mktemp("grid") / "study"
    out = {}
    dry = launch_here(launch_module, workdir, *SMALL, "--seeds", "1", "--dry-run")
    assert dry.returncode == 0 and not workdir.exists(), dry.stdout + dry.stderr  # a dry run makes nothing
    seeds = ["--seeds", "1", "2", "--workers", "2", "--total-timesteps", str(STEPS)]
    out["first"] = launch_here(launch_module, workdir, *SMALL, *seeds)
    out["again"] = launch_here(launch_module, workdir, *SMALL, *seeds)
    # interrupted: stopped (SIGINT to the launcher) once its run has written a checkpoint, then launched again
    long = [*SMALL, "--seeds", "7", "--total-timesteps", str(LONG_STEPS)]
    proc = subprocess.Popen(
        [*LAUNCH, "--workdir", str(workdir), *long], env=offline_env(), stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not list(workdir.glob("runs/*__7__*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out["stopped"] = (proc.wait(timeout=120), proc.stdout.read())
    (stopped_dir,) = workdir.glob("runs/*__7__*")
    out["stopped_at"] = iterations(stopped_dir)
    out["resumed"] = launch_here(launch_module, workdir, *long)
    # a process: submitit pickles the launcher's run_cell for its job by the name of its module
    out["submitit"] = launch(
        workdir, *SMALL, "--seeds", "3", "--total-timesteps", str(STEPS), "--cluster", "submitit-local"
    )
    return workdir, out


def test_local_launch_runs_the_grid(launched):
    workdir, out = launched
    assert out["first"].returncode == 0, out["first"].stdout + out["first"].stderr
    assert "2 new" in out["first"].stdout and "2 ran to the end" in out["first"].stdout
    for seed in (1, 2):
        (run_dir,) = workdir.glob(f"runs/MiniGrid-Empty-5x5-v0__shelm_ppo-default-*__{seed}__*")
        assert list(run_dir.glob("events.out.tfevents.*"))
        done, total = iterations(run_dir)
        assert done == total == STEPS // 128


def test_second_launch_runs_nothing(launched):
    _, out = launched
    assert out["again"].returncode == 0
    assert "0 new, 0 to resume, 2 finished" in out["again"].stdout
    assert "[new]" not in out["again"].stdout and "[resume]" not in out["again"].stdout


def test_interrupted_launch_resumes(launched):
    workdir, out = launched
    code, stdout = out["stopped"]
    assert code == 1 and "1 stopped" in stdout
    done, total = out["stopped_at"]
    assert 1 <= done < total == LONG_STEPS // 128
    assert "1 to resume" in out["resumed"].stdout and out["resumed"].returncode == 0
    (run_dir,) = workdir.glob("runs/*__7__*")  # the same run directory, continued
    assert iterations(run_dir) == (total, total)
    (log,) = workdir.glob("runs/.launch/*__7.log")
    assert f"resuming {run_dir.name} at step {done * 4 * 32}" in log.read_text()


def test_submitit_local_executor(launched):
    workdir, out = launched
    assert out["submitit"].returncode == 0, out["submitit"].stdout + out["submitit"].stderr
    assert "submitted 1 runs" in out["submitit"].stdout
    (run_dir,) = workdir.glob("runs/*__3__*")
    assert iterations(run_dir) == (STEPS // 128, STEPS // 128)


def episode_returns(run_dir):
    """(step, return) of every episode, read from the event files directly (not as plot.py reads them)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "charts/episodic_return":  # the loader turns simple values into tensors
                    points.append(
                        (event.step, value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value)
                    )
    return points


def test_plot_writes_figures_and_the_table(launched, tmp_path):
    workdir, _ = launched
    out = tmp_path / "plots"
    argv = ["--runs", str(workdir / "runs"), "--out", str(out), "--final-fraction", "0.5", "--reps", "200"]
    plot = import_benchmark("plot")
    proc = call_in_process(lambda: plot.main(tyro.cli(plot.Args, args=argv)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    for stem in ["steps__MiniGrid-Empty-5x5-v0", "time__MiniGrid-Empty-5x5-v0", "aggregate"]:
        png = (out / f"{stem}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        assert (out / f"{stem}.svg").stat().st_size > 5000
    # the STEPS group (seeds 1, 2, 3): final return = mean over seeds of the mean return of the episodes
    # that ended in the last half of the run's steps
    finals = []
    for seed in (1, 2, 3):
        (run_dir,) = workdir.glob(f"runs/*__{seed}__*")
        returns = [r for step, r in episode_returns(run_dir) if step > STEPS // 2]
        finals.append(sum(returns) / len(returns))
    mean = sum(finals) / 3
    std = (sum((f - mean) ** 2 for f in finals) / 2) ** 0.5
    table = (out / "final_returns.md").read_text()
    (row,) = [line for line in table.splitlines() if f"total_timesteps={STEPS}" in line]
    assert f"| {mean:.3f} ± {std:.3f} | [" in row and "] | 3 |" in row
    (row,) = [line for line in table.splitlines() if f"total_timesteps={LONG_STEPS}" in line]
    assert "| 1 |" in row


# ---------------------------------------------------------------------------------------------
# What the launcher and the plots take from outside, and what the launcher never does to a run
# ---------------------------------------------------------------------------------------------


def import_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launch_module():
    return import_benchmark("launch")


def launch_main(launch_module, workdir, *argv):
    """`benchmark/launch.py --workdir workdir argv` in this process."""
    args, unknown = tyro.cli(launch_module.Args, args=["--workdir", str(workdir), *argv], return_unknown_args=True)
    args.extra = list(unknown)
    return launch_module.main(args)


def test_launch_leaves_live_runs_alone(launch_module, tmp_path):
    """A run directory without a checkpoint whose script is alive (it holds the .lock) is not moved; one whose
    script is gone is."""
    cell = launch_module.Cell("helm_ppo.py", "MiniGrid-Empty-5x5-v0", 1, "default", (), "helm_ppo-default-0123abcd")
    runs = tmp_path / "runs"
    live = runs / f"MiniGrid-Empty-5x5-v0__{cell.exp_name}__1__100"
    live.mkdir(parents=True)
    lock = os.open(live / ".lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the script starting there holds it
    try:
        assert launch_module.cell_state(runs, cell) == ("running", live)
        assert live.is_dir()
    finally:
        os.close(lock)
    assert launch_module.cell_state(runs, cell) == ("new", None)  # its script is gone: nothing to continue
    assert not live.exists() and (runs / ".launch" / "incomplete" / live.name).is_dir()


def launched_cell(launch_module, seed):
    """The launcher's cell of the `launched` fixture's first grid for `seed` (the same flags, the same name)."""
    args, unknown = tyro.cli(
        launch_module.Args,
        args=[*SMALL, "--seeds", str(seed), "--total-timesteps", str(STEPS)],
        return_unknown_args=True,
    )
    args.extra = list(unknown)
    (cell,) = launch_module.make_grid(args, {})
    return cell


def edit_args(**changes):
    return lambda ckpt: ckpt["args"].update(changes)


NOT_RESUMABLE = {  # checkpoint.pt changed so: --resume would refuse it, or it is another run's
    "num-envs-a-string": (edit_args(num_envs="4"), "--resume refuses it: checkpoint"),
    "total-timesteps-a-float": (edit_args(total_timesteps=1024.0), "argument total_timesteps is 1024.0, not <class"),
    "iteration-beyond-the-run": (lambda ckpt: ckpt.update(iteration=99), "inconsistent counters"),
    "another-seed": (edit_args(seed=5), "it is of another run (seed 5)"),
    "another-run-directory": (lambda ckpt: ckpt.update(run_name="elsewhere"), "another run (run_name 'elsewhere')"),
}


def test_launch_takes_a_checkpoint_only_as_resume_takes_it(launched, launch_module, tmp_path, capsys):
    """A copy of a finished run of the launched grid: finished as it is. Its checkpoint.pt with arguments of the
    wrong type, counters beyond the run, or of another run (seed, run directory): named in a warning, and the run
    directory is moved aside, not taken as finished (or resumed where --resume would refuse it or write elsewhere).
    A damaged checkpoint.pt beside a good model_final.pt: finished by model_final.pt."""
    workdir, _ = launched
    cell = launched_cell(launch_module, 1)
    (source,) = workdir.glob(f"runs/*__{cell.exp_name}__1__*")
    runs = tmp_path / "good" / "runs"
    shutil.copytree(source, runs / source.name)
    assert launch_module.cell_state(runs, cell) == ("finished", runs / source.name / "checkpoint.pt")
    for name, (edit, phrase) in NOT_RESUMABLE.items():
        runs = tmp_path / name / "runs"
        run_dir = runs / source.name
        shutil.copytree(source, run_dir)
        ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, run_dir / "checkpoint.pt")
        assert launch_module.cell_state(runs, cell, tidy=False) == ("new", None), name
        out = capsys.readouterr().out
        assert f"warning: {run_dir}: checkpoint.pt: " in out and phrase in out, (name, out)
        assert launch_module.cell_state(runs, cell) == ("new", None)
        assert not run_dir.exists() and (runs / ".launch" / "incomplete" / source.name / "checkpoint.pt").is_file()
    runs = tmp_path / "final" / "runs"
    run_dir = runs / source.name
    shutil.copytree(source, run_dir)
    shutil.copy(run_dir / "checkpoint.pt", run_dir / "model_final.pt")  # what --save-model writes at the end
    (run_dir / "checkpoint.pt").write_bytes(b"damaged")
    assert launch_module.cell_state(runs, cell) == ("finished", run_dir / "model_final.pt")
    assert "checkpoint.pt cannot be read" not in capsys.readouterr().out  # the run is whole: nothing to say


def test_a_cell_is_run_by_one_launch_at_a_time(launch_module, tmp_path, capsys):
    """Two launches of one grid: the cell's lock goes to one; the other runs nothing of it, neither at planning
    nor when one of its jobs (a Slurm array task) starts."""
    argv = ["--tiny", "--scripts", "helm_ppo.py", "--env-ids", "MiniGrid-Empty-5x5-v0", "--seeds", "1"]
    argv += ["--total-timesteps", "64", "--num-envs", "2", "--num-steps", "32"]
    args, _ = tyro.cli(launch_module.Args, args=argv, return_unknown_args=True)
    args.extra = argv[-6:]
    (cell,) = launch_module.make_grid(args, {})
    held = launch_module.cell_lock(tmp_path / "runs", cell)  # another launch has the cell
    try:
        assert launch_module.cell_lock(tmp_path / "runs", cell) is None
        assert launch_module.run_cell(args, cell, tmp_path / "runs", tmp_path, {}) == "running"
        capsys.readouterr()
        launch_main(launch_module, tmp_path, *argv)
        out = capsys.readouterr().out
        assert "# running in another launch: MiniGrid-Empty-5x5-v0" in out and "[new]" not in out
    finally:
        launch_module.release(held)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [".launch"]  # no run was started


BAD_CONFIGS = {
    "not-json": ("{not json", "is not a readable JSON file"),
    "configs-a-list": ('{"configs": [1]}', 'has no "configs" object'),
    "entry-without-flags": ('{"configs": {"MiniGrid-Empty-5x5-v0": {"helm_ppo.py": {"x": 1}}}}', 'no "flags" object'),
    "reserved-flag": (
        '{"configs": {"MiniGrid-Empty-5x5-v0": {"helm_ppo.py": {"flags": {"--seed": 3}}}}}',
        "--seed is set",
    ),
    "nested-value": (
        '{"configs": {"E": {"helm_ppo.py": {"flags": {"--num-envs": {"a": 1}}}}}}',
        "is not a whole number",
    ),
}


@pytest.mark.parametrize("content, phrase", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_launch_refuses_a_bad_configs_json(launch_module, content, phrase, tmp_path, monkeypatch):
    (tmp_path / "configs.json").write_text(content)
    monkeypatch.setattr(launch_module, "CONFIGS", tmp_path / "configs.json")
    with pytest.raises(SystemExit) as stop:
        launch_main(launch_module, tmp_path, "--tiny", "--env-ids", "MiniGrid-Empty-5x5-v0", "--published", "--dry-run")
    assert stop.value.code.startswith("error: ") and phrase in stop.value.code, stop.value.code


BAD_LAUNCHES = {
    "flag-value": (
        ["--num-envs", "abc"],
        "helm_ppo.py MiniGrid-Empty-5x5-v0 seed 1 (default): Error parsing --num-envs",
    ),
    "unknown-flag": (["--bogus", "1"], "--bogus is not a flag of helm_ppo.py"),
    "out-of-range": (["--learning-rate", "-1"], "--learning-rate must be a positive float32 number"),
    "seed": (["--seeds", "-1"], "--seed must be >= 0"),
    # a group of cells is checked at its lowest and highest seed (launch.cells_to_check): a bad one among good ones
    "seed-among-good": (["--seeds", "3", str(2**32), "5"], f"seed {2**32} (default): --seed must be >= 0 and < 2**32"),
    "unclosed-quote": (["--variants", "a:--ent-coef '0.1"], "No closing quotation"),
    "workdir-a-file": (["--workdir", "{file}"], "is not a directory"),
}


@pytest.mark.parametrize("argv, phrase", BAD_LAUNCHES.values(), ids=BAD_LAUNCHES.keys())
def test_launch_checks_every_cell_before_any_run(launch_module, argv, phrase, tmp_path):
    (tmp_path / "file").write_text("keep")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    with pytest.raises(SystemExit) as stop:
        launch_main(
            launch_module,
            tmp_path,
            "--tiny",
            "--scripts",
            "helm_ppo.py",
            "--env-ids",
            "MiniGrid-Empty-5x5-v0",
            "--seeds",
            "1",
            *argv,
        )
    assert stop.value.code.startswith("error: ") and phrase in stop.value.code, stop.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no run started


def fake_run(run_dir, seed, returns):
    """A run directory as plot.py reads it: the hyperparameters table and episode returns."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|env_id|MiniGrid-Empty-5x5-v0|\n|seed|{seed}|\n|beta|1|")
    for i, r in enumerate(returns):
        writer.add_scalar("charts/episodic_return", r, 10 * (i + 1))
    writer.close()


def test_plot_names_every_run_it_leaves_out(tmp_path, capsys):
    plot = import_benchmark("plot")
    for seed in (1, 2, 3):
        fake_run(tmp_path / "runs" / f"run{seed}", seed, [0.1 * i for i in range(20)])
    (events,) = (tmp_path / "runs" / "run2").glob("events.out.tfevents.*")
    data = bytearray(events.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a record in the middle fails its checksum: the events after it are lost
    events.write_bytes(bytes(data))
    (tmp_path / "runs" / "empty").mkdir()
    plot.main(plot.Args(runs=str(tmp_path / "runs"), out=str(tmp_path / "plots"), reps=20, points=5))
    warnings = capsys.readouterr().err
    table = (tmp_path / "plots" / "final_returns.md").read_text()
    assert "run2: events.out.tfevents" in warnings and "fails its checksum" in warnings
    assert "empty: left out: no event file" in warnings
    assert "- run2: events.out.tfevents" in table and "- empty: left out: no event file" in table


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--reps", "0"], "--reps and --points must be in [1, 100,000]"),
        (["--points", "0"], "--reps and --points must be in [1, 100,000]"),
        (["--final-fraction", "nan"], "--final-fraction must be in (0, 1]"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--out", "{runs}/run1/events"], "/run1/events is not a folder"),
    ],
)
def test_plot_refuses_bad_arguments(argv, phrase, tmp_path):
    plot = import_benchmark("plot")
    fake_run(tmp_path / "runs" / "run1", 1, [0.5, 0.6])
    (events,) = (tmp_path / "runs" / "run1").glob("events.out.tfevents.*")
    events.rename(tmp_path / "runs" / "run1" / "events")  # a file where --out asks for a folder
    fake_run(tmp_path / "runs" / "run1", 1, [0.5, 0.6])
    argv = [a.format(runs=tmp_path / "runs") for a in argv]
    with pytest.raises(SystemExit) as stop:
        plot.main(tyro.cli(plot.Args, args=["--runs", str(tmp_path / "runs"), "--reps", "20", *argv]))
    assert stop.value.code.startswith("error: ") and phrase in stop.value.code, stop.value.code
