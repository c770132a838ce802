"""bsuite's memory experiments, scored as bsuite scores them: each run's episodes in bsuite's CSV format, bsuite's
own `memory_len` and `memory_size` scores, and success against memory length and against bits for every agent,
with 95% intervals over seeds (docs/benchmarks.md, "Memory length and size").

    python benchmark/bsuite_memory.py --runs studies/bsuite_memory/runs --out studies/bsuite_memory/results
    python benchmark/bsuite_memory.py --frames docs/bsuite_memory_frames.png    # the picture of the rendering

The runs are those of benchmark/bsuite_memory.sh (any run of a script on a `bsuite/memory_len/<i>` or
`bsuite/memory_size/<i>` env will do): their episodes are read from their tensorboard logs (the raw returns, +1 or
-1, before the scripts' reward normalisation), which a resumed run purges back to its checkpoint, so a log holds
each episode once. An agent is a script and the launcher's variant: HELM, HELM ablated, ..., LSTM-PPO, CNN-PPO.
Writes into --out:

    csv/<agent>/seed<k>/bsuite_id_-_<experiment>-<i>.csv   each run's episodes as bsuite's CSV logger writes them
                                                           (bsuite.logging.csv_logging: its columns, at its
                                                           logarithmically spaced episodes), read back with
                                                           bsuite's own loader (bsuite.logging.csv_load)
    success.png/.svg      success at the end of training (the correct share of the last --final-fraction of a
                          run's episodes) against memory length and against bits, mean and 95% t-interval over
                          seeds, the memoryless level (0.5) and the Transformer-XL's reach marked
    bsuite_memory.md      that success per agent and setting, mean [95% t-interval] (seeds), and bsuite's score
                          per agent: bsuite's memory_len and memory_size analysis code, per seed, over the
                          agent's settings (the seeds that ran all of them)
    bsuite_memory.json    the same numbers

bsuite's score of an experiment is the share of its settings where the agent's average regret, compared with a
random agent, after min(its episodes, 10,000) episodes is below 0.75: where the agent was right in more than 62.5%
of all its episodes so far. Over fewer settings or episodes than bsuite's sweep (the CPU preset), it is bsuite's
formula on what was run, not comparable with published bsuite scores.
"""

import io
import itertools
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmark"))

# the agents' names: (script, launcher variant) -> name; a variant not listed is named "<script> <variant>"
NAMES = {"helm_ppo": "HELM", "helmv2_ppo": "HELMv2", "shelm_ppo": "SHELM", "lstm_ppo": "LSTM-PPO", "cnn_ppo": "CNN-PPO"}
OUTPUTS = ("success.png", "success.svg", "bsuite_memory.md", "bsuite_memory.json")  # and csv/, checked apart
EXPERIMENTS = {"memory_len": "memory_length", "memory_size": "num_bits"}  # bsuite's experiment -> its swept variable


@dataclass
class Args:
    runs: str = "studies/bsuite_memory/runs"
    """directory of the runs (each a tensorboard log directory)"""
    out: str = "studies/bsuite_memory/results"
    """directory the CSVs, figure and tables are written to"""
    final_fraction: float = 0.1
    """a run's success is the share of correct episodes in this last fraction of its episodes"""
    frames: str | None = None
    """only draw the picture of the rendering (one episode of each experiment) into this PNG file"""


def agent_name(script, variant):
    name = NAMES.get(script, script)
    if variant in (None, "default", "memory"):
        return name
    return f"{name} {variant}"


def bsuite_rows(returns, memory_length):
    """The rows bsuite's Logging wrapper writes for a run's episodes (each +1 or -1, in the order they ended): its
    columns, at the episodes its logarithmic schedule logs, and at the last episode."""
    from bsuite.utils.wrappers import _logarithmic_logging  # bsuite's own schedule

    returns = np.asarray(returns, dtype=float)
    rows, perfect, total = [], 0, 0.0
    for episode, episode_return in enumerate(returns, start=1):
        perfect += episode_return > 0
        total += episode_return
        if _logarithmic_logging(episode) or episode == len(returns):
            rows.append(
                {
                    "steps": episode * (memory_length + 1),  # every episode is L + 1 steps
                    "episode": episode,
                    "total_return": total,
                    "episode_len": memory_length + 1,
                    "episode_return": episode_return,
                    "total_perfect": int(perfect),
                    "total_regret": 2.0 * (episode - perfect),
                }
            )
    return rows


def run_setting(run):
    """(bsuite id, memory length, bits) of a run, or None if it is not on a bsuite memory setting."""
    from helm_utils import bsuite_memory

    env_id = run.args.get("env_id", "")
    if not env_id.startswith(bsuite_memory.PREFIX):
        return None
    bsuite_id = env_id.removeprefix(bsuite_memory.PREFIX)
    return (bsuite_id, *bsuite_memory.memory_length_and_bits(bsuite_id))


