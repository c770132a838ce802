"""Throughput of the whole training loop of each script, as ratios to a CNN-PPO loop measured in the same run.

    python benchmark/throughput.py --label after            # all scripts, --n-layer 2 and 18, CPU
    python benchmark/throughput.py --scripts shelm_ppo.py --n-layers 2 --repeats 1
    python benchmark/throughput.py --cuda --repeats 1 --out gpu.json --docs ""   # on a GPU, docs untouched
    python benchmark/throughput.py --scripts lstm_ppo.py --docs ""              # LSTM-PPO beside CNN-PPO

What runs: the scripts themselves, each in its own process, with the real-size architectures and random
weights built offline (`--trxl-model random-wt103`: transfo-xl-wt103's shapes; `--clip-pretrained
random`: ViT-B-16 for SHELM, RN50 for HELMv2), on MiniGrid-MemoryS11-v0 with 16 envs. The scripts time
their own loop (perf/* scalars in their tensorboard logs: env stepping, frozen encoder, Transformer-XL,
agent, update); this reads those logs, so what is measured is the scripts' loop, not a copy of it.
The first --warmup-updates updates are left out (SHELM's token cache fills there).

Baselines, in the same run and the same way (own process, same envs, same steps):
- env: the 16 envs stepped with random actions, nothing else;
- cnn-ppo: the papers' memoryless CNN-PPO baseline, benchmark/baselines/lstm_ppo.py --no-lstm: the scripts'
  CNN (as wide as the wt103 Transformer-XL, 1024), actor, critic and PPO loop, without memory; it times its
  own loop the same way.
`--scripts lstm_ppo.py` measures the LSTM-PPO baseline as one more variant (`lstm-ppo`: the same CNN, then its
LSTM of 256), as the launcher names it; `--n-layers` does not apply to it.

The machine is shared and noisy: the variants are interleaved (each repeat runs every variant once, in
a rotated order) and each is reported as the median over repeats, ratios as ratios of medians. Peak
resident memory of each process comes from the kernel (wait4). Results: docs/results/throughput.json
(one entry per --label, e.g. before/after a change) and the table in docs/benchmarks.md, replaced together once
both are made (helm_utils.files.replace_together).

Before anything runs, one `error:` line for: a count out of its bounds, a script or --n-layers value that is not
one, flags in --extra that this tool sets itself, a command line a script would refuse (each variant's, parsed by
its script's Args and check_args: its sizes against this machine's memory included), an env that cannot be made,
an --out that cannot be written or that holds something other than throughput results (its structure is checked:
the earlier labels are kept), a --docs without the table's markers.
"""

import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helm_utils import fail  # noqa: E402
from helm_utils.files import output_file, read_json, replace_together  # noqa: E402

SCRIPTS = ["shelm_ppo.py", "helmv2_ppo.py", "helm_ppo.py", "lstm_ppo.py"]  # lstm_ppo.py: the LSTM-PPO baseline
PHASES = ["env", "encoder", "trxl", "agent", "rollout_other", "update", "logging"]
MINIBATCH = 256  # the scripts' default minibatch: 16 envs x 128 steps / 8 minibatches
DOCS_BEGIN, DOCS_END = "<!-- throughput:begin -->", "<!-- throughput:end -->"
MAX_REPEATS = 100  # --repeats: each runs every variant once more
MAX_UPDATES = 10_000  # --warmup-updates, --measured-updates: per run of a variant
MAX_THREADS = 1024
# flags every measured loop gets from this tool (loop_flags, script_command): --extra may not give them
TOOL_SETS = (
    "env_id", "num_envs", "num_steps", "num_minibatches", "progress_bar", "checkpoint_every", "total_timesteps",
    "cuda", "async_envs", "trxl_model", "n_layer", "clip_model", "clip_pretrained", "embeddings_dir",
)  # fmt: skip


