"""Does a trained agent use the cue? Its own episodes of MiniGrid-Memory, split by whether it saw the cue.

    python benchmark/cue_use.py --runs studies/memory_s7/runs --out studies/memory_s7/plots

In MiniGrid-Memory the cue (a key or a ball) lies in the start room behind the agent, which starts facing east,
away from it; at the end of the corridor the agent must step next to the matching object. An agent that chooses at
random succeeds in half the episodes, whether it saw the cue or not. An agent that carries the cue to the choice
succeeds more often in the episodes where it saw the cue than in those where it did not; an agent that has not
learned to look never sees it. The learning curves cannot tell these apart; this can.

Each run's checkpoint (checkpoint.pt; the scripts' runs, not the baselines') plays --episodes episodes with the
script that trained it (helm_utils.evaluation: sampled actions as in training, the frozen encoder in evaluation
mode), one env. At each step the env's own visibility test (MiniGrid's agent_sees, which also draws the
observation) says whether the cue is in view. Per run: the share of episodes in which the agent saw the cue, the
success rate with and without it, and the steps from the last sight of the cue to the end. And whether the
choice could have used the cue: the memory read-out the agent received at the last step of each episode (the step
of its choice) is recorded, and a logistic regression (benchmark/probe.py's: held-out episodes, standardized
features, C by cross-validation) predicts the cue from it, over the episodes that saw it. Per variant (the
launcher's name in --exp-name, else the run name): the mean over runs (seeds) and a 95% t-interval. Writes
cue_use.md and cue_use.json into --out, replaced together once both are made.

Before any episode is played: the arguments are bounded, --out is checked (helm_utils.files.output_files), and every
run's checkpoint is read and checked as enjoy.py checks it (its arguments, sizes against this machine's memory
included) and must be of MiniGrid-Memory: one `error:` line otherwise, naming the run.
"""

import contextlib
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's root: the scripts and helm_utils
sys.path.insert(0, str(Path(__file__).resolve().parent))  # plot.py

from plot import CELL_NAME, t_interval  # noqa: E402
from probe import Args as ProbeArgs  # noqa: E402
from probe import held_out_predictions  # noqa: E402

from helm_utils import checkpoints, evaluation, fail  # noqa: E402
from helm_utils.files import output_files, replace_together  # noqa: E402

OUTPUTS = ("cue_use.md", "cue_use.json")  # one set: replaced together
MAX_EPISODES = 100_000  # per run: each keeps its read-out at the choice (4 KB at the wt103 width) until decoded


@dataclass
class Args:
    runs: str = "runs"
    """directory of the runs (each with its checkpoint.pt)"""
    out: str = "runs/plots"
    """folder of cue_use.md and cue_use.json"""
    episodes: int = 200
    """episodes each agent plays (the first is left out: its first observation precedes the record)"""
    seed: int = 0
    """seed of the episodes (added to each run's own seed)"""


