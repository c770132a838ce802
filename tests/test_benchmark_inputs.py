"""benchmark/launch.py and benchmark/plot.py against what may lie in their folders and what they are given: links,
folders and FIFOs at the names they lock, log or read, hyperparameters of the wrong type, NaN returns, a --out that
is a run's folder or holds a link, a set of outputs cut short. Every case is built here in tmp_path and ends before
any run starts (the runs the launcher makes: tests/test_benchmark.py). A file of its own, so that the suite's two
workers share the load (pytest -n 2 --dist loadfile)."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import tyro

from conftest import ROOT

ENV = "MiniGrid-Empty-5x5-v0"
GRID = ["--tiny", "--scripts", "helm_ppo.py", "--env-ids", ENV, "--total-timesteps", "64"]
GRID += ["--num-envs", "2", "--num-steps", "32"]


def import_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_inputs_{name}", ROOT / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launch():
    return import_benchmark("launch")


@pytest.fixture(scope="module")
def plot():
    return import_benchmark("plot")


def launch_args(launch, workdir, *argv):
    args, unknown = tyro.cli(launch.Args, args=["--workdir", str(workdir), *argv], return_unknown_args=True)
    args.extra = list(unknown)
    return args


def cells(launch, seeds):
    return launch.make_grid(launch_args(launch, ".", *GRID, "--seeds", *map(str, seeds)), {})


def tree(folder):
    """Every path under `folder` with what it is, links not followed: to compare before and after."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (os.path.islink(path), os.path.isdir(path), os.path.isfile(path))
    return out


# ---------------------------------------------------------------------------------------------
# The launcher: what lies in runs/ and runs/.launch/ blocks one cell, never the launch with a traceback
# ---------------------------------------------------------------------------------------------


def run_dir(runs, cell, suffix="100"):
    return runs / f"{ENV}__{cell.exp_name}__{cell.seed}__{suffix}"


def plant_run_lock_link(runs, cell):
    run_dir(runs, cell).mkdir(parents=True)
    (run_dir(runs, cell) / ".lock").symlink_to(runs.parent / "elsewhere")
    return run_dir(runs, cell) / ".lock", "cannot be locked (it is a dangling link)"


def plant_run_lock_folder(runs, cell):
    run_dir(runs, cell).mkdir(parents=True)
    (run_dir(runs, cell) / ".lock").mkdir()
    return run_dir(runs, cell) / ".lock", "cannot be locked (it is a folder)"


def plant_run_dir_link(runs, cell):
    runs.mkdir()
    (runs.parent / "a-run-elsewhere").mkdir()
    run_dir(runs, cell).symlink_to(runs.parent / "a-run-elsewhere")
    return run_dir(runs, cell), "is a link, not a run directory of its own"


def plant_cell_lock(kind):
    def plant(runs, cell, launch):
        lock = runs / ".launch" / "locks" / f"{launch.cell_id(cell)}.lock"
        lock.parent.mkdir(parents=True)
        lock.symlink_to(runs.parent / "elsewhere") if kind == "link" else lock.mkdir()
        return lock, f"it is a {'dangling link' if kind == 'link' else 'folder'}"

    return plant


def plant_log(kind):
    def plant(runs, cell, launch):
        log = launch.log_path(runs, cell)
        log.parent.mkdir(parents=True)
        os.mkfifo(log) if kind == "fifo" else log.mkdir()
        return log, "not a plain file (a FIFO" if kind == "fifo" else "is a folder"

    return plant


BLOCKERS = {
    "run-lock-link": lambda runs, cell, launch: plant_run_lock_link(runs, cell),
    "run-lock-folder": lambda runs, cell, launch: plant_run_lock_folder(runs, cell),
    "run-dir-link": lambda runs, cell, launch: plant_run_dir_link(runs, cell),
    "cell-lock-link": plant_cell_lock("link"),
    "cell-lock-folder": plant_cell_lock("folder"),
    "log-folder": plant_log("folder"),
    "log-fifo": plant_log("fifo"),
}


