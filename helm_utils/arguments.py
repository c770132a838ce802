"""The checks every script's arguments get, the name of a new run, and the command line of a resumed run.

A script's own check_args calls check_ppo_args and check_memory_args, then checks its own flags."""

import math
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch
import tyro

from helm_utils import fail, frozen_models
from helm_utils.files import validate_run_name

# What --resume takes from the command line when given there; every other argument comes from the checkpoint.
RESUME_OVERRIDES = (
    "cuda",
    "async_envs",
    "track",
    "progress_bar",
    "checkpoint_every",
    "upload_model",
    "hf_entity",
    "eval_episodes",
)
# Arguments a run computes from the others (filled in by runs.parse): never compared, never given.
COMPUTED = ("batch_size", "minibatch_size", "num_iterations")
# Arguments added after checkpoints were first written (format helm-checkpoint/1), with the value that gives a
# checkpoint written before them the run it had: the behaviour of the code before the argument existed (which
# is not always today's default). A checkpoint that lacks another argument is completed only from what it
# records itself (checkpoints.complete_args). Add an argument here when you add it to the scripts.
ADDED_LATER = {
    "ablate_memory": False,  # the memory was never ablated
    "frozen_dtype": "float32",  # the frozen models were float32 (auto now picks bfloat16 where it is fast)
    "observation_cache_size": 0,  # no cache (a speed-up only: the outputs are the same with one)
    "prompts": (),  # SHELM embedded the bare words
}
FLOAT32_MAX = torch.finfo(torch.float32).max  # the numbers below become float32 tensors or scale them
INT64_MAX = 2**63 - 1  # env steps are tensorboard steps (int64)


def flag(name):
    return f"--{name.replace('_', '-')}"


def as_float32(value):
    """The float32 number a Python number becomes in the scripts' tensors: 1e39 becomes inf, 1e-50 becomes 0."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(value))


def check_float32(value, name, positive=False):
    """One line unless `value` is >= 0 (> 0 if positive) and stays finite (and > 0) as float32: checked in the
    precision the number is used in, so that a value that passes cannot turn into inf or 0 in a tensor."""
    try:
        as32 = as_float32(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int beyond float64
        as32 = math.nan
    if not (math.isfinite(as32) and value >= 0 and (as32 > 0 or not positive)):
        fail(f"{name} must be a {'positive' if positive else 'finite, >= 0'} float32 number, got {value}")


def check_ppo_args(args):
    """One clear line for each PPO or run argument out of range, before anything is built or written."""
    for name in ["total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "nonfinite_limit"]:
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.total_timesteps > INT64_MAX:
        fail(f"--total-timesteps must be < 2**63 (a tensorboard step), got {args.total_timesteps}")
    if args.eval_episodes < 1:
        fail(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {args.seed}")
    for name in ["learning_rate", "clip_coef", "max_grad_norm"]:
        check_float32(getattr(args, name), flag(name), positive=True)
    for name in ["gamma", "gae_lambda"]:
        if not 0 <= getattr(args, name) <= 1:
            fail(f"{flag(name)} must be in [0, 1], got {getattr(args, name)}")
    for name in ["ent_coef", "vf_coef"]:
        check_float32(getattr(args, name), flag(name))
    if not 0 <= args.checkpoint_every <= INT64_MAX:
        fail(f"--checkpoint-every must be >= 0 and < 2**63, got {args.checkpoint_every}")
    if args.target_kl is not None:
        check_float32(args.target_kl, "--target-kl", positive=True)
    batch = args.num_envs * args.num_steps
    if batch < args.num_minibatches:
        fail(f"--num-minibatches ({args.num_minibatches}) exceeds the batch size num_envs * num_steps ({batch})")
    if args.total_timesteps < batch:
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one rollout, num_envs * num_steps ({batch})")
    minibatch = batch // args.num_minibatches
    smallest = min(minibatch, batch % minibatch or minibatch)  # the last minibatch takes what is left
    if args.norm_adv and smallest < 2:
        fail(
            f"--num-minibatches {args.num_minibatches} cuts the batch of {batch} into minibatches of as few as 1 "
            f"sample, whose advantages cannot be normalized: choose one that leaves >= 2 per minibatch"
        )
    if not args.env_id:
        fail("--env-id must name an environment, got ''")
    if "/" in args.exp_name:
        fail(f"--exp-name {args.exp_name!r} must be a plain name, without '/'")
    validate_run_name(new_run_name(args), "the run name of --env-id and --exp-name")
    if not hasattr(args, "mem_len"):  # the memory scripts' check_memory_args checks the sizes with their memory
        check_fits(args)


def check_memory_args(args):
    """The frozen memory's arguments, the same in the three scripts; then whether the run's tensors fit."""
    for name in ["mem_len", "n_layer"]:
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ["log_tokens_every", "observation_cache_size"]:
        if not 0 <= getattr(args, name) <= INT64_MAX:
            fail(f"{flag(name)} must be >= 0 and < 2**63, got {getattr(args, name)}")
    check_fits(args)


# ---------------------------------------------------------------------------------------------
# What a run allocates, estimated from its arguments before anything is built
# ---------------------------------------------------------------------------------------------

ENV_BYTES = 16 * 1024  # an environment (MiniGrid's is ~45 KB of Python objects): a lower bound
CACHE_ENTRY_BYTES = 200  # an observation cache entry (key, dict slot, tensor objects) besides its numbers
MIN_OBS_BYTES = 8 * 8 * 3  # the smallest observation the agents take (env_suites.check_spaces)


def trxl_config(args):
    """The Transformer-XL's config when it is known without reading a file, else the wt103 model's (the one
    these scripts are made for; a local model of other sizes is bounded by frozen_models.MAX_TRXL_PARAMETERS)."""
    tiny = getattr(args, "trxl_model", None) == frozen_models.TINY
    return frozen_models.TINY_TRXL_CONFIG if tiny else frozen_models.WT103_CONFIG


def estimate(args):
    """[(bytes, what, flags)] of the largest things a run allocates, as lower bounds from its arguments: the rollout
    buffers, the environments, the agent's widest layers (trained: with gradients and AdamW's two moments), and for
    the memory scripts the Transformer-XL's memories (keys and values of each layer's last --mem-len steps, in
    bfloat16 at least, twice while a step writes them), one layer's attention scores and the observation cache when
    full. The real run needs more (models, activations); what is counted here cannot be less. Arguments a script
    lacks (the baselines have no Transformer-XL, the memory scripts no --d-model) count nothing."""
    config = trxl_config(args)
    width = getattr(args, "d_model", config["d_model"])  # the CNN's output: the Transformer-XL's width, or a flag
    hidden = getattr(args, "lstm_hidden_size", 0) if getattr(args, "lstm", False) else 0
    parts = [
        (
            args.num_steps * args.num_envs * (MIN_OBS_BYTES + 4 * width + 8 * 5),
            "the rollout buffers",
            ["num_steps", "num_envs"],
        ),
        (args.num_envs * ENV_BYTES, "the environments", ["num_envs"]),
        (4 * 4 * (128 * width + 4 * hidden * (width + hidden)), "the agent's weights", ["d_model", "lstm_hidden_size"]),
    ]
    if hasattr(args, "mem_len"):
        tokens = getattr(args, "topk", 1)  # tokens per step: SHELM's retrieved words, one for HELM and HELMv2
        mem_width = 2 * config["n_head"] * config["d_head"]
        memories = 2 * args.n_layer * args.mem_len * args.num_envs * mem_width * 2
        attention = 3 * tokens * (args.mem_len + tokens) * args.num_envs * config["n_head"] * 4
        cache = args.observation_cache_size * (CACHE_ENTRY_BYTES + 4 * tokens)
        parts += [
            (memories, "the Transformer-XL memories", ["mem_len", "num_envs", "n_layer"]),
            (attention, "the attention scores of a step", ["mem_len", "num_envs"]),
            (cache, "the observation cache when full", ["observation_cache_size"]),
        ]
    return parts


def memory_limit():
    """Bytes of memory this process may use: the machine's RAM, or less under a cgroup limit."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        cgroup = open("/sys/fs/cgroup/memory.max").read().strip()  # noqa: SIM115 - one read
        if cgroup.isdigit():
            limit = min(limit, int(cgroup))
    except OSError:
        pass
    return limit