def csv_files(runs):
    """Each run's bsuite CSV, as bsuite's Logging wrapper names and fills it: {relative path: text}, the path
    csv/<agent>/seed<k>/<file>; and {(agent, seed): its folder, relative}."""
    import pandas as pd
    from bsuite.logging import csv_logging

    texts, folders = {}, {}
    for run in runs:
        bsuite_id, length, _ = run_setting(run)
        folder = Path("csv") / run.agent.replace(" ", "_") / f"seed{run.args['seed']}"
        name = f"{csv_logging.BSUITE_PREFIX}{bsuite_id.replace('/', csv_logging.SAFE_SEPARATOR)}.csv"
        texts[folder / name] = pd.DataFrame(bsuite_rows(run.returns, length)).to_csv(index=False)
        folders[(run.agent, int(run.args["seed"]))] = folder
    return texts, folders


def bsuite_scores(folders, root):
    """{agent: {experiment: [score per seed]}}: bsuite's loader and analysis code on the CSVs under root."""
    from bsuite.experiments.memory_len import analysis as memory_len_analysis
    from bsuite.experiments.memory_size import analysis as memory_size_analysis
    from bsuite.logging import csv_load

    score = {"memory_len": memory_len_analysis.score, "memory_size": memory_size_analysis.score}
    df, _ = csv_load.load_bsuite({f"{agent}|{seed}": str(root / folder) for (agent, seed), folder in folders.items()})
    # a score averages over the settings a seed ran: only the seeds that ran all of the agent's settings of an
    # experiment are scored (a seed run at lengths 3 and 10 alone would score over those two)
    ran = {}
    for (agent, seed), _folder in folders.items():
        mine = df[df.agent_name == f"{agent}|{seed}"]
        for experiment in EXPERIMENTS:
            ran.setdefault((agent, experiment), {})[seed] = frozenset(mine[mine.bsuite_env == experiment].bsuite_id)
    scores = {}
    for (agent, seed), _folder in sorted(folders.items()):
        mine = df[df.agent_name == f"{agent}|{seed}"]
        for experiment in EXPERIMENTS:
            rows = mine[mine.bsuite_env == experiment]
            if len(rows) and ran[agent, experiment][seed] == frozenset().union(*ran[agent, experiment].values()):
                scores.setdefault(agent, {}).setdefault(experiment, []).append(float(score[experiment](rows)))
    return scores


def success(run, final_fraction):
    """The share of correct episodes (return +1) among the last final_fraction of the run's episodes."""
    n = max(1, int(math.ceil(final_fraction * len(run.returns))))
    return float((np.asarray(run.returns[-n:]) > 0).mean())


def summary(values):
    """(mean, low, high, n): the mean and 95% t-interval over seeds (plot.py's)."""
    from plot import t_interval

    lo, hi = t_interval(values)
    return float(np.mean(values)), lo, hi, len(values)


def reach(run):
    """Steps back the Transformer-XL reads (n_layer x (mem_len - 1), docs/probe.md), or None for the baselines."""
    if "n_layer" not in run.args or "mem_len" not in run.args:
        return None
    return int(run.args["n_layer"]) * (int(run.args["mem_len"]) - 1)


# one colour per agent, kept by its variants: the ablated twin dashed, a longer memory with squares, real size with
# triangles
AGENT_COLORS = {"HELM": "#1f77b4", "HELMv2": "#ff7f0e", "SHELM": "#2ca02c", "LSTM-PPO": "#d62728", "CNN-PPO": "#7f7f7f"}


def line_styles(agents):
    """{agent: matplotlib line style}: the colour of its agent (names beyond AGENT_COLORS get the next free
    colours), dashed for an ablated twin and CNN-PPO (memoryless both), the marker by variant."""
    spare = itertools.cycle(["#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"])
    colors = dict(AGENT_COLORS)
    styles = {}
    for agent in agents:
        base, _, variant = agent.partition(" ")
        if base not in colors:
            colors[base] = next(spare)
        marker = "^" if "wt103" in variant else "s" if "mem" in variant else "o"
        dashed = "ablated" in variant or base == "CNN-PPO"
        styles[agent] = {"color": colors[base], "ls": "--" if dashed else "-", "marker": marker}
    return styles