@pytest.mark.parametrize("plant", BLOCKERS.values(), ids=BLOCKERS.keys())
def test_what_lies_in_a_cells_folders_skips_that_cell_alone(launch, plant, tmp_path, capsys):
    """A link, a folder or a FIFO at a run's .lock, the cell's lock or its log, or a run directory that is a link:
    the cell is skipped with a warning naming the file, the other cell is planned as usual, the launch ends with one
    error line, and nothing in runs/ is touched."""
    runs = tmp_path / "runs"
    blocked, other = cells(launch, [1, 2])
    path, phrase = plant(runs, blocked, launch)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as stop:
        launch.main(launch_args(launch, tmp_path, *GRID, "--seeds", "1", "2", "--dry-run"))
    out, err = capsys.readouterr()
    assert stop.value.code == (
        "error: 1 of 2 runs were skipped: what lies in their folders keeps them from running (the warnings above "
        "name each file)"
    )
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: helm_ppo.py {ENV} seed 1 is skipped: ") and str(path) in warning, warning
    assert phrase in warning, warning
    assert f"--seed 2 --exp-name {other.exp_name}" in out  # the other cell goes on
    assert "1 new, 0 to resume, 0 finished, 1 skipped" in out
    assert tree(tmp_path) == before


def test_a_cell_blocked_when_its_run_starts_is_skipped(launch, tmp_path, capsys):
    """A folder put at a cell's log after the launch planned it: the worker skips it with a warning, starts
    nothing, and the launch goes on (no traceback from the worker's thread)."""
    (cell,) = cells(launch, [1])
    runs = tmp_path / "runs"
    launch.log_path(runs, cell).mkdir(parents=True)
    args = launch_args(launch, tmp_path, *GRID, "--seeds", "1", "--python", "/bin/false")
    assert launch.LocalPool(1).map([(args, cell, runs, str(tmp_path), {})]) == ["blocked"]
    assert launch.run_cell(args, cell, runs, str(tmp_path), {}) == "blocked"  # a Slurm job's way in
    err = capsys.readouterr().err
    assert err.count(f"warning: helm_ppo.py {ENV} seed 1 is skipped: cannot write the log") == 2


@pytest.mark.parametrize("kind", ["file", "link"])
@pytest.mark.parametrize("folder", ["incomplete", "locks"])
def test_the_launchers_own_folders_are_checked_before_any_run(launch, folder, kind, tmp_path):
    """runs/.launch/incomplete (where dead runs are moved) or runs/.launch/locks as a file or a link: one line
    before anything is run, moved or locked; the dead run stays where it is, a link's target gets nothing."""
    (cell,) = cells(launch, [1])
    runs = tmp_path / "runs"
    dead = run_dir(runs, cell)
    dead.mkdir(parents=True)
    (dead / ".lock").touch()  # its script is gone: a run the launcher would move aside
    target = tmp_path / "target"
    target.mkdir()
    path = runs / ".launch" / folder
    path.parent.mkdir()
    path.write_text("keep") if kind == "file" else path.symlink_to(target)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as stop:
        launch.main(launch_args(launch, tmp_path, *GRID, "--seeds", "1", "--python", "/bin/false"))
    assert stop.value.code == f"error: {path} is a {kind}, not a folder of the launcher's own"
    assert tree(tmp_path) == before and not list(target.iterdir())


def test_a_tidy_up_folder_that_became_a_file_blocks_the_cell(launch, tmp_path):
    """runs/.launch/incomplete made a file after the launch's checks: moving a dead run there is one line naming
    it (Blocked), the run directory stays."""
    (cell,) = cells(launch, [1])
    runs = tmp_path / "runs"
    dead = run_dir(runs, cell)
    dead.mkdir(parents=True)
    (dead / ".lock").touch()
    (runs / ".launch").mkdir()
    (runs / ".launch" / "incomplete").write_text("keep")
    with pytest.raises(launch.Blocked, match="incomplete is a file, not a folder of the launcher's own"):
        launch.cell_state(runs, cell)
    assert dead.is_dir() and (runs / ".launch" / "incomplete").read_text() == "keep"


