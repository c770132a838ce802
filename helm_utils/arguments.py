"""The checks every script's arguments get, the name of a new run, and the command line of a resumed run.

A script's own check_args calls check_ppo_args and check_memory_args, then checks its own flags."""

import math
import time
from dataclasses import asdict, replace

import torch
import tyro

from helm_utils import fail
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
FLOAT32_MAX = torch.finfo(torch.float32).max  # the numbers below become float32 tensors or scale them


def flag(name):
    return f"--{name.replace('_', '-')}"


def check_ppo_args(args):
    """One clear line for each PPO or run argument out of range, before anything is built or written."""
    for name in ["total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "nonfinite_limit"]:
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.eval_episodes < 1:
        fail(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {args.seed}")
    for name in ["learning_rate", "clip_coef", "max_grad_norm"]:
        if not 0 < getattr(args, name) < FLOAT32_MAX:
            fail(f"{flag(name)} must be a positive float32 number, got {getattr(args, name)}")
    for name in ["gamma", "gae_lambda"]:
        if not 0 <= getattr(args, name) <= 1:
            fail(f"{flag(name)} must be in [0, 1], got {getattr(args, name)}")
    for name in ["ent_coef", "vf_coef", "checkpoint_every"]:
        if not 0 <= getattr(args, name) < FLOAT32_MAX:
            fail(f"{flag(name)} must be a finite number >= 0, got {getattr(args, name)}")
    if args.target_kl is not None and not 0 < args.target_kl < math.inf:
        fail(f"--target-kl must be positive and finite, got {args.target_kl}")
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
    if "/" in args.exp_name:
        fail(f"--exp-name {args.exp_name!r} must be a plain name, without '/'")
    validate_run_name(new_run_name(args), "the run name of --env-id and --exp-name")


def check_memory_args(args):
    """The frozen memory's arguments, the same in the three scripts."""
    for name in ["mem_len", "n_layer"]:
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ["log_tokens_every", "observation_cache_size"]:
        if not 0 <= getattr(args, name) < FLOAT32_MAX:
            fail(f"{flag(name)} must be a finite number >= 0, got {getattr(args, name)}")


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
