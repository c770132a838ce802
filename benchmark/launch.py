"""Run a grid of training runs (scripts x env ids x seeds x variants) here or on a Slurm cluster.

    python benchmark/launch.py --scripts shelm_ppo.py helm_ppo.py --env-ids MiniGrid-DoorKey-5x5-v0 \
        --seeds 1 2 3 --published --workers 2 --total-timesteps 100000 --n-layer 2
    python benchmark/launch.py ... --variants memory: ablated:--ablate-memory      # a baseline beside
    python benchmark/launch.py ... --scripts shelm_ppo.py lstm_ppo.py cnn_ppo.py      # the papers' baselines
    python benchmark/launch.py ... --cluster slurm --slurm-partition gpu --slurm-gpus-per-task 1
    python benchmark/launch.py ... --dry-run                                          # print the commands

Arguments the launcher does not know go to every run (here --total-timesteps and --n-layer) whose script has
them (the baselines have no --n-layer). With --published each (script, env) cell starts from the original
code's configuration in benchmark/configs.json; the common arguments, then the variant's, override it. A
variant with a flag a script lacks (--ablate-memory for a baseline) has no cell of that script.

Each cell has a fixed name, `--exp-name {script}-{variant}-{hash of its flags}`, so running the same grid
again finds its runs under runs/: finished ones are skipped, interrupted ones continue with the script's
`--resume` from their checkpoint.pt. Changing any flag of a cell makes it a new cell. Ctrl-C (or SIGTERM)
stops the workers' runs cleanly: each saves a checkpoint first. Logs: runs/.launch/<cell>.log.

Local runs use a thread pool of --workers threads, each waiting on one run's process, with
--threads-per-run BLAS/OpenMP threads per run (default: the cores divided among the workers).
docs/benchmarks.md says why (and why not submitit's LocalExecutor for local work).
"""

import ast
import concurrent.futures
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from helm_utils import fail  # noqa: E402 - the repository root is not on the path when run as a script

CONFIGS = Path(__file__).resolve().parent / "configs.json"
# the papers' baselines by name (docs/benchmarks.md): the file that runs each and the flags that make it that baseline
BASELINES = {
    "lstm_ppo.py": ("benchmark/baselines/lstm_ppo.py", []),
    "cnn_ppo.py": ("benchmark/baselines/lstm_ppo.py", ["--no-lstm"]),  # CNN-PPO: LSTM-PPO without its LSTM
}
SCRIPTS = ("shelm_ppo.py", "helm_ppo.py", "helmv2_ppo.py", *BASELINES)
# the launcher sets these flags itself: one per cell, or never inside a grid
TINY = {
    "shelm_ppo.py": ["--trxl-model", "tiny-random", "--clip-model", "tiny-random"],
    "helm_ppo.py": ["--trxl-model", "tiny-random"],
    "helmv2_ppo.py": ["--trxl-model", "tiny-random", "--clip-model", "tiny-random"],
    # no frozen models: their CNN as wide as the memory agents' with the tiny Transformer-XL (d_model 64)
    "lstm_ppo.py": ["--d-model", "64"],
    "cnn_ppo.py": ["--d-model", "64"],
}
RESERVED = {"--exp-name", "--seed", "--env-id", "--resume"}