def plot_success(table, reaches):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (*axes, key) = plt.subplots(1, 3, figsize=(13, 4.5), width_ratios=(1, 1, 0.3))
    # one colour per agent in both panels, whichever settings each agent ran
    styles = line_styles(sorted(table))
    legend = {}
    for axis, experiment in zip(axes, EXPERIMENTS):
        ticks = set()
        for agent, cells in sorted(table.items()):
            points = sorted((cell["x"], cell) for cell in cells.values() if cell["experiment"] == experiment)
            if not points:
                continue
            x = np.array([p[0] for p in points])
            ticks.update(x.tolist())
            mean = np.array([p[1]["mean"] for p in points])
            lo = np.array([p[1]["low"] if not math.isnan(p[1]["low"]) else p[1]["mean"] for p in points])
            hi = np.array([p[1]["high"] if not math.isnan(p[1]["high"]) else p[1]["mean"] for p in points])
            legend[agent] = axis.plot(x, mean, label=agent, **styles[agent])[0]
            axis.fill_between(x, np.clip(lo, 0, 1), np.clip(hi, 0, 1), color=styles[agent]["color"], alpha=0.12)
        legend["memoryless (0.5)"] = axis.axhline(0.5, color="grey", lw=0.8, ls=":")
        if experiment == "memory_len":
            for length, style in zip(sorted(set(reaches)), ("-.", (0, (1, 3)), "--")):
                # the context is last seen at the second decision, the query comes at decision L + 1
                legend[f"reach {length} steps (L <= {length + 1})"] = axis.axvline(
                    length + 1.5, color="black", lw=0.8, ls=style
                )
        axis.set_xscale("log")
        axis.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
        axis.minorticks_off()
        axis.set_ylim(0.3, 1.02)
        axis.set_xlabel(
            "memory length L (bsuite memory_len)" if experiment == "memory_len" else "bits (bsuite memory_size, L = 2)"
        )
        axis.set_ylabel("success at the end of training")
        axis.set_title(experiment)
    key.axis("off")  # the third panel holds the legend, clear of the curves
    key.legend(legend.values(), legend.keys(), fontsize=8, loc="center left")
    fig.tight_layout()
    return fig


def figure_bytes(fig):
    """{"png": bytes, "svg": bytes} of a figure, drawn in memory (written with the rest of the set)."""
    import matplotlib.pyplot as plt

    drawn = {}
    for ext in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=120)
        drawn[ext] = buffer.getvalue()
    plt.close(fig)
    return drawn


def markdown(table, scores, notes):
    settings = sorted(
        {(cell["experiment"], cell["x"], setting) for cells in table.values() for setting, cell in cells.items()}
    )
    lines = []
    for experiment in EXPERIMENTS:
        columns = [(x, s) for e, x, s in settings if e == experiment]
        if not columns:
            continue
        unit = "L" if experiment == "memory_len" else "bits"
        lines += [
            f"**{experiment}**: success at the end of training, mean [95% t-interval] (seeds); bsuite's score "
            "over the agent's settings, mean [95% t-interval] (the seeds that ran all of them)",
            "",
            "| agent | " + " | ".join(f"{unit} = {x} ({s})" for x, s in columns) + " | bsuite score |",
            "|---|" + "---|" * (len(columns) + 1),
        ]
        for agent, cells in sorted(table.items()):
            row = []
            for _, setting in columns:
                cell = cells.get(setting)
                row.append(
                    "" if cell is None else f"{cell['mean']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}] ({cell['n']})"
                )
            agent_scores = scores.get(agent, {}).get(experiment)
            if agent_scores:
                mean, lo, hi, n = summary(agent_scores)
                row.append(f"{mean:.2f} [{lo:.2f}, {hi:.2f}] ({n})")
            else:
                row.append("")
            lines.append(f"| {agent} | " + " | ".join(row) + " |")
        lines.append("")
    if notes:
        lines += ["Run directories left out or incomplete:", ""] + [f"- {path.name}: {note}" for path, note in notes]
    return "\n".join(lines) + "\n"