@dataclass
class Args:
    label: str = "current"
    """name of this measurement in throughput.json (e.g. before, after)"""
    scripts: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """scripts to measure (lstm_ppo.py: the LSTM-PPO baseline)"""
    n_layers: list[int] = field(default_factory=lambda: [2, 18])
    """--n-layer values to measure"""
    env_id: str = "MiniGrid-MemoryS11-v0"
    num_envs: int = 16
    num_steps: int = 32
    """steps per env per update (the update's minibatches stay 256 samples, as the scripts' defaults)"""
    num_minibatches: int | None = None
    """minibatches per epoch for every loop (default: of 256 samples each; LSTM-PPO's must divide --num-envs)"""
    warmup_updates: int = 2
    """updates left out of the measurement"""
    measured_updates: int = 2
    """updates measured after the warm-up"""
    repeats: int = 2
    """runs of every variant, interleaved"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS): 1 keeps runs comparable on a shared machine"""
    cuda: bool = False
    """run on the GPU (the scripts report their peak CUDA memory, cuda_max_memory_gb; without it they ran on the CPU)"""
    tiny: bool = False
    """the tiny random models instead of the real-size ones: a dry run of the machinery that measures nothing"""
    extra: str = ""
    """further arguments for every script, e.g. "--frozen-dtype float32" """
    async_envs: bool = False
    """every training loop steps its envs in worker processes (--async-envs): for machines with many cores"""
    out: str = str(ROOT / "docs" / "results" / "throughput.json")
    docs: str = str(ROOT / "docs" / "benchmarks.md")
    """markdown file whose throughput section gets the table ("": print the table only)"""
    report: bool = False
    """measure nothing: rewrite the docs table from throughput.json"""
    baseline: str | None = None
    """internal: run the env baseline in this process and print its phase times"""


def steps_per_update(args):
    return args.num_envs * args.num_steps