@dataclass
class Args:
    scripts: tuple[str, ...] = ("shelm_ppo.py",)
    """training scripts, among shelm_ppo.py helm_ppo.py helmv2_ppo.py and the baselines lstm_ppo.py cnn_ppo.py"""
    env_ids: tuple[str, ...] = ("MiniGrid-DoorKey-5x5-v0",)
    """environment ids"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds"""
    variants: tuple[str, ...] = ("default:",)
    """NAME:FLAGS pairs, one run per variant in each cell, e.g. memory: ablated:--ablate-memory"""
    tiny: bool = False
    """use the tiny random models (--trxl-model tiny-random, and --clip-model tiny-random where the script has it)"""
    published: bool = False
    """start each cell from the original code's published configuration (benchmark/configs.json), where it has one"""
    workdir: str = "."
    """directory the runs are started in: their runs/ and data/ are there"""
    python: str = sys.executable
    """Python interpreter that runs the scripts"""
    dry_run: bool = False
    """print the commands (and which cells are finished or resumed) without running anything"""
    cluster: Literal["local", "slurm", "submitit-local"] = "local"
    """local: a pool of --workers here; slurm: a submitit array job; submitit-local: submitit's local executor"""
    workers: int = 1
    """local: runs at a time"""
    threads_per_run: int = 0
    """OMP/MKL threads of each run (0: the cores here divided among the workers; on Slurm, its cpus per task)"""
    slurm_partition: str | None = None
    """Slurm partition"""
    slurm_gpus_per_task: int = 1
    """GPUs per run"""
    slurm_cpus_per_task: int = 4
    """CPU cores per run"""
    slurm_mem_gb: int = 32
    """memory per run"""
    slurm_time_min: int = 240
    """time limit per run, minutes (an interrupted run continues when the grid is launched again)"""
    slurm_array_parallelism: int = 32
    """runs of the array at a time"""
    slurm_wait: bool = False
    """wait for the Slurm jobs to end and report them (default: submit and return)"""
    extra: list[str] = field(default_factory=list)
    """(filled from the arguments the launcher does not know: they go to every run)"""


@dataclass(frozen=True)
class Cell:
    script: str
    env_id: str
    seed: int
    variant: str
    flags: tuple[str, ...]  # the script's flags besides --env-id, --seed and --exp-name
    exp_name: str


def parse_flags(tokens):
    """["--a", "1", "--no-b", "--c=2"] -> {"--a": ["1"], "--b": ["--no-b"], "--c": ["--c=2"]}: keyed by flag, so
    that a later source of the same flag replaces an earlier one (a --no-x replaces an --x)."""
    flags, key = {}, None
    for token in tokens:
        if token.startswith("--"):
            key = "--" + token.split("=", 1)[0].removeprefix("--").removeprefix("no-")
            flags.pop(key, None)  # re-inserted last: the command lists the flags in the order they were set
            flags[key] = [] if token == key else [token]  # --no-x and --x=value carry their flag themselves
        elif key is None:
            fail(f"unexpected argument {token!r}: the scripts' arguments are flags (--name value)")
        else:
            flags[key].append(token)
    return flags


def render_flags(flags):
    out = []
    for key, values in flags.items():
        if values and values[0].startswith("--"):  # --no-x or --x=value carry the flag themselves
            out += values
        else:
            out += [key, *values]
    return out


def published_flags(script, env_id, configs):
    entry = configs.get(env_id, {}).get(script)
    if entry is None:
        return None
    tokens = []
    for flag, value in entry["flags"].items():
        tokens += [flag] if value is True else [flag, str(value)]
    return tokens


def script_file(script):
    """The file that runs `script` (a baseline's name, or the script itself), relative to the repository."""
    return BASELINES.get(script, (script,))[0]


