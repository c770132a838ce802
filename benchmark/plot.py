"""Learning curves, an aggregate across envs and a table of final returns, from the tensorboard logs in runs/.

    python benchmark/plot.py                                   # every run under runs/, figures in runs/plots/
    python benchmark/plot.py --out docs/results/tiny_cpu --env-ids MiniGrid-DoorKey-5x5-v0 MiniGrid-MemoryS7-v0

Runs are grouped by script (the baselines as lstm_ppo and cnn_ppo: benchmark/baselines/lstm_ppo.py with and
without --lstm), env and variant: runs made by benchmark/launch.py are labelled by the launcher's variant names
(their --exp-name is {script}-{variant}-{hash}), if each variant of a script and env is one cell of the launcher;
other runs by the arguments that differ between runs of the same script and env (seed, exp_name and bookkeeping
arguments aside). The seeds of a group make its curve: the mean and a 95%
bootstrap confidence band over seeds, against env steps and against wall-clock time; the baselines' curves are
drawn (dashed) in every memory script's panel too. A run's final return
is the mean return of its episodes in the last 10% of its steps (--final-fraction), or where none ended
there, of its last num_envs episodes. Writes, into --out:

    steps__<env>.png/.svg, time__<env>.png/.svg   learning curves
    aggregate.png/.svg                            IQM of final returns across envs, stratified bootstrap (rliable)
    pruning.png/.svg                              final return and SPS against --n-layer, where n_layer differs
    final_returns.md                              final returns: mean +- std and 95% t-interval over seeds; the
                                                  runs left out

Every run directory under --runs is either in the figures and the table or named, with the reason, in a warning
and at the end of the table: no event file, an event file that fails its checksums (a reader stops there, so the
events after it are missing: named even when the run is kept) or that is a dangling link, a folder or a FIFO (not
read), no hyperparameters, no episode, and values no mean may take in: a NaN or infinite return (the seed's final
return and its group's mean would be NaN), a NaN time or SPS, a step <= 0, a hyperparameter plot.py reads that is
not of the form the scripts log. Every argument, --out included (not a link, not a file, no run's folder), is
checked before anything is read; the figures and the table are made in memory and replace those in --out together,
once all are made (helm_utils.files.replace_together): an error half-way replaces none (docs/benchmarks.md).

MiniGrid and MiniWorld returns lie in [0, 1], so the aggregate uses raw returns (no normalisation).
"""

import hashlib
import io
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import tyro

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

# arguments that say nothing about the agent or its training, or are set per run
BOOKKEEPING = {
    "seed",
    "exp_name",
    "env_id",
    "resume",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "capture_video",
    "save_model",
    "cuda",
    "progress_bar",
    "checkpoint_every",
    "nonfinite_limit",
    "log_tokens_every",
    "embeddings_dir",
    "embeddings_file",
    "token_cache_size",
    "observation_cache_size",
    "hopfield_chunk",
    "batch_size",
    "minibatch_size",
    "num_iterations",
}
# an argument only one of the scripts has tells which script wrote the run
SCRIPT_BY_ARG = {"topk": "shelm_ppo", "beta": "helm_ppo", "rescale": "helmv2_ppo", "lstm": "lstm_ppo"}
PAUSE_S = 300  # a longer gap between two logged events is a pause (an interrupted, later resumed run)
# the run name benchmark/launch.py gives each cell (cell_name): {script}-{variant}-{hash of its flags}
CELL_NAME = re.compile(r"(?P<script>[a-z0-9_]+)-(?P<variant>[A-Za-z0-9_]+)-[0-9a-f]{8}")
BASELINE_SCRIPTS = ("lstm_ppo", "cnn_ppo")  # drawn in the memory scripts' panels too