# (script, flags, what the line says): a value of the wrong type, named before any cell is checked
BAD_CONFIG_VALUES = {
    "float-for-int": ("helm_ppo.py", {"--num-envs": 4.0}, "--num-envs: 4.0 is not a whole number"),
    "true-for-int": ("helm_ppo.py", {"--num-envs": True}, "--num-envs: True is not a value of this int flag"),
    "string-for-int": ("helm_ppo.py", {"--num-envs": "4"}, "--num-envs: '4' is not a whole number"),
    "nan": ("helm_ppo.py", {"--learning-rate": math.nan}, "--learning-rate: nan is not a finite number"),
    "value-a-flag": ("helm_ppo.py", {"--trxl-model": "--exp-name"}, "'--exp-name' is not a string of printable"),
    "string-for-switch": ("helm_ppo.py", {"--anneal-lr": "yes"}, "--anneal-lr: 'yes' is not true: a switch takes"),
    "no-on-a-value-flag": ("helm_ppo.py", {"--no-num-envs": True}, "--no-num-envs: True is not a flag of this script"),
    "unknown-script": ("helm.py", {}, "'helm.py' is not a script of the launcher"),
}


@pytest.mark.parametrize("script, flags, phrase", BAD_CONFIG_VALUES.values(), ids=BAD_CONFIG_VALUES.keys())
def test_configs_json_values_of_the_wrong_type(launch, script, flags, phrase, tmp_path, monkeypatch):
    (tmp_path / "configs.json").write_text(json.dumps({"configs": {ENV: {script: {"flags": flags}}}}))
    monkeypatch.setattr(launch, "CONFIGS", tmp_path / "configs.json")
    with pytest.raises(SystemExit) as stop:
        launch.main(launch_args(launch, tmp_path, *GRID, "--seeds", "1", "--published", "--dry-run"))
    code = stop.value.code
    assert code.startswith(f"error: {tmp_path / 'configs.json'}: configs[") and phrase in code, code


BAD_COUNTS = {
    "workers": (["--workers", "100000"], "--workers and --threads-per-run must be at most 1024, got 100000 and 0"),
    "threads": (["--threads-per-run", "5000"], "must be at most 1024, got 1 and 5000"),
    "slurm-mem": (["--slurm-mem-gb", "-1"], "--slurm-mem-gb must be in [1, 1,048,576]"),
    "slurm-time": (["--slurm-time-min", "0"], "--slurm-time-min must be in [1,"),
    "seed-twice": (["--seeds", "1", "1"], "--seeds lists 1 twice"),
    "variant-twice": (["--variants", "a:", "a:"], "--variants lists a: twice"),
    "grid-too-large": (["--seeds", *map(str, range(10_001))], "the grid has 10,001 runs"),
}


@pytest.mark.parametrize("argv, phrase", BAD_COUNTS.values(), ids=BAD_COUNTS.keys())
def test_launch_bounds_every_count(launch, argv, phrase, tmp_path):
    """Counts without a bound and repeated cells (one lock each: the second would wait on the first's and read as
    'running in another launch') are one line, before any cell is checked."""
    with pytest.raises(SystemExit) as stop:
        launch.main(launch_args(launch, tmp_path, *GRID, "--seeds", "1", *argv, "--dry-run"))
    assert stop.value.code.startswith("error: ") and phrase in stop.value.code, stop.value.code


# ---------------------------------------------------------------------------------------------
# plot.py: every run directory in the figures or named; the output set whole or not at all
# ---------------------------------------------------------------------------------------------