class CueLog:
    """An output of evaluation.play: for each episode of env 0, the steps at which the cue was in view and
    whether the episode ended in success. play hands over each step after the env has stepped, so the state
    checked at step t is that of the observation of step t + 1 (after an episode's end, the next episode's
    first): it is held until the next step or the episode's end says whose it is."""

    def __init__(self, env, trxl):
        self.env = env.unwrapped
        self.episodes, self.seen, self.pending, self.reward = [], [], None, 0.0
        self.cue = None  # the cue of the episode under way (unknown for the first: its start precedes the record)
        # the Transformer-XL's output at env 0's last token, as the agent receives it (before --ablate-memory)
        self.readout = None
        trxl.register_forward_hook(self.keep_readout)

    def keep_readout(self, module, inputs, output):
        self.readout = output[0][-1, 0].float().cpu().numpy()

    def cue_in_view(self):
        return bool(self.env.agent_sees(1, self.env.height // 2 - 1))  # MiniGrid-Memory's cue cell

    def step(self, record):
        if self.pending and record.t > 0:
            self.seen.append(record.t)  # the observation of this step, checked after the previous one
        self.pending, self.reward, self.t, self.last_readout = self.cue_in_view(), record.reward, record.t, self.readout

    def end_episode(self, episode):
        length = self.t + 1
        self.episodes.append(
            {"episode": episode, "length": length, "success": self.reward > 0, "seen_at": list(self.seen)}
            | {"cue": self.cue, "readout_at_choice": self.last_readout}
        )
        self.seen = [0] if self.pending else []  # the new episode's first observation
        self.pending = None
        self.cue = self.env.grid.get(1, self.env.height // 2 - 1).type  # the env has begun the next episode

    def close(self):
        pass


def play_run(path, episodes, seed, outputs=()):
    """The episodes of env 0 of the agent in checkpoint `path` (its first left out); outputs: more of play's."""
    loaded = evaluation.load(path, cuda=False)
    log = CueLog(loaded.envs.unwrapped.envs[0], loaded.trxl)
    with contextlib.redirect_stdout(io.StringIO()):  # play prints every episode
        evaluation.play(loaded, episodes + 1, [log, *outputs], seed=loaded.args.seed + 10_000 + seed)
    return loaded, log.episodes[1:]


def decode_at_choice(episodes, ablated, seed=0):
    """(held-out accuracy of predicting the cue from the read-out at the choice, that of chance: the training
    folds' majority class), over the episodes that saw the cue; (None, None) where either cue has fewer than 2
    such episodes. With --ablate-memory the agent reads zeros: chance."""
    seen = [e for e in episodes if e["seen_at"]]
    y = np.array([e["cue"] == "key" for e in seen], dtype=int)
    if len(seen) < 4 or min(np.bincount(y, minlength=2)) < 2:
        return None, None
    X = np.zeros((len(seen), 1)) if ablated else np.stack([e["readout_at_choice"] for e in seen]).astype(np.float64)
    pred, chance, _ = held_out_predictions(X, y, np.arange(len(seen)), 5, ProbeArgs.c_grid, seed)
    return float(np.mean(pred == y)), float(np.mean(chance == y))


def summary(episodes, ablated):
    seen = [e for e in episodes if e["seen_at"]]
    unseen = [e for e in episodes if not e["seen_at"]]

    def rate(group):
        return float(np.mean([e["success"] for e in group])) if group else None

    return {
        "episodes": len(episodes),
        "saw_cue": len(seen) / len(episodes) if episodes else None,
        "success": rate(episodes),
        "success_seen": rate(seen),
        "success_unseen": rate(unseen),
        "steps_after_cue": float(np.median([e["length"] - 1 - e["seen_at"][-1] for e in seen])) if seen else None,
    } | dict(zip(("cue_decodable_at_choice", "chance_at_choice"), decode_at_choice(episodes, ablated)))


def variant_of(run_dir, args):
    """The launcher's variant name (plot.py's reading of its --exp-name), else the run's name."""
    match = CELL_NAME.fullmatch(str(args.get("exp_name", "")))
    return match["variant"] if match else run_dir.name


def interval(values):
    """(mean, low, high): the mean over runs and its 95% t-interval (plot.py's; None for one run)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    low, high = t_interval(values)
    return (float(np.mean(values)), *((None, None) if math.isnan(low) else (float(low), float(high))))


def fmt(mean, low=None, high=None):
    if mean is None:
        return "-"
    return f"{mean:.2f}" if low is None else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def check_args(args):
    """The arguments, --out and every run's checkpoint, before any episode is played: [(run directory, path)] of the
    runs of the memory scripts, in order."""
    if not 1 <= args.episodes <= MAX_EPISODES:
        fail(f"--episodes must be in [1, {MAX_EPISODES}], got {args.episodes}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {args.seed}")
    runs = Path(args.runs)
    if not runs.is_dir():
        fail(f"--runs {args.runs} is not a directory")
    output_files(args.out, OUTPUTS, "--out")
    found = []
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = run_dir / "checkpoint.pt"
        if not path.is_file():
            print(f"warning: {run_dir.name}: no checkpoint.pt, left out", file=sys.stderr)
            continue
        ckpt = checkpoints.read(path)
        if ckpt.get("algorithm") not in evaluation.ALGORITHMS:
            print(f"# {run_dir.name}: not a run of the memory scripts (a baseline), left out")
            continue
        ckpt = checkpoints.check(ckpt, path, evaluation.script_of(ckpt, path))  # as enjoy.py checks it
        env_id = ckpt["args"]["env_id"]
        if not env_id.startswith(("MiniGrid-Memory", "HELM-PassiveMemory")):
            fail(f"{path} was trained on {env_id}: cue_use.py reads MiniGrid-Memory's cue (or the passive's)")
        found.append((run_dir, path))
    if not found:
        fail(f"no checkpoint of helm_ppo.py, helmv2_ppo.py or shelm_ppo.py under {args.runs}")
    return found


def main(args):
    found = check_args(args)
    report = {"args": vars(args), "runs": []}
    for i, (run_dir, path) in enumerate(found):
        print(f"{run_dir.name} ({i + 1} of {len(found)}): playing {args.episodes} episodes", flush=True)
        loaded, episodes = play_run(path, args.episodes, args.seed)
        row = {
            "run": run_dir.name,
            "script": f"{loaded.algorithm}_ppo",
            "variant": variant_of(run_dir, loaded.ckpt["args"]),
        }
        row |= summary(episodes, loaded.args.ablate_memory)
        print(
            f"{row['run']}: saw the cue in {fmt(row['saw_cue'])} of {row['episodes']} episodes; success "
            f"{fmt(row['success_seen'])} with it, {fmt(row['success_unseen'])} without; the cue decodable from the "
            f"read-out at the choice: {fmt(row['cue_decodable_at_choice'])} (chance {fmt(row['chance_at_choice'])})"
        )
        episodes = [{k: v for k, v in e.items() if k != "readout_at_choice"} for e in episodes]
        report["runs"].append(row | {"episode_list": episodes})
    lines = [
        f"How the trained agents use MiniGrid-Memory's cue: {args.episodes} episodes per run (sampled actions), "
        "split by whether the cue was ever in view; mean over runs (seeds) and 95% t-interval. Random choice "
        "succeeds in 0.50 of the episodes; using the cue shows as success with it above success without it. The "
        "last two columns: the held-out accuracy of a logistic regression predicting the cue from the memory "
        "read-out the agent received at its choice (the episodes that saw the cue), and that of chance (the "
        "training folds' majority class).",
        "",
        "| script | variant | runs | saw the cue | success | success, cue seen | success, cue not seen "
        "| steps from the cue to the end (median) | cue decodable at the choice | chance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for row in report["runs"]:
        groups.setdefault((row["script"], row["variant"]), []).append(row)
    report["variants"] = []
    for (script, variant), rows in sorted(groups.items()):
        keys = ("saw_cue", "success", "success_seen", "success_unseen")
        decoding = ("cue_decodable_at_choice", "chance_at_choice")
        cells = {k: interval([r[k] for r in rows]) for k in (*keys, *decoding)}
        steps = interval([r["steps_after_cue"] for r in rows])[0]
        report["variants"].append({"script": script, "variant": variant, "runs": len(rows)} | cells)
        lines.append(
            f"| {script} | {variant} | {len(rows)} | "
            + " | ".join(fmt(*cells[k]) for k in keys)
            + f" | {fmt(steps)} | "
            + " | ".join(fmt(*cells[k]) for k in decoding)
            + " |"
        )
    table = ("\n".join(lines) + "\n").encode()
    data = (json.dumps(report, allow_nan=False) + "\n").encode()  # strict JSON: made before either file is replaced
    out = Path(args.out)
    replace_together({out / "cue_use.md": lambda f: f.write(table), out / "cue_use.json": lambda f: f.write(data)})
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