def draw_frames():
    """One episode of memory_len/2 (length 3) and one of memory_size/2 (3 bits), the frames the agent decides on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helm_utils import bsuite_memory, env_suites

    episodes = []
    for env_id, seed in (("bsuite/memory_len/2", 1), ("bsuite/memory_size/2", 6)):
        env = env_suites.make(env_id)
        frame, _ = env.reset(seed=seed)
        frames, done = [frame], False
        while True:
            frame, _, done, _, _ = env.step(0)
            if done:
                break
            frames.append(frame)
        episodes.append((env_id, frames))
    width = max(len(frames) for _, frames in episodes)
    fig, axes = plt.subplots(len(episodes), width, figsize=(2.4 * width, 3.4 * len(episodes)), squeeze=False)
    for row, (env_id, frames) in enumerate(episodes):
        for col in range(width):
            axis = axes[row, col]
            if col >= len(frames):
                axis.axis("off")
                continue
            axis.imshow(frames[col], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            last = " (rewarded)" if col == len(frames) - 1 else ""
            axis.set_title(f"{env_id if col == 0 else ''}\ndecision {col + 1}{last}", fontsize=8)
            # what bsuite's observation vector says, read back from the frame
            length, bits = bsuite_memory.memory_length_and_bits(env_id.removeprefix(bsuite_memory.PREFIX))
            vector = bsuite_memory.read(frames[col], length, bits)[0]
            axis.set_xlabel(
                f"time {vector[0]:.2f}, query {vector[1]:.0f},\ncontext {vector[2:].astype(int).tolist()}", fontsize=7
            )
    fig.tight_layout()
    return fig


def main(args):
    from types import SimpleNamespace

    from plot import launcher_variant, load_runs

    from helm_utils import fail
    from helm_utils.files import output_file, output_files, replace_together, write_new

    if args.frames is not None:
        if not args.frames.endswith(".png"):
            fail(f"--frames {args.frames}: give a .png file name (an .svg is written beside it)")
        frames = output_file(args.frames, "--frames")
        output_files(frames.parent, [frames.with_suffix(".svg").name], "--frames")
        drawn = figure_bytes(draw_frames())
        replace_together({frames.with_suffix(f".{ext}"): lambda f, d=data: f.write(d) for ext, data in drawn.items()})
        print(f"frames in {args.frames}")
        return
    if not Path(args.runs).is_dir():
        fail(f"--runs {args.runs} is not a directory")
    if not 0 < args.final_fraction <= 1:
        fail(f"--final-fraction must be in (0, 1], got {args.final_fraction}")
    out = output_files(args.out, OUTPUTS, "--out")
    loaded, notes = load_runs(SimpleNamespace(runs=args.runs, out=args.out, final_fraction=1.0, env_ids=(), scripts=()))
    runs = [run for run in loaded if run_setting(run) is not None]
    if not runs:
        fail(f"no runs on a bsuite memory setting (bsuite/memory_len/<i>, bsuite/memory_size/<i>) under {args.runs}")
    for run in runs:
        run.agent = agent_name(run.script, launcher_variant(run))
    csvs, folders = csv_files(runs)
    # the CSVs' folders, csv/<agent>/seed<k>: none may be a link (its target would be written into) or a file
    for folder in sorted({path.parent for path in csvs}):
        for part in (folder.parent.parent, folder.parent, folder):
            if (out / part).is_symlink() or ((out / part).exists() and not (out / part).is_dir()):
                kind = "a link" if (out / part).is_symlink() else "a file"
                fail(
                    f"--out: {out / part} is {kind}, not a folder of this tool's; move it away or choose another --out"
                )
    table, reaches = {}, set()
    for run in runs:
        bsuite_id, length, bits = run_setting(run)
        experiment = bsuite_id.partition("/")[0]
        cell = table.setdefault(run.agent, {}).setdefault(
            bsuite_id, {"experiment": experiment, "x": length if experiment == "memory_len" else bits, "seeds": {}}
        )
        cell["seeds"][int(run.args["seed"])] = success(run, args.final_fraction)
        if reach(run) is not None and experiment == "memory_len":
            reaches.add(reach(run))
    for cells in table.values():
        for cell in cells.values():
            cell["mean"], cell["low"], cell["high"], cell["n"] = summary(list(cell["seeds"].values()))
    with tempfile.TemporaryDirectory(prefix="bsuite-csv-") as scratch:  # bsuite's loader reads files
        for path, text in csvs.items():
            (Path(scratch) / path).parent.mkdir(parents=True, exist_ok=True)
            write_new(Path(scratch) / path, lambda f, t=text: f.write(t.encode()))
        scores = bsuite_scores(folders, Path(scratch))
    drawn = figure_bytes(plot_success(table, reaches))
    text = markdown(table, scores, notes)
    report = {"final_fraction": args.final_fraction, "success": table, "bsuite_scores": scores}
    writes = {out / path: lambda f, t=text: f.write(t.encode()) for path, text in csvs.items()}
    writes |= {out / f"success.{ext}": lambda f, d=data: f.write(d) for ext, data in drawn.items()}
    writes[out / "bsuite_memory.md"] = lambda f: f.write(text.encode())
    writes[out / "bsuite_memory.json"] = lambda f: f.write(json.dumps(report, indent=1).encode())
    replace_together(writes)  # all made before any is written, then replaced together
    earlier = sorted(p for p in (out / "csv").rglob("*.csv") if p.relative_to(out) not in csvs)
    if earlier:
        print(f"# {len(earlier)} CSVs of an earlier call left in {out / 'csv'} (not of these runs), e.g. {earlier[0]}")
    print(text, end="")
    print(f"{len(runs)} runs of {len(table)} agents; figure, tables and bsuite CSVs in {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