@dataclass
class Args:
    runs: str = "runs"
    """directory of the runs (each a tensorboard log directory)"""
    out: str = "runs/plots"
    """directory the figures and the table are written to"""
    env_ids: tuple[str, ...] = ()
    """only these environments (default: all)"""
    scripts: tuple[str, ...] = ()
    """only these scripts, e.g. shelm_ppo (default: all)"""
    points: int = 25
    """points per curve (each the mean return of the episodes that ended since the previous point)"""
    reps: int = 2000
    """bootstrap resamples"""
    seed: int = 0
    """seed of the bootstrap"""
    final_fraction: float = 0.1
    """a run's final return is the mean return of its episodes in this last fraction of its steps"""


MAX_REPS = MAX_POINTS = 100_000  # more resamples or points change nothing a figure shows, and cost memory


@dataclass
class Run:
    path: Path
    script: str
    args: dict
    steps: np.ndarray  # env step at which each episode ended
    returns: np.ndarray
    times: np.ndarray  # seconds of training when each episode ended (pauses removed)
    last_step: int
    sps: float
    final_fraction: float

    @property
    def final_return(self):
        window = self.steps > (1 - self.final_fraction) * self.last_step
        if not window.any():  # no episode ended there (long episodes, all envs in step): the last of each env
            window = np.arange(len(self.returns)) >= len(self.returns) - int(self.args.get("num_envs", 1))
        return float(self.returns[window].mean()) if window.any() else math.nan


def parse_hyperparameters(markdown):
    """The scripts log their arguments as a markdown table |param|value|; values come back as strings."""
    args = {}
    for line in markdown.splitlines():
        cells = line.strip().strip("|").split("|")
        if len(cells) == 2 and cells[0] not in ("param", "-"):
            args[cells[0]] = cells[1]
    return args


def training_time(wall_times, start):
    """Seconds of training at each event: the wall-clock time since the start, minus the pauses."""
    gaps = np.diff(np.concatenate([[start], wall_times]))
    return np.cumsum(np.where(gaps > PAUSE_S, 0.0, gaps))


def event_files(path):
    """(the event files of a run directory that can be read, [why each other one is not read]): plain files, or
    links to them; a dangling link, a folder, a FIFO (reading one would hang) at an event file's name is named."""
    from helm_utils.files import what_lies_at

    readable, skipped = [], []
    for events in sorted(path.glob("*tfevents*")):
        if events.is_file():
            readable.append(events)
        else:
            skipped.append(f"{events.name} is {what_lies_at(events) or 'not a plain file'}: not read")
    return readable, skipped


def corrupt_event_files(files):
    """[(event file, records read before it, the failure)] of the event files `files` (of a run directory) that
    fail their checksums: every reader (TensorBoard's too) stops at such a record, so what follows it is missing.
    A record cut short at the end of a file (a process killed while writing) is normal and not reported."""
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    found = []
    for events in files:
        reader, n = PyRecordReader_New(str(events)), 0
        try:
            while True:
                reader.GetNext()
                n += 1
        except errors.OutOfRangeError:
            pass
        except errors.DataLossError as e:
            if "truncated" not in str(e):
                found.append((events.name, n, "a record fails its checksum"))
        finally:
            reader.file_handle.close()
    return found


def load_run(path, final_fraction):
    """The run logged in `path`, or None (read_run says why)."""
    return read_run(path, final_fraction)[0]