def fake_run(run_dir, seed, returns, extra="", sps_step=None):
    """A run directory as plot.py reads it: the hyperparameters table and episode returns at steps 10, 20, ..."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n|env_id|{ENV}|\n|seed|{seed}|\n|beta|1|{extra}")
    for i, r in enumerate(returns):
        writer.add_scalar("charts/episodic_return", r, 10 * (i + 1))
    if sps_step is not None:
        writer.add_scalar("charts/SPS", 100.0, sps_step)
    writer.close()


GOOD = {1: [0.1 * i for i in range(10)], 2: [0.05 * i for i in range(10)]}


def good_runs(runs):
    for seed, returns in GOOD.items():
        fake_run(runs / f"run{seed}", seed, returns)


# each returns what the warning says and whether the hostile run is kept (read, its returns in the plots)
def plant_nan_returns(runs):
    fake_run(runs / "hostile", 3, [0.5, math.nan, 0.5, math.inf] + [0.5] * 6)
    return "left out: 2 of its 10 episode returns are NaN or infinite (the first at step 20)", False


def plant_event_file_dangling_link(runs):
    fake_run(runs / "hostile", 3, GOOD[1])
    (runs / "hostile" / "events.out.tfevents.0.dangling").symlink_to(runs / "nowhere")
    return "events.out.tfevents.0.dangling is a dangling link: not read", True


def plant_event_file_folder(runs):
    fake_run(runs / "hostile", 3, GOOD[1])
    (runs / "hostile" / "events.out.tfevents.0.folder").mkdir()
    return "events.out.tfevents.0.folder is a folder: not read", True


def plant_num_envs_of_the_wrong_type(runs):
    # no episode in the run's last 10% of steps (its SPS is logged later): the final return falls back on the last
    # num_envs episodes, so num_envs is read
    fake_run(runs / "hostile", 3, [0.5] * 10, extra="\n|num_envs|four|", sps_step=10_000)
    return "left out: its hyperparameter num_envs is 'four', not of the form the scripts log", False


def plant_n_layer_of_the_wrong_type(runs):
    fake_run(runs / "hostile", 3, [0.5] * 10, extra="\n|n_layer|²|")  # str.isdigit() says yes, int() refuses
    return "left out: its hyperparameter n_layer is '²', not of the form the scripts log", False


HOSTILE_RUNS = {
    "nan-returns": plant_nan_returns,
    "event-file-dangling-link": plant_event_file_dangling_link,
    "event-file-folder": plant_event_file_folder,
    "num-envs-a-word": plant_num_envs_of_the_wrong_type,
    "n-layer-a-superscript": plant_n_layer_of_the_wrong_type,
}


@pytest.mark.parametrize("plant", HOSTILE_RUNS.values(), ids=HOSTILE_RUNS.keys())
def test_plot_names_a_hostile_run_and_keeps_the_others(plot, plant, tmp_path, capsys):
    """A run whose returns are NaN, an event file that is a dangling link or a folder, a hyperparameter plot.py reads
    of the wrong form: named in a warning (the file or the reason), left out where its values are unusable; the two
    good seeds are read with their own returns."""
    runs = tmp_path / "runs"
    good_runs(runs)
    phrase, kept = plant(runs)
    args = plot.Args(runs=str(runs), out=str(tmp_path / "plots"), reps=20, points=5)
    read, notes = plot.load_runs(args)
    assert sorted(r.path.name for r in read) == ["hostile"] * kept + ["run1", "run2"]
    for run in read:
        assert np.array_equal(run.returns, np.float32(GOOD[int(run.args["seed"]) if run.args["seed"] != "3" else 1]))
    assert [path.name for path, _ in notes] == ["hostile"] and notes[0][1].startswith(phrase), notes
    assert f"warning: {runs / 'hostile'}: {phrase}" in capsys.readouterr().err


def test_a_nan_seed_is_left_out_of_the_table_and_named(plot, tmp_path, capsys):
    """End to end: the group's final return is the mean over the finite seeds (computed here from GOOD), the NaN
    seed is named at the end of final_returns.md, no NaN in the table."""
    runs = tmp_path / "runs"
    good_runs(runs)
    plant_nan_returns(runs)
    plot.main(plot.Args(runs=str(runs), out=str(tmp_path / "plots"), reps=20, points=5, final_fraction=0.5))
    table = (tmp_path / "plots" / "final_returns.md").read_text()
    finals = [np.float32(r[5:]).astype(float).mean() for r in GOOD.values()]  # episodes at steps 60..100 > half of 100
    (row,) = [line for line in table.splitlines() if line.startswith("| helm_ppo |")]
    assert f"| {np.mean(finals):.3f} ± {np.std(finals, ddof=1):.3f} |" in row and "| 2 |" in row, row
    assert "nan" not in row.lower()
    assert "- hostile: left out: 2 of its 10 episode returns are NaN or infinite" in table


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--out", "{runs}/run1"], "holds event files: it is a run's folder"),
        (["--out", "{tmp}/link"], "is a link; outputs never go through a link"),
        (["--env-ids", "Nothing-v0"], f"no run under {{runs}} is of --env-ids Nothing-v0; they are of {ENV}"),
        (["--scripts", "helm_ppo.py"], "--scripts helm_ppo.py: plot.py's script names are"),
        (["--reps", "100000", "--points", "101"], "--reps x --points must be at most 10,000,000"),
        (["--runs", "{runs}/run1"], "it holds event files itself; --runs is the folder that holds the run"),
    ],
)
def test_plot_refuses_before_drawing(plot, argv, phrase, tmp_path):
    """A --out that is a run's folder (its run would be left out), a link; filters that match nothing or are not
    plot.py's names; a bootstrap too large: one line, nothing written anywhere."""
    runs = tmp_path / "runs"
    good_runs(runs)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    before = tree(tmp_path)
    argv = [a.format(runs=runs, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as stop:
        plot.main(tyro.cli(plot.Args, args=["--runs", str(runs), "--out", str(tmp_path / "plots"), *argv]))
    assert stop.value.code.startswith("error: ") and phrase.format(runs=runs) in stop.value.code, stop.value.code
    assert tree(tmp_path) == before


def earlier_set(out):
    """--out as an earlier plot.py left it: every file of the set, with content of its own."""
    out.mkdir()
    names = [f"{axis}__{ENV}.{ext}" for axis in ("steps", "time") for ext in ("png", "svg")]
    names += ["aggregate.png", "aggregate.svg", "final_returns.md"]
    for name in names:
        (out / name).write_text(f"earlier {name}")
    return {name: f"earlier {name}" for name in names}


def test_plot_replaces_its_files_as_a_set(plot, tmp_path, monkeypatch):
    """A failure after the curves are drawn (here in the aggregate figure) replaces none of the earlier set and
    leaves no temporary file; a folder at one output's name is one line before anything is drawn."""
    runs = tmp_path / "runs"
    good_runs(runs)
    out = tmp_path / "plots"
    earlier = earlier_set(out)
    args = plot.Args(runs=str(runs), out=str(out), reps=20, points=5)

    def broken(*_):
        raise RuntimeError("the aggregate figure failed")

    monkeypatch.setattr(plot, "plot_aggregate", broken)
    with pytest.raises(RuntimeError, match="aggregate figure failed"):
        plot.main(args)
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier
    monkeypatch.undo()
    (out / "aggregate.png").unlink()
    (out / "aggregate.png").mkdir()
    with pytest.raises(SystemExit) as stop:
        plot.main(args)
    assert stop.value.code == (
        f"error: --out: {out / 'aggregate.png'} is not a plain file, which an output never replaces; move it away or "
        "choose another --out"
    )
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == {
        k: v for k, v in earlier.items() if k != "aggregate.png"
    }


def test_plot_names_the_earlier_outputs_it_does_not_replace(plot, tmp_path, capsys):
    runs = tmp_path / "runs"
    good_runs(runs)
    out = tmp_path / "plots"
    out.mkdir()
    (out / "steps__Other-v0.png").write_text("earlier")
    (out / "notes.txt").write_text("the user's")
    plot.main(plot.Args(runs=str(runs), out=str(out), reps=20, points=5))
    assert f"warning: {out} also holds steps__Other-v0.png of an earlier plot.py" in capsys.readouterr().err
    assert (out / "steps__Other-v0.png").read_text() == "earlier" and (out / "notes.txt").read_text() == "the user's"
    assert (out / f"steps__{ENV}.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file


def test_env_ids_that_differ_only_in_replaced_characters_get_a_figure_each(plot):
    names = {plot.safe_name(env) for env in ("ALE/Pong-v5", "ALE_Pong-v5", "ALE:Pong-v5")}
    assert len(names) == 3 and plot.safe_name(ENV) == ENV
    assert all(os.sep not in name for name in names)


def test_the_bootstrap_holds_a_bounded_number_of_values(plot, monkeypatch):
    """bootstrap_ci in chunks of resamples: the same interval as all at once (an independent computation here)."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(5, 7))
    monkeypatch.setattr(plot, "MAX_BOOTSTRAP", 5 * 7 * 3)  # 3 resamples at a time
    lo, hi = plot.bootstrap_ci(samples, 100, np.random.default_rng(1))
    draws = np.random.default_rng(1).integers(0, 5, size=(100, 5))
    means = samples[draws].mean(axis=1)
    assert np.allclose(lo, np.percentile(means, 2.5, axis=0)) and np.allclose(hi, np.percentile(means, 97.5, axis=0))