def script_flags(script):
    """The flags `script` takes, keyed as parse_flags keys them: one per field of its Args, read from its source."""
    tree = ast.parse((ROOT / script_file(script)).read_text())
    (args,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args"]
    return {"--" + node.target.id.replace("_", "-") for node in args.body if isinstance(node, ast.AnnAssign)}


def cell_name(script, env_id, variant, flags):
    """`{script}-{variant}-{hash}`: the same for the same flags, different as soon as one differs."""
    digest = hashlib.sha1(json.dumps([script, env_id, list(flags)]).encode()).hexdigest()[:8]
    return f"{Path(script).stem}-{variant}-{digest}"


def make_grid(args, configs):
    variants = []
    for spec in args.variants:
        name, sep, flag_text = spec.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            fail(f"--variants takes NAME:FLAGS with a NAME of letters, digits and _, got {spec!r}")
        variants.append((name, shlex.split(flag_text)))
    if len({name for name, _ in variants}) != len(variants):
        fail(f"--variants names must differ, got {' '.join(args.variants)}")
    for script in args.scripts:
        if script not in SCRIPTS:
            fail(f"--scripts: unknown script {script!r} (choose among {' '.join(SCRIPTS)})")
    for tokens in [args.extra] + [flags for _, flags in variants]:
        for key in parse_flags(tokens):
            if key in RESERVED:
                fail(f"{key} is set by the launcher for each run; give the grid with --env-ids/--seeds instead")
    # a flag goes to the scripts that have it (the memory scripts' --n-layer is no flag of the baselines)
    known = {script: script_flags(script) for script in args.scripts}
    for tokens in [args.extra] + [flags for _, flags in variants]:
        for key in parse_flags(tokens):
            if not any(key in flags for flags in known.values()):
                fail(f"{key} is not a flag of {' or '.join(args.scripts)}")
    for script in args.scripts:
        skipped = [key for key in parse_flags(args.extra) if key not in known[script]]
        if skipped:
            print(f"# {script} has no {' '.join(skipped)}: its runs go without")
    cells = []
    for script, env_id, (variant, variant_flags) in itertools.product(args.scripts, args.env_ids, variants):
        lacking = [key for key in parse_flags(variant_flags) if key not in known[script]]
        if lacking:
            if env_id == args.env_ids[0]:
                print(f"# {script} has no {' '.join(lacking)}: no variant {variant} of it")
            continue
        base = published_flags(script, env_id, configs) if args.published else []
        flags = parse_flags(BASELINES.get(script, (script, []))[1] + (base or []))
        if args.tiny:
            flags.update(parse_flags(TINY[script]))
        flags.update({key: values for key, values in parse_flags(args.extra).items() if key in known[script]})
        for key, values in parse_flags(variant_flags).items():
            flags.pop(key, None)
            flags[key] = values
        flags = tuple(render_flags(flags) + ["--no-progress-bar"])
        exp_name = cell_name(script, env_id, variant, flags)
        cells += [Cell(script, env_id, seed, variant, flags, exp_name) for seed in args.seeds]
    return cells


def run_dirs(runs, cell):
    """The run directories of this cell: the scripts name them {env}__{exp_name}__{seed}__{suffix}."""
    return sorted(p for p in runs.glob(f"*__{cell.exp_name}__{cell.seed}__*") if p.is_dir())


def cell_state(runs, cell, tidy=True):
    """("new", None), ("resume", checkpoint) or ("finished", checkpoint), from the cell's checkpoints.

    A run directory without a checkpoint (stopped before its first one) holds nothing to continue: it
    is moved to runs/.launch/incomplete/ (unless not tidy) so that the plots do not count it twice."""
    best, best_iteration, finished = None, -1, False
    for run_dir in run_dirs(runs, cell):
        path = run_dir / "checkpoint.pt"
        try:
            import torch  # only here: a dry run of a new grid does not wait for it

            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            iteration = int(ckpt["iteration"])
            a = ckpt["args"]
            total = a["total_timesteps"] // (a["num_envs"] * a["num_steps"])
        except Exception:  # noqa: BLE001 - missing, or unreadable
            if not tidy:
                continue
            aside = runs / ".launch" / "incomplete" / run_dir.name
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir), str(aside))
            print(f"moved {run_dir} (no checkpoint to continue from) to {aside}")
            continue
        if iteration > best_iteration:
            best, best_iteration, finished = path, iteration, iteration >= total
    if best is None:
        return "new", None
    return ("finished" if finished else "resume"), best


def command(args, cell, checkpoint=None):
    script = str(ROOT / script_file(cell.script))
    if checkpoint is not None:  # the checkpoint holds the run's own arguments
        return [args.python, script, "--resume", str(checkpoint), "--no-progress-bar"]
    cell_flags = ["--env-id", cell.env_id, "--seed", str(cell.seed), "--exp-name", cell.exp_name]
    return [args.python, script, *cell_flags, *cell.flags]


def log_path(runs, cell):
    return runs / ".launch" / f"{cell.env_id}__{cell.exp_name}__{cell.seed}.log"


def run_environment(threads):
    """Threads per run: without a limit each of N runs would start one BLAS/OpenMP thread per core."""
    n = str(threads)
    return os.environ | {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONUNBUFFERED": "1"}


class LocalPool:
    """Runs the commands with at most `workers` at a time; stop() ends the running ones cleanly (SIGINT:
    each script saves a checkpoint, then exits) and keeps the queued ones from starting."""

    def __init__(self, workers):
        self.workers, self.lock, self.running, self.stopping = workers, threading.Lock(), set(), False

    def run_one(self, cmd, cwd, env, log):
        with self.lock:
            if self.stopping:
                return None
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as out:
                proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
            self.running.add(proc)
        returncode = proc.wait()
        with self.lock:
            self.running.discard(proc)
        return returncode

    def stop(self):
        with self.lock:
            if not self.stopping:
                print("\nstopping the runs (each saves a checkpoint first); launch the grid again to continue")
            self.stopping = True
            for proc in self.running:
                proc.send_signal(signal.SIGINT)

    def map(self, jobs):
        """jobs: [(cmd, cwd, env, log)] -> return codes (None: stopped before it started)."""
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: self.run_one(*job), jobs))