def accumulate(files):
    """TensorBoard's EventAccumulator over the event files `files` of one run, in the order TensorBoard reads a run
    directory (by name; a resumed run's purge applies to its earlier files), and over nothing else: it reads a
    private folder of links to them, so a folder or a FIFO at an event file's name in the run is never opened."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(prefix="plot-events-") as folder:
        for events in files:
            os.symlink(events.resolve(), Path(folder) / events.name)
        acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
    return acc


# the hyperparameters plot.py reads as numbers or switches, as the scripts log them (str() of the value)
HYPERPARAMETER_FORMATS = {"num_envs": r"[1-9][0-9]{0,8}", "n_layer": r"[0-9]{1,6}", "lstm": r"True|False"}


def read_run(path, final_fraction):
    """(Run, None), or (None, why the run is left out). Left out as well: a run whose values plot.py uses are not
    what the scripts log (a NaN or infinite episode return, SPS or time, a step <= 0, a hyperparameter it reads of
    the wrong form): a mean over seeds with it would be NaN or wrong without a word."""
    from helm_utils.files import MAX_NAME_BYTES

    files, _ = event_files(path)
    if not files:
        return None, "no event file"
    try:
        acc = accumulate(files)
    except Exception as e:  # noqa: BLE001 - a damaged record TensorBoard's reader does not expect
        return None, f"its event files cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    tags = acc.Tags()
    if "hyperparameters/text_summary" not in tags["tensors"]:
        return None, "no hyperparameters logged (not a run of these scripts, or its event file is unreadable)"
    if "charts/episodic_return" not in tags["scalars"]:
        return None, "no episode ended"
    text = acc.Tensors("hyperparameters/text_summary")[0]
    try:
        args = parse_hyperparameters(text.tensor_proto.string_val[0].decode())
    except (IndexError, UnicodeDecodeError):
        return None, "its hyperparameters cannot be read"
    if not args.get("env_id"):
        return None, "its hyperparameters name no env_id"
    if len(args["env_id"].encode()) > MAX_NAME_BYTES or not args["env_id"].isprintable():
        return None, f"its env_id {args['env_id'][:60]!r}... is not one a run name can hold"
    for name, form in HYPERPARAMETER_FORMATS.items():
        if name in args and not re.fullmatch(form, args[name]):
            return None, f"its hyperparameter {name} is {args[name][:60]!r}, not of the form the scripts log"
    script = next((name for arg, name in SCRIPT_BY_ARG.items() if arg in args), "unknown")
    if script == "lstm_ppo" and args.get("lstm") == "False":
        script = "cnn_ppo"  # the baselines' CNN-PPO: lstm_ppo.py --no-lstm
    episodes = acc.Scalars("charts/episodic_return")
    sps = acc.Scalars("charts/SPS") if "charts/SPS" in tags["scalars"] else []
    steps = np.array([e.step for e in episodes])
    returns = np.array([e.value for e in episodes], dtype=float)
    wall = np.array([e.wall_time for e in episodes], dtype=float)
    bad = ~np.isfinite(returns)
    if bad.any():
        return None, (
            f"{bad.sum()} of its {len(returns)} episode returns are NaN or infinite (the first at step "
            f"{steps[bad][0]:,}): its final return and the mean over seeds would be NaN"
        )
    if (steps <= 0).any():
        return None, f"an episode is logged at step {steps.min():,} (the scripts log from step 1 on)"
    if not np.isfinite(wall).all() or not math.isfinite(text.wall_time):
        return None, "its events have NaN or infinite times"
    if sps and not (math.isfinite(sps[-1].value) and sps[-1].value >= 0):
        return None, f"its last charts/SPS is {sps[-1].value}, not a speed"
    return Run(
        path=path,
        script=script,
        args=args,
        steps=steps,
        returns=returns,
        times=training_time(wall, min(text.wall_time, wall[0])),
        last_step=max([e.step for e in episodes] + [e.step for e in sps]),
        sps=float(sps[-1].value) if sps else math.nan,
        final_fraction=final_fraction,
    ), None


def load_runs(args):
    """(runs, [(run directory, why it is left out or incomplete)]); each of the latter is also a warning. A run
    directory is every folder under --runs but the hidden ones (runs/.launch) and --out (check_args made sure it is
    no run's). Filtered by --env-ids and --scripts: a filter that matches no run is one line, one that matches
    nothing of one of its values a warning."""
    from helm_utils import fail

    runs, notes, envs, scripts = [], [], set(), set()
    out = Path(args.out).resolve()
    try:
        entries = sorted(p for p in Path(args.runs).iterdir() if not p.name.startswith("."))
    except OSError as e:
        fail(f"--runs {args.runs} cannot be listed: {e.strerror or e}")
    for i, path in enumerate(entries):
        if i and i % 100 == 0:
            print(f"# read {i} of {len(entries)} entries of {args.runs}", file=sys.stderr)
        if not path.is_dir() or path.resolve() == out:
            continue
        try:
            files, skipped = event_files(path)
            notes += [(path, note) for note in skipped]
            for events, n, what in corrupt_event_files(files):
                notes.append((path, f"{events}: {what} after {n} records; the events after it are missing"))
            run, why = read_run(path, args.final_fraction)
        except OSError as e:  # moved away meanwhile (the launcher tidies runs/ up), or unreadable
            run, why = None, f"it cannot be read ({e.strerror or e})"
        if run is None:
            notes.append((path, f"left out: {why}"))
            continue
        envs.add(run.args["env_id"])
        scripts.add(run.script)
        if (args.env_ids and run.args["env_id"] not in args.env_ids) or (
            args.scripts and run.script not in args.scripts
        ):
            continue
        runs.append(run)
    for path, note in notes:
        print(f"warning: {path}: {note}", file=sys.stderr)
    if not envs:
        hint = " (the warnings above say why)" if notes else ""
        if next(Path(args.runs).glob("*tfevents*"), None) is not None:
            hint = ": it holds event files itself; --runs is the folder that holds the run directories"
        fail(f"no runs with logged episodes under {args.runs}{hint}")
    for flag, wanted, found in (("--env-ids", args.env_ids, envs), ("--scripts", args.scripts, scripts)):
        missing = [value for value in wanted if value not in found]
        if missing and len(missing) == len(wanted):
            fail(f"no run under {args.runs} is of {flag} {' '.join(missing)}; they are of {' '.join(sorted(found))}")
        for value in missing:
            print(f"warning: no run under {args.runs} is of {flag} {value}", file=sys.stderr)
    if not runs:
        fail(
            f"no run under {args.runs} is of both --env-ids {' '.join(args.env_ids)} "
            f"and --scripts {' '.join(args.scripts)}"
        )
    return runs, notes


def launcher_variant(run):
    """The variant name of a run benchmark/launch.py made (from its --exp-name), or None."""
    match = CELL_NAME.fullmatch(run.args.get("exp_name", ""))
    return match["variant"] if match else None


def group_runs(runs):
    """{(script, env, label): [runs]}: the label is the launcher's variant name where every run is a launcher's
    cell and each variant of a script and env is one cell (one set of flags); otherwise it names the arguments
    that differ between runs of one script and env (the same keys for every env, so that a variant keeps its
    label across envs)."""
    cells = {}
    for run in runs:
        cells.setdefault((run.script, run.args["env_id"], launcher_variant(run)), set()).add(run.args.get("exp_name"))
    if all(variant is not None and len(names) == 1 for (_, _, variant), names in cells.items()):
        groups = {}
        for run in runs:
            groups.setdefault((run.script, run.args["env_id"], launcher_variant(run)), []).append(run)
        return groups, ["variant"]
    by_cell = {}
    for run in runs:
        by_cell.setdefault((run.script, run.args["env_id"]), []).append(run)
    varying = set()
    for cell_runs in by_cell.values():
        # an argument some runs lack comes from another version of the script, not from the study
        keys = set.intersection(*(set(r.args) for r in cell_runs)) - BOOKKEEPING
        varying |= {k for k in keys if len({r.args[k] for r in cell_runs}) > 1}
    groups = {}
    for run in runs:
        # of the arguments the run has: a baseline has no ablate_memory
        label = " ".join(f"{k}={run.args[k]}" for k in sorted(varying) if k in run.args)
        groups.setdefault((run.script, run.args["env_id"], label), []).append(run)
    return groups, sorted(varying)


def bootstrap_ci(samples, reps, rng):
    """95% percentile bootstrap interval of the mean over axis 0 (the seeds), for each column."""
    samples = np.asarray(samples, dtype=float)
    n = samples.shape[0]
    draws = rng.integers(0, n, size=(reps, n))
    chunk = max(1, MAX_BOOTSTRAP // samples.size)  # resamples at a time: (chunk, seeds, points) in memory
    # NaN where a seed has no value yet
    means = np.concatenate([samples[draws[i : i + chunk]].mean(axis=1) for i in range(0, reps, chunk)])
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def t_interval(samples):
    """95% t-interval of the mean of samples (the seeds): mean -+ t(0.975, n - 1) std / sqrt(n); NaN for one."""
    from scipy import stats

    samples = np.asarray(samples, dtype=float)
    n = len(samples)
    if n < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.975, n - 1) * samples.std(ddof=1) / math.sqrt(n)
    return samples.mean() - half, samples.mean() + half


def binned(x, y, grid):
    """Mean of y over the points with x in each (grid[i-1], grid[i]]; carried forward where a bin is empty."""
    out = np.full(len(grid), np.nan)
    lo = 0.0
    for i, hi in enumerate(grid):
        sel = (x > lo) & (x <= hi)
        out[i] = y[sel].mean() if sel.any() else (out[i - 1] if i else np.nan)
        lo = hi
    return out


def curve_label(script, label):
    return f"{script} {label}".strip()


def plot_curves(groups, env_id, axis, args, rng, out):
    """One panel per script, one curve per label (variant) in it; where there are memory scripts, the baselines
    are drawn (dashed) in each memory script's panel instead of panels of their own."""
    in_env = {key: group for key, group in sorted(groups.items()) if key[1] == env_id}
    scripts = sorted({script for script, _, _ in in_env})
    panels = [s for s in scripts if s not in BASELINE_SCRIPTS] or scripts
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for (script, _, label), group in in_env.items():
        xs = [r.steps if axis == "steps" else r.times for r in group]
        end = min(x[-1] for x in xs if len(x))
        grid = np.linspace(end / args.points, end, args.points)
        ys = np.stack([binned(x, r.returns, grid) for x, r in zip(xs, group)])
        lo, hi = bootstrap_ci(ys, args.reps, rng)
        scale = 1 / 60 if axis == "time" else 1
        baseline = script in BASELINE_SCRIPTS and script not in panels
        for ax in axes[0] if baseline else [axes[0, panels.index(script)]]:
            # a point where every seed has finished an episode: before, the mean would be of the lucky seeds only
            name = f"{script} {label}" if baseline else label or "all"
            line = ax.plot(
                grid * scale, ys.mean(axis=0), "--" if baseline else "-", label=f"{name} ({len(group)} seeds)"
            )
            ax.fill_between(grid * scale, lo, hi, alpha=0.2, color=line[0].get_color(), linewidth=0)
    for ax, script in zip(axes[0], panels):
        ax.set_xlabel("env steps" if axis == "steps" else "training time (minutes)")
        ax.set_title(f"{script}, {env_id}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("episodic return (mean, 95% bootstrap CI)")
    out.figure(fig, f"{axis}__{safe_name(env_id)}")


def plot_aggregate(groups, args, out):
    """IQM of the final returns over seeds x envs per script and label, with rliable's stratified bootstrap."""
    from rliable import library as rly
    from rliable import metrics

    scores = {}
    for (script, env, label), group in sorted(groups.items()):
        scores.setdefault(curve_label(script, label), {})[env] = [r.final_return for r in group]
    matrices = {}
    for name, by_env in scores.items():
        n = min(len(v) for v in by_env.values())  # the same number of seeds in every env (a matrix)
        if any(len(v) > n for v in by_env.values()):
            counts = ", ".join(f"{len(v)} in {env}" for env, v in sorted(by_env.items()))
            print(f"warning: aggregate: {name} has {counts}: its IQM takes the first {n} of each", file=sys.stderr)
        matrices[name] = np.array([v[:n] for v in by_env.values()], dtype=float).T  # (seeds, envs)
    estimates, intervals = rly.get_interval_estimates(
        matrices, lambda m: np.array([metrics.aggregate_iqm(m)]), reps=args.reps
    )
    names = sorted(matrices)
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.5))
    for i, name in enumerate(names):
        lo, hi = intervals[name][:, 0]
        ax.errorbar(estimates[name][0], i, xerr=[[estimates[name][0] - lo], [hi - estimates[name][0]]], fmt="o")
    ax.set_yticks(range(len(names)), [f"{n} ({matrices[n].shape[1]} envs)" for n in names], fontsize=7)
    ax.set_xlabel("IQM of final return over seeds x envs (95% stratified bootstrap CI)")
    ax.grid(alpha=0.3)
    out.figure(fig, "aggregate")
    return estimates, intervals