def loop_flags(args):
    """What every measured training loop runs: the same envs, steps, minibatches and updates."""
    batch = steps_per_update(args)
    cmd = ["--env-id", args.env_id, "--num-envs", str(args.num_envs), "--num-steps", str(args.num_steps)]
    minibatches = args.num_minibatches or max(1, batch // MINIBATCH)
    cmd += ["--num-minibatches", str(minibatches), "--no-progress-bar", "--checkpoint-every", "0"]
    cmd += ["--total-timesteps", str(batch * (args.warmup_updates + args.measured_updates))]
    return cmd + ["--cuda" if args.cuda else "--no-cuda"] + (["--async-envs"] if args.async_envs else [])


def baseline_command(args, lstm=False):
    """The CNN-PPO baseline, or LSTM-PPO (its LSTM of 256, the default), as wide as the memory scripts' CNN with
    transfo-xl-wt103 (d_model 1024)."""
    cmd = [sys.executable, str(ROOT / "benchmark" / "baselines" / "lstm_ppo.py"), "--lstm" if lstm else "--no-lstm"]
    return cmd + ["--d-model", "1024"] + loop_flags(args)


def script_command(args, script, n_layer, data_dir):
    trxl = "tiny-random" if args.tiny else "random-wt103"
    cmd = [sys.executable, str(ROOT / script), "--trxl-model", trxl, "--n-layer", str(n_layer)]
    cmd += loop_flags(args)
    if script in ("shelm_ppo.py", "helmv2_ppo.py"):
        cmd += ["--clip-model", "tiny-random"] if args.tiny else ["--clip-pretrained", "random"]
    if script == "shelm_ppo.py":
        cmd += ["--embeddings-dir", str(data_dir)]
    return cmd + shlex.split(args.extra)


def run_process(cmd, cwd, threads):
    """(stdout, peak resident memory in GB) of a command run to its end; exits on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    with open(Path(cwd) / "stdout.txt", "w+") as out, open(Path(cwd) / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return stdout, usage.ru_maxrss / 2**20  # KB on Linux


def read_perf(run_dir):
    """{tag: [values per update]} of a run's perf/* and charts/* scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith(("perf/", "charts/"))}


def summarise(phases_per_update, cpu_per_update, args, extra=None):
    """Per-run numbers from the phase times and the CPU time (seconds) of each update; the warm-up
    updates are left out. cpu_sps: steps per second of the process's CPU time, which other processes
    on a shared machine do not inflate as they do wall time (with one thread: SPS on a core of its own)."""
    measured = {k: sum(v[args.warmup_updates :]) for k, v in phases_per_update.items()}
    steps = steps_per_update(args) * args.measured_updates
    total = sum(measured.values())
    rollout = sum(measured.get(k, 0.0) for k in ("env", "encoder", "trxl", "agent", "rollout_other"))
    result = {"sps": steps / total, "rollout_sps": steps / rollout if rollout else None}
    result["cpu_sps"] = steps / sum(cpu_per_update[args.warmup_updates :])
    result |= {f"{k}_ms_per_step": 1000 * v / (steps / args.num_envs) for k, v in measured.items()}
    return result | (extra or {})


def run_script(args, cmd):
    """A training loop's numbers, from the timers it logged (a phase it does not have is left out)."""
    with tempfile.TemporaryDirectory(prefix="throughput-") as cwd:
        _, rss = run_process(cmd, cwd, args.threads)
        (run_dir,) = (Path(cwd) / "runs").iterdir()
        perf = read_perf(run_dir)
    phases = {p: perf[f"perf/{p}_s"] for p in PHASES if f"perf/{p}_s" in perf}
    extra = {"peak_rss_gb": rss}
    if "perf/cuda_max_memory_gb" in perf:
        extra["cuda_max_memory_gb"] = max(perf["perf/cuda_max_memory_gb"])
    for tag in ("charts/token_cache_hit_rate", "charts/observation_cache_hit_rate"):
        if tag in perf:
            extra["cache_hit_rate_measured"] = statistics.mean(perf[tag][args.warmup_updates :])
    return summarise(phases, perf["perf/cpu_s"], args, extra)


def run_baseline(args, name):
    with tempfile.TemporaryDirectory(prefix="throughput-") as cwd:
        cmd = [sys.executable, __file__, "--baseline", name, "--env-id", args.env_id]
        cmd += ["--num-envs", str(args.num_envs), "--num-steps", str(args.num_steps)]
        cmd += ["--warmup-updates", str(args.warmup_updates), "--measured-updates", str(args.measured_updates)]
        cmd += ["--cuda" if args.cuda else "--no-cuda"]
        stdout, rss = run_process(cmd, cwd, args.threads)
    phases = json.loads(stdout.strip().splitlines()[-1])
    return summarise(phases, phases.pop("cpu"), args, {"peak_rss_gb": rss})


# ---------------------------------------------------------------------------------------------
# The env baseline, run in its own process (--baseline env)
# ---------------------------------------------------------------------------------------------


def baseline_env(args):
    import numpy as np

    import shelm_ppo as S

    envs, _ = S.make_envs(S.Args(env_id=args.env_id, num_envs=args.num_envs), "throughput")
    envs.action_space.seed(1)
    envs.reset(seed=1)
    phases = {"env": [], "cpu": []}
    for _ in range(args.warmup_updates + args.measured_updates):
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.num_steps):
            envs.step(np.asarray(envs.action_space.sample()))
        phases["env"].append(time.perf_counter() - t)
        phases["cpu"].append(time.process_time() - cpu)
    return phases


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def markdown(results):
    """The docs table: one row per variant of each labelled measurement."""
    lines = []
    for label, res in results["runs"].items():
        lines += [
            "",
            f"**{label}** ({res['date']}, load average before/after {res['load_before']} / {res['load_after']}, "
            f"{res['threads']} thread(s), {res['repeats']} repeat(s), `{res['command']}`):",
            "",
            "| variant | SPS | ratio to CNN-PPO | SPS of CPU time | its ratio | env | encoder | Transformer-XL | "
            "agent | update | peak RSS | cache hit rate |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, v in res["variants"].items():
            ms = [v.get(f"{p}_ms_per_step") for p in ("env", "encoder", "trxl", "agent", "update")]
            cells = ["" if x is None else f"{x:.1f}" for x in ms]
            hit = v.get("cache_hit_rate_measured")
            cpu = f"{v['cpu_sps']:.0f} | {v['cpu_ratio_to_cnn_ppo']:.2f}" if "cpu_sps" in v else "not measured | "
            lines.append(
                f"| {name} | {v['sps']:.0f} | {v['ratio_to_cnn_ppo']:.2f} | {cpu} | {' | '.join(cells)} | "
                f"{v['peak_rss_gb']:.2f} GB | {'' if hit is None else f'{hit:.3f}'} |"
            )
    lines += [
        "",
        "SPS: steps per second of wall time; SPS of CPU time: steps per second of the process's CPU time"
        " (one thread: SPS on a core of its own, which other jobs on the machine do not inflate). Phase"
        " columns: milliseconds of wall time per step of all envs (16 env steps), the update's share"
        " included. Every column is the median over repeats; ratios are ratios of those medians.",
    ]
    return "\n".join(lines) + "\n"


def results_schema():
    """The structure of throughput.json as markdown (and benchmark/gpu_check.py) read it; other keys (notes) are
    kept as they are."""
    from typing import Annotated, NotRequired

    from pydantic import Field
    from typing_extensions import TypedDict

    number = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    text = Annotated[str, Field(max_length=10_000)]
    phases = {f"{p}_ms_per_step": NotRequired[number] for p in PHASES}
    variant = TypedDict(
        "Variant",
        {
            "sps": number,
            "ratio_to_cnn_ppo": number,
            "peak_rss_gb": number,
            "rollout_sps": NotRequired[number | None],
            "cpu_sps": NotRequired[number],
            "cpu_ratio_to_cnn_ppo": NotRequired[number],
            "cuda_max_memory_gb": NotRequired[number],
            "cache_hit_rate_measured": NotRequired[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]],
        }
        | phases,
    )

    class Run(TypedDict):
        date: text
        command: text
        device: text
        cpus: Annotated[int, Field(ge=1)] | None
        threads: Annotated[int, Field(ge=1)]
        repeats: Annotated[int, Field(ge=1)]
        load_before: list[number] | None
        load_after: list[number] | None
        steps_measured: Annotated[int, Field(ge=1)]
        warmup_steps: Annotated[int, Field(ge=0)]
        variants: Annotated[dict[Annotated[str, Field(max_length=200)], variant], Field(min_length=1, max_length=100)]
        all_runs: dict[str, list[dict[str, number | None]]]

    class Results(TypedDict):
        runs: Annotated[dict[Annotated[str, Field(max_length=200)], Run], Field(max_length=1000)]
        ratio_to_cnn_ppo: NotRequired[dict[str, number]]
        cpu_ratio_to_cnn_ppo: NotRequired[dict[str, number]]
        ratio_to_cnn_ppo_label: NotRequired[text]

    return Results


