"""A learning check that guards the pipeline: does a memory agent learn to use its memory, where its ablated twin
cannot? Minutes on a CPU, not hours (docs/benchmarks.md, "Memory length and size").

    python benchmark/learning_check.py                              # HELM, HELMv2 and SHELM, 2 runs at a time
    python benchmark/learning_check.py --scripts helmv2_ppo.py      # one of them

On bsuite's memory_len at length 3 (`bsuite/memory_len/2`: the context bit shows in the first two observations,
the question comes two steps later, only the answer is rewarded, +1 or -1) each script trains its agent with the
tiny random models (2 layers) and bsuite_memory.sh's PPO settings, and the same agent with --ablate-memory (its
memory read-out zeroed, the frozen models still running). A memoryless agent is right in half of the episodes
whatever it does. The check passes when every memory agent is right in at least --threshold of its episodes in the
last quarter of its steps, and no ablated twin is. Exit status 0 when it passes, 1 when it does not (with the
table), as a test would.
"""

import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmark"))

SCRIPTS = ("helm_ppo.py", "helmv2_ppo.py", "shelm_ppo.py")
TINY = {
    "helm_ppo.py": ["--trxl-model", "tiny-random"],
    "helmv2_ppo.py": ["--trxl-model", "tiny-random", "--clip-model", "tiny-random"],
    "shelm_ppo.py": ["--trxl-model", "tiny-random", "--clip-model", "tiny-random"],
}
LAST = 0.25  # the share of a run's steps whose episodes say how well it ended


@dataclass
class Args:
    scripts: tuple[str, ...] = SCRIPTS
    """memory scripts to check, each beside its ablated twin"""
    env_id: str = "bsuite/memory_len/2"
    """the task: a bsuite memory setting (docs/environments.md)"""
    total_timesteps: int = 6144
    """steps of each run (12 updates of 16 envs x 32 steps)"""
    threshold: float = 0.75
    """success a memory agent must reach, and its ablated twin must not, in the last quarter of its steps"""
    seed: int = 1
    """seed of the runs"""
    workers: int = 2
    """runs at a time (each with one thread)"""
    workdir: str | None = None
    """a new or empty folder the runs are written to and kept in (default: a temporary folder, removed at the end)"""


def command(args, script, ablated, workdir):
    flags = [
        "--env-id", args.env_id, "--seed", str(args.seed), "--total-timesteps", str(args.total_timesteps),
        "--num-steps", "32", "--learning-rate", "5e-4", "--anneal-lr",  # bsuite_memory.sh's settings
        "--n-layer", "2", "--no-progress-bar", "--no-cuda", "--checkpoint-every", "0",
        "--exp-name", f"{Path(script).stem}-{'ablated' if ablated else 'memory'}",
        *TINY[script], *(["--ablate-memory"] if ablated else []),
    ]  # fmt: skip
    if script == "shelm_ppo.py":
        flags += ["--embeddings-dir", str(Path(workdir) / "data")]
    return [sys.executable, str(ROOT / script), *flags]


def run(args, script, ablated, workdir):
    """(script, ablated, success in the last quarter, episodes there, seconds); success None if the run failed."""
    from plot import read_run

    start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(command(args, script, ablated, workdir), cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
        return script, ablated, None, 0, seconds
    name = f"__{Path(script).stem}-{'ablated' if ablated else 'memory'}__{args.seed}__"
    (run_dir,) = [p for p in (Path(workdir) / "runs").iterdir() if name in p.name]
    logged, why = read_run(run_dir, LAST)
    if logged is None:
        print(f"{run_dir}: {why}", file=sys.stderr)
        return script, ablated, None, 0, seconds
    last = logged.steps > (1 - LAST) * logged.last_step
    return script, ablated, float((logged.returns[last] > 0).mean()), int(last.sum()), seconds


def check(args, workdir):
    """[(script, ablated, success, episodes, seconds)] of every run, and whether the check passes."""
    jobs = [(script, ablated) for script in args.scripts for ablated in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda job: run(args, *job, workdir), jobs))
    passed = all(
        success is not None and (success < args.threshold if ablated else success >= args.threshold)
        for _, ablated, success, _, _ in results
    )
    return results, passed


def check_args(args):
    from helm_utils import bsuite_memory, fail

    unknown = [s for s in args.scripts if s not in SCRIPTS]
    if unknown or not args.scripts:
        fail(f"--scripts: choose among {' '.join(SCRIPTS)}, got {' '.join(args.scripts) or 'none'}")
    if not args.env_id.startswith(bsuite_memory.PREFIX):
        fail(f"--env-id {args.env_id}: the check runs on a bsuite memory setting, e.g. bsuite/memory_len/2")
    bsuite_memory.settings(args.env_id.removeprefix(bsuite_memory.PREFIX))
    if not 512 <= args.total_timesteps <= 10**7:
        fail(f"--total-timesteps must be in [512, 10**7], got {args.total_timesteps}")
    if not 0.5 < args.threshold <= 1:
        fail(f"--threshold must be in (0.5, 1] (a memoryless agent is right half the time), got {args.threshold}")
    if not 1 <= args.workers <= 64:
        fail(f"--workers must be in [1, 64], got {args.workers}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {args.seed}")
    if args.workdir is not None and Path(args.workdir).exists():
        if not Path(args.workdir).is_dir() or Path(args.workdir).is_symlink():
            fail(f"--workdir {args.workdir} is not a directory")
        if any(Path(args.workdir).iterdir()):
            fail(
                f"--workdir {args.workdir} is not empty: give a new folder, so that the check reads its own runs alone"
            )


def main(args):
    check_args(args)
    start = time.time()
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="helm-learning-check-") as workdir:
            results, passed = check(args, workdir)
    else:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        results, passed = check(args, args.workdir)
    print(f"{args.env_id}, {args.total_timesteps} steps per run, success in the last quarter of the steps:")
    print("| script | agent | success | episodes | seconds |\n|---|---|---|---|---|")
    for script, ablated, success, episodes, seconds in results:
        shown = "failed" if success is None else f"{success:.2f}"
        print(f"| {script} | {'ablated' if ablated else 'memory'} | {shown} | {episodes} | {seconds:.0f} |")
    verdict = "passed" if passed else "FAILED"
    print(
        f"{verdict}: memory agents must reach {args.threshold}, ablated ones stay below it "
        f"({time.time() - start:.0f} s in all)"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