def run_logged(cmd, cwd, env, log):
    """One run, as a submitit job: its output appended to its log, its exit status returned."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def submit(args, jobs, runs):
    import submitit

    cluster = "local" if args.cluster == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=runs / ".launch" / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(timeout_min=args.slurm_time_min, name="helm-benchmark")
    if cluster == "slurm":
        executor.update_parameters(
            slurm_partition=args.slurm_partition,
            slurm_gpus_per_task=args.slurm_gpus_per_task,
            cpus_per_task=args.slurm_cpus_per_task,
            mem_gb=args.slurm_mem_gb,
            slurm_array_parallelism=args.slurm_array_parallelism,
        )
    with executor.batch():  # one array job
        handles = [executor.submit(run_logged, *job) for job in jobs]
    print(f"submitted {len(handles)} runs: job {handles[0].job_id.split('_')[0] if handles else '-'}")
    if cluster == "slurm" and not args.slurm_wait:
        return None
    return [h.result() for h in handles]


def main(args):
    if args.workers < 1 or args.threads_per_run < 0:
        fail("--workers must be >= 1 and --threads-per-run >= 0")
    configs = json.loads(CONFIGS.read_text())["configs"]
    workdir = Path(args.workdir).resolve()
    runs = workdir / "runs"
    cells = make_grid(args, configs)
    if args.published:
        for script, env_id in sorted({(c.script, c.env_id) for c in cells}):
            if published_flags(script, env_id, configs) is None:
                print(f"# no published configuration of {script} for {env_id}: the script's defaults")
    threads = args.threads_per_run or (
        args.slurm_cpus_per_task if args.cluster == "slurm" else max(1, (os.cpu_count() or 1) // args.workers)
    )
    env = run_environment(threads)
    jobs, counts = [], {"new": 0, "resume": 0, "finished": 0}
    for cell in cells:
        state, checkpoint = cell_state(runs, cell, tidy=not args.dry_run)
        counts[state] += 1
        cmd = command(args, cell, checkpoint)
        line = f"OMP_NUM_THREADS={threads} " + shlex.join(cmd)
        if state == "finished":
            print(f"# finished: {cell.env_id} {cell.exp_name} seed {cell.seed} ({checkpoint.parent.name})")
            continue
        print(("# resume: " if state == "resume" else "") + line if args.dry_run else f"[{state}] {line}")
        jobs.append((cmd, str(workdir), env, log_path(runs, cell)))
    print(f"# {len(cells)} runs: {counts['new']} new, {counts['resume']} to resume, {counts['finished']} finished")
    if args.dry_run or not jobs:
        return
    if args.cluster == "local":
        pool = LocalPool(args.workers)
        # set, not inherited: a shell starts background jobs with SIGINT ignored
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: pool.stop())
        codes = pool.map(jobs)
    else:
        codes = submit(args, jobs, runs)
        if codes is None:
            return
    # a run stopped by a signal exits with 128 + the signal's number, after saving its checkpoint
    stopped = sum(code is None or code in (128 + signal.SIGINT, 128 + signal.SIGTERM) for code in codes)
    failed = [(job, code) for job, code in zip(jobs, codes) if code not in (0, None, 130, 143)]
    for job, code in failed:
        print(f"exit {code}: {shlex.join(job[0])} (log: {job[3]})", file=sys.stderr)
    print(f"# done: {len(jobs) - len(failed) - stopped} ran to the end, {len(failed)} failed, {stopped} stopped")
    if failed or stopped:
        sys.exit(1)


if __name__ == "__main__":
    args, unknown = tyro.cli(Args, return_unknown_args=True)
    args.extra = list(unknown)
    main(args)
