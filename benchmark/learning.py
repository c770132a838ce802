"""Does it learn? Train one of the scripts with the tiny random models and report its learning curve.

    python benchmark/learning.py shelm_ppo.py --env-id MiniGrid-DoorKey-5x5-v0 --published
    python benchmark/learning.py shelm_ppo.py --env-id MiniGrid-MemoryS7-v0 --total-timesteps 300000 [script args]

The tiny models are random, so the memory carries little information and the CNN query does the
work: this checks the PPO loop, the data flow and the reward handling, not the pretrained memory.
Writes docs/results/learning__<script>__<env>.csv (step, mean return of the episodes in that bin)
and prints a summary line with wall time and the first step at which the mean return of the last
100 episodes reached --target.
"""

import csv
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent


# The original code's published MiniGrid-DoorKey-5x5 configurations (configs/MiniGrid/DoorKey5x5 of
# github.com/ml-jku/helm; also in benchmark/configs.json), in these scripts' argument names. The
# scripts' defaults are the MiniGrid-Memory configurations.
PUBLISHED = {
    "MiniGrid-DoorKey-5x5-v0": {
        "helm_ppo.py": ["--learning-rate", "1e-4", "--mem-len", "255", "--ent-coef", "0.005", "--num-steps", "32"],
        "helmv2_ppo.py": ["--learning-rate", "3e-4", "--mem-len", "255", "--ent-coef", "0.005", "--num-steps", "32"],
        "shelm_ppo.py": [
            "--learning-rate",
            "1e-4",
            "--mem-len",
            "511",
            "--ent-coef",
            "0.005",
            "--num-steps",
            "32",
            "--topk",
            "2",
        ],
    },
}


@dataclass
class Args:
    script: tyro.conf.Positional[str]
    """shelm_ppo.py, helm_ppo.py or helmv2_ppo.py"""
    env_id: str = "MiniGrid-DoorKey-5x5-v0"
    total_timesteps: int = 300_000
    seed: int = 1
    target: float = 0.9
    """report the first step where the mean return of the last 100 episodes reaches this"""
    bin_steps: int = 10_000
    published: bool = False
    """use the original code's published configuration for this env (where there is one), else the defaults"""
    out_dir: str = str(ROOT / "docs" / "results")


def read_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def main(args, extra):
    work = Path(tempfile.mkdtemp(prefix="helm-learning-"))
    tiny = ["--trxl-model", "tiny-random"]
    if args.script in ("shelm_ppo.py", "helmv2_ppo.py"):
        tiny += ["--clip-model", "tiny-random"]
    if args.published:
        if args.env_id not in PUBLISHED:
            sys.exit(f"error: no published configuration for {args.env_id}")
        extra = PUBLISHED[args.env_id][Path(args.script).name] + list(extra)
    cmd = [
        sys.executable,
        str(ROOT / args.script),
        *tiny,
        "--env-id",
        args.env_id,
        "--n-layer",
        "2",
        "--total-timesteps",
        str(args.total_timesteps),
        "--seed",
        str(args.seed),
        "--no-progress-bar",
        *extra,
    ]
    print(" ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=work, check=True)
    wall = time.time() - start
    run_dir = next((work / "runs").iterdir())
    returns = read_scalars(run_dir, "charts/episodic_return")
    sps = read_scalars(run_dir, "charts/SPS")
    steps = np.array([s for s, _ in returns])
    values = np.array([v for _, v in returns])
    first = None
    for i in range(len(values)):
        if i >= 99 and values[i - 99 : i + 1].mean() >= args.target:
            first = int(steps[i])
            break
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"learning__{Path(args.script).stem}__{args.env_id}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "mean_return", "episodes"])
        for lo in range(0, args.total_timesteps, args.bin_steps):
            sel = (steps > lo) & (steps <= lo + args.bin_steps)
            if sel.any():
                w.writerow([lo + args.bin_steps, f"{values[sel].mean():.4f}", int(sel.sum())])
    final = values[-100:].mean() if len(values) else float("nan")
    print(
        f"{args.script} {args.env_id}: {len(values)} episodes, final mean return (last 100) {final:.3f}, "
        f"first reached {args.target} at step {first}, wall {wall:.0f} s, SPS {sps[-1][1] if sps else 'n/a'}; "
        f"curve in {path}"
    )


if __name__ == "__main__":
    main(*tyro.cli(Args, return_unknown_args=True))  # unknown arguments go to the script