def pruning_cells(groups):
    """{(script, env): {n_layer: [runs]}} of the scripts and envs whose runs differ in n_layer."""
    by_cell = {}
    for (script, env, _), group in groups.items():
        for run in group:
            if re.fullmatch(r"[0-9]+", str(run.args.get("n_layer", ""))):  # the baselines have no Transformer-XL
                by_cell.setdefault((script, env), {}).setdefault(int(run.args["n_layer"]), []).append(run)
    return {k: v for k, v in by_cell.items() if len(v) > 1}


def plot_pruning(groups, out, rng, reps):
    """Final return and SPS against n_layer, for each script and env whose runs differ in n_layer."""
    cells = pruning_cells(groups)
    if not cells:
        return False
    fig, (ax_ret, ax_sps) = plt.subplots(1, 2, figsize=(10, 4))
    for (script, env), by_layers in sorted(cells.items()):
        layers = sorted(by_layers)
        finals = [np.array([r.final_return for r in by_layers[n]]) for n in layers]
        cis = [bootstrap_ci(f[:, None], reps, rng) for f in finals]
        mean = [f.mean() for f in finals]
        err = [[m - lo[0] for m, (lo, _) in zip(mean, cis)], [hi[0] - m for m, (_, hi) in zip(mean, cis)]]
        ax_ret.errorbar(layers, mean, yerr=err, marker="o", capsize=3, label=f"{script} {env}")
        ax_sps.plot(layers, [np.mean([r.sps for r in by_layers[n]]) for n in layers], marker="o")
    ax_ret.set_xlabel("Transformer-XL layers (--n-layer)")
    ax_ret.set_ylabel("final return (mean, 95% bootstrap CI)")
    ax_sps.set_xlabel("Transformer-XL layers (--n-layer)")
    ax_sps.set_ylabel("env steps per second")
    ax_ret.legend(fontsize=7)
    for ax in (ax_ret, ax_sps):
        ax.grid(alpha=0.3)
    out.figure(fig, "pruning")
    return True


