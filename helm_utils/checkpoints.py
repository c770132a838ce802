"""Checkpoints: a run's whole state in one file of tensors and plain data, written atomically, read back with
torch.load(weights_only=True) (no code runs), validated before anything is built or written, and restored in
one call. The format is the same for the three scripts; docs/reliability.md describes it and its trust model.

`script` below is a training script's module (or anything with its names): its ALGORITHM, Args and check_args.
"""

import dataclasses
import io
import math
import random
import re
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from helm_utils import fail
from helm_utils.files import validate_run_name, validate_tensors, write_atomically

FORMAT = "helm-checkpoint/1"

# what every checkpoint holds, and of which type (bool is an int to Python, never to a checkpoint)
KEYS = {
    "args": dict,
    "meta": dict,
    "run_name": str,
    "wandb_id": (str, type(None)),
    "agent": dict,
    "optimizer": dict,
    "encoder": dict,
    "iteration": int,
    "global_step": int,
    "best_return": (int, float),
    "recent_returns": list,
    "reward_rms": (list, tuple),
    "rng": dict,
}


def save(path, state):
    # serialized in memory, written by Python: torch.save reports a full disk as RuntimeError, not OSError
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, lambda f: f.write(buffer.getbuffer()))


def read(path):
    """A checkpoint of any of the scripts, read once and not yet checked (enjoy.py then checks it with the
    script that wrote it)."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a torch file at all
        fail(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} is not a checkpoint of these scripts")
    return ckpt


def load(path, script):
    """A checkpoint of `script`, read and checked."""
    return check(read(path), path, script)


def is_number(value, low=-sys.float_info.max, high=sys.float_info.max):
    """A real number (no bool) in [low, high]; by default any finite one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def check(ckpt, path, script):
    """Everything --resume and enjoy.py take from a checkpoint, checked for structure, types, ranges,
    finiteness and consistency before anything is built or written (docs/reliability.md, trust model)."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} is not a checkpoint of these scripts")
    if ckpt.get("algorithm") != script.ALGORITHM:
        fail(f"checkpoint {path} is of {ckpt.get('algorithm')}_ppo.py, not {script.ALGORITHM}_ppo.py")
    for key, kind in KEYS.items():
        if key not in ckpt or not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            found = type(ckpt[key]).__name__ if key in ckpt else "missing"
            fail(f"checkpoint {path} is malformed: {key} is {found}")
    args = checkpoint_args(ckpt["args"], path, script)
    validate_run_name(ckpt["run_name"], f"checkpoint {path}: run_name")
    if ckpt["wandb_id"] is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ckpt["wandb_id"]):
        fail(f"checkpoint {path}: wandb_id {ckpt['wandb_id']!r} is not a wandb run id")
    validate_tensors(ckpt["agent"], f"checkpoint {path}: the agent's weights")
    validate_tensors(ckpt["encoder"], f"checkpoint {path}: the encoder state")
    state, groups = ckpt["optimizer"].get("state"), ckpt["optimizer"].get("param_groups")
    if not (isinstance(state, dict) and isinstance(groups, list) and groups):
        fail(f"checkpoint {path}: the optimizer state is malformed")
    for group in groups:
        if not isinstance(group, dict) or not is_number(group.get("lr"), 0, torch.finfo(torch.float32).max):
            fail(f"checkpoint {path}: the optimizer's learning rate is missing or not a finite number >= 0")
    for i, tensors in state.items():
        validate_tensors(tensors, f"checkpoint {path}: the optimizer state of parameter {i}")
    batch, iteration = args.num_envs * args.num_steps, ckpt["iteration"]
    if not 0 <= iteration <= args.total_timesteps // batch or ckpt["global_step"] != iteration * batch:
        fail(
            f"checkpoint {path}: inconsistent counters (update {iteration}, step {ckpt['global_step']}; "
            f"{args.total_timesteps // batch} updates of {batch} steps)"
        )
    returns, rms = ckpt["recent_returns"], ckpt["reward_rms"]
    if len(returns) > 100 or not all(is_number(r) for r in returns) or not is_number(ckpt["best_return"], -math.inf):
        fail(f"checkpoint {path}: recent_returns or best_return are not finite numbers")
    if len(rms) != 3 or not all(is_number(x) for x in rms) or rms[1] < 0 or rms[2] <= 0:
        fail(f"checkpoint {path}: reward_rms is not (mean, variance >= 0, count > 0)")
    rng = ckpt["rng"]
    if set(rng) != {"torch", "cuda", "numpy", "python"} or not isinstance(rng["torch"], torch.Tensor):
        fail(f"checkpoint {path}: the RNG states are malformed")
    return ckpt


def may_write_output_dirs(args, saved, output_dirs):
    """A checkpoint from elsewhere cannot choose where files are written: the directories its arguments (`saved`)
    name for writing (output_dirs) are written to only if they lie under the working directory, or if the
    command line chose another one; otherwise they are only read (SHELM: a missing embeddings file is an error)."""
    paths = [Path(getattr(args, name)) for name in output_dirs]
    inside = [not path.is_absolute() and ".." not in path.parts for path in paths]
    return all(ok or getattr(args, name) != saved.get(name) for ok, name in zip(inside, output_dirs))


def value_fits(value, annotation):
    """Whether a value from a checkpoint has the type its Args field declares (an int is a float, a bool no int)."""
    origin, inner = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in inner)
    if origin in (types.UnionType, typing.Union):
        return any(value_fits(value, a) for a in inner)
    if origin in (tuple, list):  # tuple[str, ...]: any length, each item of the first type
        return isinstance(value, (tuple, list)) and all(value_fits(v, inner[0]) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


def checkpoint_args(saved, path, script):
    """The Args of a checkpoint, each of its declared type and within range."""
    fields = {field.name: field.type for field in dataclasses.fields(script.Args)}
    unknown = [str(name) for name in saved if name not in fields]
    if unknown:
        fail(f"checkpoint {path} was written with other arguments than this script has: {', '.join(unknown)}")
    for name, value in saved.items():
        if not value_fits(value, fields[name]):
            fail(f"checkpoint {path}: argument {name} is {repr(value)[:60]}, not {fields[name]}")
    args = script.Args(**saved)
    try:
        script.check_args(args)
    except SystemExit as e:
        fail(f"checkpoint {path} holds an argument out of range: {str(e.code).removeprefix('error: ')}")
    return args


# ---------------------------------------------------------------------------------------------
# A run's state: what a checkpoint holds besides the arguments, taken and restored
# ---------------------------------------------------------------------------------------------


def training_state(iteration, global_step, best_return, recent_returns, reward_norm, encoder):
    """What a checkpoint holds besides arguments and weights, taken when update `iteration` has finished."""
    rms = reward_norm.return_rms
    return {
        "iteration": iteration,
        "global_step": global_step,
        "best_return": best_return,
        "recent_returns": [float(r) for r in recent_returns],
        "rng": rng_state(),
        "reward_rms": (float(np.asarray(rms.mean)), float(np.asarray(rms.var)), float(rms.count)),
        "encoder": encoder.encoder_state(),  # HELMv2's running statistics change during the rollout
    }


def load_trained(agent, encoder, ckpt, path):
    """The trained weights and the frozen encoder's state (HELM's projection, HELMv2's statistics)."""
    try:
        agent.load_state_dict(ckpt["agent"])
        encoder.load_encoder_state(ckpt["encoder"])
    except (RuntimeError, KeyError, ValueError) as e:
        fail(f"checkpoint {path} does not match this model ({' '.join(str(e).split())[:200]})")


def restore(ckpt, path, agent, optimizer, encoder, reward_norm):
    """Everything a checked checkpoint holds, back in place: weights, the encoder's state, the optimizer, the
    reward normalisation and the RNG states. Returns (iteration, global_step, best_return, recent_returns)."""
    load_trained(agent, encoder, ckpt, path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"checkpoint {path}: the optimizer state does not match this model ({e})")
    rms = reward_norm.return_rms
    rms.mean, rms.var, rms.count = ckpt["reward_rms"]
    try:
        set_rng_state(ckpt["rng"])
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        fail(f"checkpoint {path}: the RNG states are malformed ({' '.join(str(e).split())[:200]})")
    return ckpt["iteration"], ckpt["global_step"], float(ckpt["best_return"]), list(ckpt["recent_returns"])


def rng_state():
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