def read_results(path):
    """throughput.json's content, its structure checked (one line otherwise), as written: notes and all."""
    _, data = read_json(path, results_schema(), "--out")
    return json.loads(data)


def docs_with_table(path, table):
    """The markdown file `path` with its throughput section replaced by `table`; one line if it has none."""
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        fail(f'--docs {path} has no {DOCS_BEGIN} ... {DOCS_END} section; give --docs "" to print the table only')
    head, rest = text.split(DOCS_BEGIN, 1)
    return head + DOCS_BEGIN + "\n" + table + DOCS_END + rest.split(DOCS_END, 1)[1]


def check_docs(args):
    """--docs: "" (print the table), or a markdown file with the table's section, checked before any work."""
    if not args.docs:
        return None
    path = output_file(args.docs, "--docs")
    if not path.is_file():
        fail(f'--docs {args.docs} does not exist; give --docs "" to print the table only')
    try:
        docs_with_table(path, "")
    except OSError as e:
        fail(f"--docs {args.docs} cannot be read: {e.strerror or e}")
    return path


def check_counts(args):
    """The loop's counts, each bounded (also those of the env baseline's own process)."""
    for name in ("num_envs", "num_steps", "measured_updates"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_updates <= MAX_UPDATES or args.measured_updates > MAX_UPDATES:
        fail(f"--warmup-updates and --measured-updates must be at most {MAX_UPDATES} (warm-up >= 0)")
    if not 1 <= args.repeats <= MAX_REPEATS:
        fail(f"--repeats must be in [1, {MAX_REPEATS}], got {args.repeats}")
    if not 1 <= args.threads <= MAX_THREADS:
        fail(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")


def check_args(args):
    """Everything a measurement takes, before it starts: the counts, the scripts, --extra, every variant's command
    line through its script's own Args and check_args (sizes included), the env, --out and --docs."""
    from helm_utils import arguments, frozen_models

    check_counts(args)
    if not args.label or len(args.label) > 200 or not args.label.isprintable():
        fail(f"--label must be a printable name of 1 to 200 characters, got {args.label!r}")
    if not args.scripts or len(set(args.scripts)) != len(args.scripts) or not set(args.scripts) <= set(SCRIPTS):
        fail(f"--scripts: give one or more of {', '.join(SCRIPTS)}, each once, got {' '.join(args.scripts) or 'none'}")
    layers = frozen_models.WT103_CONFIG["n_layer"]
    if (
        not args.n_layers
        or len(set(args.n_layers)) != len(args.n_layers)
        or not all(1 <= n <= layers for n in args.n_layers)
    ):
        fail(f"--n-layers: distinct values in [1, {layers}], got {' '.join(map(str, args.n_layers)) or 'none'}")
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        fail(f"--extra {args.extra!r}: {e}")
    arguments.refuse_flags(extra, TOOL_SETS, "--extra", "throughput.py sets it for every measured loop")
    sys.path.insert(0, str(ROOT / "benchmark" / "baselines"))
    data_dir = str(Path(tempfile.gettempdir()) / "throughput-data")
    commands = {"cnn-ppo": ("lstm_ppo", baseline_command(args, lstm=False))}
    if "lstm_ppo.py" in args.scripts:
        commands["lstm-ppo"] = ("lstm_ppo", baseline_command(args, lstm=True))
    for script in [s for s in args.scripts if s != "lstm_ppo.py"]:
        for n in args.n_layers:
            commands[f"{script} --n-layer {n}"] = (
                script.removesuffix(".py"),
                script_command(args, script, n, data_dir),
            )
    for variant, (name, cmd) in commands.items():
        module = importlib.import_module(name)
        arguments.script_args(module, cmd[2:], f"variant {variant}")
    importlib.import_module("shelm_ppo").make_env(args.env_id, 0, False, "throughput")().close()
    out = output_file(args.out, "--out")
    return out, read_results(out) if out.exists() else {"runs": {}}, check_docs(args)


def main(args):
    if args.baseline is not None:
        if args.baseline != "env":
            fail(f"--baseline is internal: env, got {args.baseline!r}")
        check_counts(args)
        phases = baseline_env(args)
        print(json.dumps(phases))
        return
    if args.report:
        results = read_results(output_file(args.out, "--out"))
        docs = check_docs(args)
        table = markdown(results)
        if docs is None:
            print(table)
        else:
            text = docs_with_table(docs, table).encode()
            replace_together({docs: lambda f: f.write(text)})
        return
    out, results, docs = check_args(args)
    memory_scripts = [s for s in args.scripts if s != "lstm_ppo.py"]
    variants = ["env", "cnn-ppo"] + (["lstm-ppo"] if "lstm_ppo.py" in args.scripts else [])
    variants += [f"{s} --n-layer {n}" for s in memory_scripts for n in args.n_layers]
    runs = {v: [] for v in variants}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="throughput-data-") as data_dir:  # SHELM's embeddings, built once
        for repeat in range(args.repeats):
            order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
            for i, v in enumerate(order):
                t = time.time()
                print(f"repeat {repeat + 1} of {args.repeats}, {i + 1} of {len(order)}: {v} ...", flush=True)
                if v == "env":
                    r = run_baseline(args, v)
                elif v in ("cnn-ppo", "lstm-ppo"):
                    r = run_script(args, baseline_command(args, lstm=v == "lstm-ppo"))
                else:
                    script, n_layer = v.split(" --n-layer ")
                    r = run_script(args, script_command(args, script, int(n_layer), data_dir))
                runs[v].append(r)
                print(f"repeat {repeat} {v}: {r['sps']:.1f} SPS ({time.time() - t:.0f} s, load {load_average()})")
    median = {}
    for v, rs in runs.items():
        median[v] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if rs[0][k] is not None}
    for v in variants:
        median[v]["ratio_to_cnn_ppo"] = median[v]["sps"] / median["cnn-ppo"]["sps"]
        median[v]["cpu_ratio_to_cnn_ppo"] = median[v]["cpu_sps"] / median["cnn-ppo"]["cpu_sps"]
    results["runs"][args.label] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmark/throughput.py " + shlex.join(sys.argv[1:]),
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": load_average(),
        "steps_measured": steps_per_update(args) * args.measured_updates,
        "warmup_steps": steps_per_update(args) * args.warmup_updates,
        "variants": median,
        "all_runs": runs,
    }
    if memory_scripts:  # the headline figures are the memory scripts' (a baselines-only run leaves them)
        for key in ("ratio_to_cnn_ppo", "cpu_ratio_to_cnn_ppo"):
            results[key] = {s: median[f"{s} --n-layer 2"][key] for s in memory_scripts if f"{s} --n-layer 2" in median}
        results["ratio_to_cnn_ppo_label"] = args.label
    data = (json.dumps(results, indent=1, allow_nan=False) + "\n").encode()  # strict JSON, before any write
    table = markdown(results)
    writes = {out: lambda f: f.write(data)}
    print(table)
    if docs is not None:
        text = docs_with_table(docs, table).encode()
        writes[docs] = lambda f: f.write(text)
    replace_together(writes)  # the results and their table, replaced together


if __name__ == "__main__":
    main(tyro.cli(Args))