def final_table(groups, notes=()):
    lines = [
        "| script | env | variant or arguments that differ | final return (mean ± std) | 95% CI (t) | seeds | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for (script, env, label), group in sorted(groups.items()):
        finals = np.array([r.final_return for r in group])
        std = finals.std(ddof=1) if len(finals) > 1 else 0.0
        steps = sorted({r.last_step for r in group})
        lo, hi = t_interval(finals)
        interval = f"[{lo:.3f}, {hi:.3f}]" if len(finals) > 1 else "- (one seed)"
        lines.append(
            f"| {script} | {env} | {label or '-'} | {finals.mean():.3f} ± {std:.3f} | {interval} "
            f"| {len(group)} | {', '.join(f'{s:,}' for s in steps)} |"
        )
    if notes:
        lines += ["", "Run directories left out or incomplete:", ""]
        lines += [f"- {path.name}: {note}" for path, note in notes]
    return "\n".join(lines) + "\n"


class Outputs:
    """The files of one plot.py call, made in memory and written together once all are made
    (files.replace_together): a failure half-way (a full disk, an error in a figure) replaces none of the files an
    earlier call wrote, and the figures and the table in --out are always of the same call."""

    def __init__(self, folder):
        self.folder, self.files = Path(folder), {}

    def figure(self, fig, stem):
        fig.tight_layout()
        for ext in ("png", "svg"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=ext, dpi=120)
            self.files[f"{stem}.{ext}"] = buffer.getvalue()
        plt.close(fig)

    def text(self, name, text):
        self.files[name] = text.encode()

    def write(self):
        from helm_utils.files import output_files, replace_together

        output_files(self.folder, self.files, "--out")  # as checked before the work; anything new there: one line
        replace_together(
            {self.folder / name: (lambda f, data=data: f.write(data)) for name, data in self.files.items()}
        )


# the names plot.py writes, to tell an earlier call's outputs that this one does not replace
OUTPUT_NAME = re.compile(r"(steps__.+|time__.+|aggregate|pruning)\.(png|svg)|final_returns\.md")


def output_names(groups):
    """The names of the files this call writes into --out, known before anything is drawn."""
    stems = [f"{axis}__{safe_name(env)}" for env in sorted({env for _, env, _ in groups}) for axis in ("steps", "time")]
    stems += ["aggregate"] + (["pruning"] if pruning_cells(groups) else [])
    return [f"{stem}.{ext}" for stem in stems for ext in ("png", "svg")] + ["final_returns.md"]


def safe_name(env_id):
    """env_id in a file name: a character other than a letter, a digit, _, . or - becomes _, and the name then ends
    in a hash of the id, so that two env ids never share a figure's file."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", env_id)
    return name if name == env_id else f"{name}-{hashlib.sha1(env_id.encode()).hexdigest()[:8]}"


KNOWN_SCRIPTS = ("shelm_ppo", "helm_ppo", "helmv2_ppo", "lstm_ppo", "cnn_ppo", "unknown")
MAX_BOOTSTRAP = 10**7  # --reps x --points: the bootstrap's means of a curve, 80 MB


def check_args(args):
    """Every argument, before anything is read: the counts in range, --runs a folder, --scripts names plot.py
    gives, and --out a folder that can be written (files.output_files: not a link, not a file, not read-only) and
    is no run's folder (it would be left out of the plots)."""
    from helm_utils import fail
    from helm_utils.files import output_files

    if not Path(args.runs).is_dir():
        fail(f"--runs {args.runs} is not a directory")
    if not 1 <= args.reps <= MAX_REPS or not 1 <= args.points <= MAX_POINTS:
        fail(f"--reps and --points must be in [1, {MAX_REPS:,}], got {args.reps} and {args.points}")
    if args.reps * args.points > MAX_BOOTSTRAP:
        fail(
            f"--reps x --points must be at most {MAX_BOOTSTRAP:,} (the bootstrap holds that many means of a curve), "
            f"got {args.reps:,} x {args.points:,}"
        )
    if not 0 < args.final_fraction <= 1:
        fail(f"--final-fraction must be in (0, 1], got {args.final_fraction}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {args.seed}")
    unknown = [s for s in args.scripts if s not in KNOWN_SCRIPTS]
    if unknown:
        fail(f"--scripts {' '.join(unknown)}: plot.py's script names are {' '.join(KNOWN_SCRIPTS)} (no .py)")
    out = output_files(args.out, [], "--out")
    if out.is_dir() and next(out.glob("*tfevents*"), None) is not None:
        fail(
            f"--out {args.out} holds event files: it is a run's folder, which plot.py would then leave out; "
            "the plots go to a folder of their own"
        )


def main(args):
    from helm_utils.files import output_files

    check_args(args)
    runs, notes = load_runs(args)
    groups, varying = group_runs(runs)
    out = Outputs(args.out)
    output_files(out.folder, output_names(groups), "--out")  # a link or a folder at a name: one line, nothing drawn
    rng = np.random.default_rng(args.seed)
    for env_id in sorted({env for _, env, _ in groups}):
        for axis in ("steps", "time"):
            plot_curves(groups, env_id, axis, args, rng, out)
    plot_aggregate(groups, args, out)
    plot_pruning(groups, out, rng, args.reps)
    table = final_table(groups, notes)
    out.text("final_returns.md", table)
    out.write()
    earlier = sorted(p.name for p in out.folder.iterdir() if OUTPUT_NAME.fullmatch(p.name) and p.name not in out.files)
    if earlier:
        print(
            f"warning: {out.folder} also holds {', '.join(earlier)} of an earlier plot.py, not of these runs "
            "(left as they are)",
            file=sys.stderr,
        )
    print(table, end="")
    print(
        f"{len(runs)} runs in {len(groups)} groups (differing: {', '.join(varying) or 'nothing'}); "
        f"figures in {out.folder}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(tyro.cli(Args))
