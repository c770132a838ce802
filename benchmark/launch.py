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

Every cell's flags are parsed and checked by its script's own Args and check_args before any run starts. A cell
is run by one launch at a time: a launch holds runs/.launch/locks/<cell>.lock while it has the cell queued or
running, and a run (here or as a Slurm job) decides at its start, under that lock, whether to start, resume or
skip its cell. A run directory whose script is alive (it holds the directory's .lock) is never touched; a
checkpoint counts only if the script's --resume would take it. A cell blocked by what lies in its folders (a link
or a folder at a lock's or a log's name, a run directory that is a link) is skipped with a warning naming the file,
the others run, and the launch ends with one error line.

Local runs use a thread pool of --workers threads, each waiting on one run's process, with
--threads-per-run BLAS/OpenMP threads per run (default: the cores divided among the workers).
docs/benchmarks.md says why (and why not submitit's LocalExecutor for local work).
"""

import ast
import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
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
from helm_utils.files import open_plain, what_lies_at  # noqa: E402

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
# bounds of the launcher's own counts: a grid or a pool beyond them is a typo, not a study
MAX_CELLS = 10_000
MAX_WORKERS = MAX_THREADS = 1024
SLURM_BOUNDS = {  # flag: (lowest, highest)
    "slurm_gpus_per_task": (0, 64),
    "slurm_cpus_per_task": (1, 1024),
    "slurm_mem_gb": (1, 2**20),
    "slurm_time_min": (1, 366 * 24 * 60),
    "slurm_array_parallelism": (1, MAX_CELLS),
}


class Blocked(Exception):
    """A cell that cannot run because of what lies in its folders; the message names the file. The cell is skipped
    with a warning, the others go on, and the launch ends with one error line."""


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
    bsuite_episodes: int = 0
    """on bsuite's memory settings (bsuite/memory_len/<i>, bsuite/memory_size/<i>), run each cell for at least this
    many episodes, as bsuite counts its experiments (each episode is L + 1 steps), instead of --total-timesteps"""
    workdir: str = "."
    """directory the runs are started in (made if new): their runs/ and data/ are there"""
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


MAX_CONFIGS_BYTES = 10 * 2**20  # configs.json is some 100 KB


def read_configs(path=None):
    """benchmark/configs.json (or `path`), checked: {"configs": {env_id: {script: {"flags": {"--flag": value}}}}},
    each script one of SCRIPTS, each flag one of its script's, with a value of the flag's type: a whole number for
    an int, a finite number for a float, true for a switch ("--x": true turns x on, "--no-x": true off), a string
    for the rest (not one that starts with "-": it would read as a flag); no flag the launcher sets. Other keys of
    an entry ("source", "not_flags", ...) are notes for people."""
    path = path or CONFIGS
    try:
        if Path(path).stat().st_size > MAX_CONFIGS_BYTES:
            fail(f"{path} takes {Path(path).stat().st_size:,} bytes, more than the {MAX_CONFIGS_BYTES:,} it may")
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        fail(f"{path} is not a readable JSON file ({' '.join(str(e).split())[:200]})")
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict):
        fail(f'{path} has no "configs" object')
    for env_id, by_script in configs.items():
        if not isinstance(by_script, dict):
            fail(f"{path}: configs[{env_id!r}] is not an object of scripts")
        for script, entry in by_script.items():
            flags = entry.get("flags") if isinstance(entry, dict) else None
            where = f"{path}: configs[{env_id!r}][{script!r}]"
            if script not in SCRIPTS:
                fail(f"{where}: {script!r} is not a script of the launcher ({' '.join(SCRIPTS)})")
            if not isinstance(flags, dict):
                fail(f'{where} has no "flags" object')
            fields = script_flags(script)
            for key, value in flags.items():
                if key in RESERVED:
                    fail(f"{where}: {key} is set by the launcher for each run")
                problem = config_value_problem(fields, key, value)
                if problem:
                    fail(f"{where}: {key}: {value!r} {problem}")
    return configs


def config_value_problem(fields, key, value):
    """Why `"key": value` of configs.json is not a flag of the script whose fields are `fields` (script_flags) with
    a value of its type, or None."""
    if not isinstance(key, str) or not re.fullmatch(r"--[a-z0-9][a-z0-9-]*", key):
        return "is not a flag (--name)"
    switch = key.startswith("--no-") and fields.get("--" + key.removeprefix("--no-")) == "bool"
    kind = "bool" if switch else fields.get(key)
    if kind is None:
        return "is not a flag of this script"
    if kind == "bool":
        return None if value is True else "is not true: a switch takes true (--x: true turns it on, --no-x: true off)"
    if isinstance(value, bool):
        return f"is not a value of this {kind} flag"
    if kind == "int":
        return None if isinstance(value, int) else "is not a whole number"
    if kind in ("float", "float | None"):
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return None if ok else "is not a finite number"
    if not isinstance(value, str) or value.startswith("-") or not value.isprintable():
        return f"is not a string of printable characters that does not start with '-' (the flag is {kind})"
    return None


def tyro_message(text):
    """tyro's boxed error message as one line."""
    lines = [line.strip(" │╭╮╰╯─-") for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("For full helptext")]
    return " ".join(lines[1:] or lines).split(" Argument helptext:")[0][:300]


def script_module(script):
    """The module of `script` (a baseline's file for its name), imported from its file once, its __main__ not run.
    Kept in sys.modules alone, not in a cache of this module's own: submitit pickles run_cell with what it refers
    to, and a Slurm job imports the script itself."""
    path = ROOT / script_file(script)
    name = f"launched_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # tyro reads the help texts from the module's source
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def check_cell_flags(cell):
    """The cell's command line as its script parses and checks it (tyro, then check_args), in this process, before
    any run starts: one line naming the cell for the first flag that would stop its run."""
    module = script_module(cell.script)
    argv = ["--env-id", cell.env_id, "--seed", str(cell.seed), "--exp-name", cell.exp_name, *cell.flags]
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            args = tyro.cli(module.Args, args=argv)
    except SystemExit:
        fail(f"{cell.script} {cell.env_id} seed {cell.seed} ({cell.variant}): {tyro_message(out.getvalue())}")
    try:
        module.check_args(args)
    except SystemExit as e:
        message = str(e.code).removeprefix("error: ")
        fail(f"{cell.script} {cell.env_id} seed {cell.seed} ({cell.variant}): {message}")


def cells_to_check(cells):
    """The cells whose command lines stand for all: within a (script, env id, flags) group the cells differ in their
    seed alone, which the scripts check against a range, so each group's lowest and highest seed are checked (a grid
    of hundreds of runs in a second, not a minute)."""
    groups = {}
    for cell in cells:
        groups.setdefault((cell.script, cell.env_id, tuple(cell.flags)), []).append(cell)
    chosen = []
    for group in groups.values():
        low, high = min(group, key=lambda c: c.seed), max(group, key=lambda c: c.seed)
        chosen += [low] if low is high else [low, high]
    return chosen


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


def script_flags(script, cache={}):  # noqa: B006 - a cache: each script's source is parsed once
    """The flags `script` takes, keyed as parse_flags keys them, each with its type as written ("int", "float",
    "bool", "str | None", ...): one per field of its Args, read from its source."""
    if script not in cache:
        tree = ast.parse((ROOT / script_file(script)).read_text())
        (args,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args"]
        cache[script] = {
            "--" + node.target.id.replace("_", "-"): ast.unparse(node.annotation)
            for node in args.body
            if isinstance(node, ast.AnnAssign)
        }
    return cache[script]


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
        try:
            variants.append((name, shlex.split(flag_text)))
        except ValueError as e:  # an unclosed quote
            fail(f"--variants {spec!r}: {e}")
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
        if args.bsuite_episodes and env_id.startswith("bsuite/"):
            flags["--total-timesteps"] = [str(bsuite_steps(script, env_id, flags, args.bsuite_episodes))]
        flags = tuple(render_flags(flags) + ["--no-progress-bar"])
        exp_name = cell_name(script, env_id, variant, flags)
        cells += [Cell(script, env_id, seed, variant, flags, exp_name) for seed in args.seeds]
    return cells


def bsuite_steps(script, env_id, flags, episodes):
    """The steps of `episodes` episodes of a bsuite memory setting (each L + 1 steps, in every env at once: they all
    end together), rounded up to whole updates of the cell's batch (--num-envs x --num-steps)."""
    from helm_utils import bsuite_memory

    length, _ = bsuite_memory.memory_length_and_bits(env_id.removeprefix(bsuite_memory.PREFIX))
    defaults = script_module(script).Args
    try:
        batch = int(flags.get("--num-envs", [defaults.num_envs])[0]) * int(
            flags.get("--num-steps", [defaults.num_steps])[0]
        )
    except ValueError:
        fail(f"{script} {env_id}: --num-envs and --num-steps must be whole numbers to count --bsuite-episodes")
    if batch < 1:
        fail(f"{script} {env_id}: --num-envs and --num-steps must be positive to count --bsuite-episodes")
    steps = episodes * (length + 1)
    return -(-steps // batch) * batch


def run_dirs(runs, cell):
    """The entries of runs/ named as this cell's run directories ({env}__{exp_name}__{seed}__{suffix}, as the
    scripts name them), files aside: directories, and links (which block the cell: cell_state)."""
    try:
        found = sorted(runs.glob(f"*__{glob.escape(cell.exp_name)}__{cell.seed}__*"))
    except OSError as e:
        raise Blocked(f"cannot list {runs}: {e.strerror or e}") from None
    return [p for p in found if p.is_symlink() or p.is_dir()]


def try_lock(path, create=True):
    """An exclusive flock on the plain file `path` (a descriptor to close to release it), or None if another process
    holds it; "missing" if the file does not exist and create is off. A link, a folder or a FIFO at the name raises
    NotAPlainFile (files.open_plain)."""
    try:
        fd = open_plain(path, create=create)
    except FileNotFoundError:
        if not create:
            return "missing"
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def release(lock):
    if isinstance(lock, int):
        os.close(lock)


def furthest_state(run_dir, cell):
    """((iteration, updates of the run, checkpoint file) of the furthest state of a run directory that the script's
    --resume would take, or None; [why each checkpoint file there is not taken]). The files: its checkpoint.pt, and
    model_final.pt (written at the end, with the same content) for when checkpoint.pt is damaged. Taken: a plain file
    (not a FIFO: reading one would hang), read as a checkpoint, checked as --resume checks it (checkpoints.check: the
    arguments of their types and in range, the counters consistent, ...), and of this cell's run (its run_name, env
    id, seed and exp name): a checkpoint that names another run directory would be continued there."""
    import torch  # only here: a dry run of a new grid does not wait for it

    from helm_utils import checkpoints

    best, problems = None, []
    for name in ("checkpoint.pt", "model_final.pt"):
        path = run_dir / name
        if not path.exists() and not path.is_symlink():
            continue
        if not path.is_file():
            problems.append(f"{name} is {what_lies_at(path) or 'not a plain file'}")
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, damaged or not a torch file at all
            problems.append(f"{name} cannot be read ({type(e).__name__})")
            continue
        try:
            refused = checkpoints.refusal(ckpt, path, script_module(cell.script), cell.env_id)
        except Exception as e:  # noqa: BLE001 - a structure check() does not expect: it is not taken either
            refused = f"it cannot be checked ({type(e).__name__})"
        if refused is not None:
            problems.append(f"{name}: --resume refuses it: {refused}")
            continue
        a = ckpt["args"]
        own = {"run_name": run_dir.name, "env_id": cell.env_id, "seed": cell.seed, "exp_name": cell.exp_name}
        found = {"run_name": ckpt["run_name"], **{key: a.get(key) for key in own if key != "run_name"}}
        other = [f"{key} {found[key]!r}" for key in own if found[key] != own[key]]
        if other:
            problems.append(f"{name}: it is of another run ({', '.join(other)})")
            continue
        iteration = ckpt["iteration"]
        total = a["total_timesteps"] // (a["num_envs"] * a["num_steps"])
        if best is None or iteration > best[0]:
            best = (iteration, total, path)
    return best, problems


def launch_folder(runs, *parts):
    """runs/.launch (or a folder in it), made if missing: a folder of the launcher's own, never one through a link
    (its logs, locks and the runs moved aside would land in the link's target). Raises Blocked otherwise."""
    folder = runs.joinpath(".launch", *parts)
    for path in [runs.joinpath(".launch", *parts[:i]) for i in range(len(parts) + 1)]:
        kind = "a link" if path.is_symlink() else "a file" if path.exists() and not path.is_dir() else None
        if kind:
            raise Blocked(f"{path} is {kind}, not a folder of the launcher's own; move it away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Blocked(f"cannot create {folder}: {e.strerror or e}") from None
    if folder.is_symlink() or not folder.is_dir():  # made by another process meanwhile
        raise Blocked(f"{folder} is not a folder of the launcher's own; move it away")
    return folder


def move_aside(runs, run_dir, why):
    """Move a dead run directory to runs/.launch/incomplete/ (under a name of its own: nothing there is replaced)."""
    aside = launch_folder(runs, "incomplete")
    for n in itertools.count(1):
        target = aside / (run_dir.name if n == 1 else f"{run_dir.name}-{n}")
        try:
            target.mkdir()  # claimed; the rename replaces this empty directory
        except FileExistsError:
            continue
        except OSError as e:
            raise Blocked(f"cannot move {run_dir} ({why}) to {aside}: {e.strerror or e}") from None
        try:
            os.rename(run_dir, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                target.rmdir()
            raise Blocked(f"cannot move {run_dir} ({why}) to {target}: {e.strerror or e}") from None
        print(f"moved {run_dir} ({why}) to {target}")
        return


def cell_state(runs, cell, tidy=True):
    """("new", None), ("resume", checkpoint), ("finished", checkpoint) or ("running", run directory), from the
    cell's run directories; Blocked (its message names the file) when what lies there keeps the cell from running.

    A run directory whose .lock a process holds is alive (a run starting or under way): the cell is "running" and
    the directory is not touched. A directory without a lock file (a run in its first instant, or an old one) is
    left as it is. Any other without a checkpoint --resume takes (stopped before its first one, or a checkpoint.pt
    that cannot be read or is refused and no model_final.pt) holds nothing to continue: it is moved to
    runs/.launch/incomplete/ (if tidy; if not, a checkpoint refused is named in a warning), holding its lock
    meanwhile, so that the plots do not count it twice. A run directory that is a link, or whose .lock is a link,
    a folder or a FIFO (no script can lock it), blocks the cell: it is not ours to move, and a new run beside it
    would be counted twice by the plots."""
    best = None
    for run_dir in run_dirs(runs, cell):
        if run_dir.is_symlink():
            raise Blocked(f"{run_dir} is a link, not a run directory of its own: move it away to run this cell")
        try:
            lock = try_lock(run_dir / ".lock", create=False)
        except OSError as e:
            raise Blocked(
                f"{run_dir / '.lock'} cannot be locked ({e.strerror or e}): no script can run in that directory; "
                "move the directory away to run this cell"
            ) from None
        if lock is None:
            return "running", run_dir
        try:
            state, problems = furthest_state(run_dir, cell)
            why = "; ".join(problems) or "no checkpoint to continue from"
            if state is None and lock == "missing":
                print(f"# left as it is: {run_dir} has no lock file, and {why} (is a run starting there?)")
            elif state is None and tidy:
                move_aside(runs, run_dir, why)
            elif state is None and problems:
                print(f"warning: {run_dir}: {why}; it will be moved to {runs / '.launch' / 'incomplete'}")
            elif state is not None and (best is None or state[0] > best[0]):
                best = state
        finally:
            release(lock)
    if best is None:
        return "new", None
    iteration, total, path = best
    return ("finished" if iteration >= total else "resume"), path


def command(args, cell, checkpoint=None):
    script = str(ROOT / script_file(cell.script))
    if checkpoint is not None:  # the checkpoint holds the run's own arguments; the env id is repeated, as the
        # command line's own: one that names a module to import (module:Env-v0) is honoured only from there
        return [args.python, script, "--resume", str(checkpoint), "--env-id", cell.env_id, "--no-progress-bar"]
    cell_flags = ["--env-id", cell.env_id, "--seed", str(cell.seed), "--exp-name", cell.exp_name]
    return [args.python, script, *cell_flags, *cell.flags]


def log_path(runs, cell):
    return runs / ".launch" / f"{cell_id(cell)}.log"


def cell_id(cell):
    """The cell's name for its lock and log files: env, exp name and seed; an env id's "/" (a gymnasium namespace)
    becomes "_", with a hash of the id so that two ids never share the files."""
    name = f"{cell.env_id}__{cell.exp_name}__{cell.seed}"
    if "/" in name:
        name = name.replace("/", "_") + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def cell_lock(runs, cell, create=True):
    """runs/.launch/locks/<cell>.lock, held by the launch that has the cell queued or running: None if another
    holds it ("missing" without create, if no launch ever made it). Blocked where it cannot be taken: a link, a
    folder or a FIFO at its name, a read-only file system."""
    path = runs / ".launch" / "locks" / f"{cell_id(cell)}.lock"
    try:
        if create:
            launch_folder(runs, "locks")
        return try_lock(path, create)
    except OSError as e:
        raise Blocked(f"cannot lock {path}: {e.strerror or e}") from None


def open_log(log):
    """The cell's log, appended to: a plain file of its own (files.open_plain: no link followed); Blocked if not."""
    try:
        return open_plain(log, append=True)
    except OSError as e:
        raise Blocked(f"cannot write the log {log}: {e.strerror or e}") from None


def warn_blocked(cell, blocked):
    print(f"warning: {cell.script} {cell.env_id} seed {cell.seed} is skipped: {blocked}", file=sys.stderr)


def run_cell(args, cell, runs, workdir, env):
    """One cell's run: under the cell's lock, decide anew whether it is new, to resume or finished, then run it, its
    output appended to its log. Returns the run's exit status, or "finished" / "running" (another launch has it)
    when there was nothing to run, "blocked" (and a warning) when what lies in its folders keeps it from running."""
    lock = None
    try:
        lock = cell_lock(runs, cell)
        if lock is None:
            return "running"
        state, checkpoint = cell_state(runs, cell)
        if state in ("finished", "running"):
            return state
        with os.fdopen(open_log(log_path(runs, cell)), "a") as out:
            return subprocess.run(
                command(args, cell, checkpoint), cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
            ).returncode
    except Blocked as e:
        warn_blocked(cell, e)
        return "blocked"
    finally:
        release(lock)


def run_environment(threads):
    """Threads per run: without a limit each of N runs would start one BLAS/OpenMP thread per core."""
    n = str(threads)
    return os.environ | {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONUNBUFFERED": "1"}


class LocalPool:
    """Runs the cells with at most `workers` at a time; stop() ends the running ones cleanly (SIGINT: each script
    saves a checkpoint, then exits) and keeps the queued ones from starting."""

    def __init__(self, workers):
        self.workers, self.lock, self.running, self.stopping = workers, threading.Lock(), set(), False

    def run_one(self, args, cell, runs, workdir, env):
        """run_cell, the process registered so that stop() reaches it. None: stopped before it started."""
        with self.lock:
            if self.stopping:
                return None
            try:
                state, checkpoint = cell_state(runs, cell)
                if state in ("finished", "running"):
                    return state
                with os.fdopen(open_log(log_path(runs, cell)), "a") as out:
                    try:
                        proc = subprocess.Popen(
                            command(args, cell, checkpoint), cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
                        )
                    except OSError as e:
                        raise Blocked(f"cannot start {args.python}: {e.strerror or e}") from None
            except Blocked as e:  # what lies in its folders changed since the launch checked them
                warn_blocked(cell, e)
                return "blocked"
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
        """jobs: [(args, cell, runs, workdir, env)] -> return codes (None: stopped before it started)."""
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda job: self.run_one(*job), jobs))


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
    with executor.batch():  # one array job; each takes its cell's lock when it starts
        handles = [executor.submit(run_cell, *job) for job in jobs]
    print(f"submitted {len(handles)} runs: job {handles[0].job_id.split('_')[0] if handles else '-'}")
    if cluster == "slurm" and not args.slurm_wait:
        return None
    return [h.result() for h in handles]


def check_setup(args, workdir, runs):
    """What the launch itself needs, before any run: the work directory, the interpreter, runs/.launch/."""
    if args.workers < 1 or args.threads_per_run < 0:
        fail("--workers must be >= 1 and --threads-per-run >= 0")
    if not 0 <= args.bsuite_episodes <= 10**9:
        fail(f"--bsuite-episodes must be in [0, 10**9] (0: off), got {args.bsuite_episodes}")
    if workdir.exists() and not workdir.is_dir():  # a new one is made with its runs/ (a study's own folder)
        fail(f"--workdir {args.workdir} is not a directory")
    if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
        fail(f"--python {args.python} is not an executable file")
    # the counts bounded, the grid's lists without repeats (one cell, one lock), the launcher's folders checked (made
    # by make_launch_folders once the cells are checked, unless it is a dry run)
    if args.workers > MAX_WORKERS or args.threads_per_run > MAX_THREADS:
        most, got = MAX_WORKERS, f"{args.workers} and {args.threads_per_run}"
        fail(f"--workers and --threads-per-run must be at most {most}, got {got}")
    for name, (low, high) in SLURM_BOUNDS.items():
        if not low <= getattr(args, name) <= high:
            fail(f"--{name.replace('_', '-')} must be in [{low}, {high:,}], got {getattr(args, name)}")
    for name in ("scripts", "env_ids", "seeds", "variants"):
        values = getattr(args, name)
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if not values or repeated:
            flag = f"--{name.replace('_', '-')}"
            fail(f"{flag} lists {' '.join(repeated)} twice: each cell once" if repeated else f"{flag} lists nothing")
    size = len(args.scripts) * len(args.env_ids) * len(args.seeds) * len(args.variants)
    if size > MAX_CELLS:
        fail(f"the grid has {size:,} runs (scripts x env ids x seeds x variants), more than {MAX_CELLS:,}")
    if runs.exists() and not runs.is_dir():  # runs/ itself may be a link (to a larger disk), as for the scripts
        fail(f"{runs} is not a directory")
    for parts in launch_folders(args):
        path = runs.joinpath(".launch", *parts)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            fail(f"{path} is {'a link' if path.is_symlink() else 'a file'}, not a folder of the launcher's own")


def launch_folders(args):
    """runs/.launch/ and its folders (as parts of a path below it): the logs, the cells' locks, the runs moved aside,
    submitit's files."""
    return [(), ("locks",), ("incomplete",)] + ([("submitit",)] if args.cluster != "local" else [])


def make_launch_folders(args, runs):
    """runs/.launch/ and its folders, once every cell is checked (check_setup checked what lies there)."""
    for parts in launch_folders(args):
        try:
            launch_folder(runs, *parts)
        except Blocked as e:  # a read-only or full file system
            fail(str(e))


def plan(args, cells, runs, threads, locks):
    """Each cell's state, under its lock (added to `locks`, unless a dry run), and its command printed: (the cells to
    run, the cells blocked by what lies in their folders, each named in a warning)."""
    jobs, blocked = [], []
    counts = {"new": 0, "resume": 0, "finished": 0, "running": 0}
    for cell in cells:
        lock = None
        try:
            lock = cell_lock(runs, cell, create=not args.dry_run)
            state, checkpoint = ("running", None) if lock is None else cell_state(runs, cell, tidy=False)
            if state in ("new", "resume"):
                kind = what_lies_at(log_path(runs, cell))
                if kind:
                    raise Blocked(f"its log {log_path(runs, cell)} is {kind}, not a file of its own; move it away")
        except Blocked as e:
            release(lock)
            warn_blocked(cell, e)
            blocked.append(cell)
            continue
        if args.dry_run:
            release(lock)
        else:
            locks.append(lock)
        counts[state] += 1
        if state == "running":
            where = "in another launch" if lock is None else str(checkpoint)
            print(f"# running {where}: {cell.env_id} {cell.exp_name} seed {cell.seed}")
            continue
        if state == "finished":
            print(f"# finished: {cell.env_id} {cell.exp_name} seed {cell.seed} ({checkpoint.parent.name})")
            continue
        line = f"OMP_NUM_THREADS={threads} " + shlex.join(command(args, cell, checkpoint))
        print(("# resume: " if state == "resume" else "") + line if args.dry_run else f"[{state}] {line}")
        jobs.append(cell)
    print(
        f"# {len(cells)} runs: {counts['new']} new, {counts['resume']} to resume, {counts['finished']} finished"
        + (f", {counts['running']} running elsewhere" if counts["running"] else "")
        + (f", {len(blocked)} skipped (see the warnings)" if blocked else "")
    )
    return jobs, blocked


def fail_if_blocked(blocked, total):
    if blocked:
        fail(
            f"{len(blocked)} of {total} runs were skipped: what lies in their folders keeps them from running "
            "(the warnings above name each file)"
        )


def main(args):
    workdir = Path(args.workdir).resolve()
    runs = workdir / "runs"
    check_setup(args, workdir, runs)
    configs = read_configs() if args.published else {}
    cells = make_grid(args, configs)
    for cell in cells_to_check(cells):
        check_cell_flags(cell)
    if args.published:
        for script, env_id in sorted({(c.script, c.env_id) for c in cells}):
            if published_flags(script, env_id, configs) is None:
                print(f"# no published configuration of {script} for {env_id}: the script's defaults")
    threads = args.threads_per_run or (
        args.slurm_cpus_per_task if args.cluster == "slurm" else max(1, (os.cpu_count() or 1) // args.workers)
    )
    env = run_environment(threads)
    if not args.dry_run:
        make_launch_folders(args, runs)
    jobs, locks, blocked = [], [], []
    try:
        jobs, blocked = plan(args, cells, runs, threads, locks)
        if args.dry_run or not jobs:
            fail_if_blocked(blocked, len(cells))
            return
        if args.cluster == "local":
            pool = LocalPool(args.workers)
            # set, not inherited: a shell starts background jobs with SIGINT ignored
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: pool.stop())
            codes = pool.map([(args, cell, runs, str(workdir), env) for cell in jobs])
        else:
            for lock in locks:  # each job takes its cell's lock itself when it starts
                release(lock)
            locks = []
            codes = submit(args, [(args, cell, runs, str(workdir), env) for cell in jobs], runs)
            if codes is None:
                fail_if_blocked(blocked, len(cells))
                return
    finally:
        for lock in locks:
            release(lock)
    # a run stopped by a signal exits with 128 + the signal's number, after saving its checkpoint
    skipped = sum(code in ("finished", "running") for code in codes)
    stopped = sum(code is None or code in (128 + signal.SIGINT, 128 + signal.SIGTERM) for code in codes)
    blocked += [cell for cell, code in zip(jobs, codes) if code == "blocked"]
    done = (0, None, 130, 143, "finished", "running", "blocked")
    failed = [(cell, code) for cell, code in zip(jobs, codes) if code not in done]
    for cell, code in failed:
        print(
            f"exit {code}: {cell.script} {cell.env_id} seed {cell.seed} (log: {log_path(runs, cell)})", file=sys.stderr
        )
    ran = len(jobs) - len(failed) - stopped - skipped - sum(code == "blocked" for code in codes)
    print(
        f"# done: {ran} ran to the end, {len(failed)} failed, {stopped} stopped"
        + (f", {skipped} done or running elsewhere meanwhile" if skipped else "")
    )
    if failed:
        fail(f"{len(failed)} of {len(jobs)} runs failed: the last lines of their logs say why")
    fail_if_blocked(blocked, len(cells))
    if stopped:
        sys.exit(1)


if __name__ == "__main__":
    args, unknown = tyro.cli(Args, return_unknown_args=True)
    args.extra = list(unknown)
    main(args)