def size(nbytes):
    for unit in ["bytes", "KB", "MB", "GB", "TB", "PB"]:
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def check_fits(args):
    """One line naming the flags, when what the run will allocate (estimate) cannot fit in this machine's memory,
    before anything is built: a size from a typo or a checkpoint ends here, not in a traceback or a swapping machine.
    On CUDA the tensors must fit the GPU as well; the environments always live in RAM."""
    parts = estimate(args)
    limits = {"memory": memory_limit()}
    if getattr(args, "cuda", False) and torch.cuda.is_available():
        limits["GPU memory"] = torch.cuda.get_device_properties(0).total_memory
    for where, limit in limits.items():
        counted = [p for p in parts if where == "memory" or p[1] != "the environments"]
        total = sum(nbytes for nbytes, _, _ in counted)
        if total > limit:
            nbytes, what, names = max(counted, key=lambda p: p[0])
            given = ", ".join(f"{flag(name)} {getattr(args, name)}" for name in names if hasattr(args, name))
            fail(
                f"{given}: {what} alone take at least {size(nbytes)}, the run at least {size(total)}, more than "
                f"the {size(limit)} of {where} here; choose smaller values"
            )


def new_run_name(args):
    return f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"


def resume_args(Args, ckpt, path, output_dirs=()):
    """The checkpoint's arguments with the flags given on this command line: tyro parses it again with the
    checkpoint's values as defaults. Flags outside RESUME_OVERRIDES and output_dirs (arguments naming a
    directory the script writes to) may only repeat the checkpoint's value."""
    try:
        saved = Args(**ckpt["args"])
    except TypeError as e:
        fail(f"checkpoint {path} was written with other arguments than this script has ({e})")
    args = tyro.cli(Args, default=replace(saved, resume=path))
    changed = [name for name, value in asdict(saved).items() if getattr(args, name) != value]
    fixed = [flag(name) for name in changed if name not in (*RESUME_OVERRIDES, *output_dirs, "resume")]
    if fixed:
        allowed = ", ".join(flag(name) for name in (*RESUME_OVERRIDES, *output_dirs))
        fail(f"{' '.join(fixed)}: a resumed run keeps its checkpoint's arguments; only {allowed} can be given")
    return args
