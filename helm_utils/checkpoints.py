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

from helm_utils import InputError, env_suites, fail
from helm_utils.arguments import ADDED_LATER, COMPUTED, RESUME_OVERRIDES, flag
from helm_utils.files import validate_run_name, validate_tensors, write_atomically

FORMAT = "helm-checkpoint/1"
FLOAT32 = torch.finfo(torch.float32)

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
    """Write a checkpoint atomically. The run checks it first (refusal): it never writes what --resume refuses."""
    # serialized in memory, written by Python: torch.save reports a full disk as RuntimeError, not OSError
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, lambda f: f.write(buffer.getbuffer()))


def refusal(ckpt, path, script, env_id=None):
    """What --resume would say of this checkpoint (its `error:` line without the prefix), or None if it takes it.
    A run asks before writing any checkpoint, so that it never replaces a good file with one that --resume refuses
    (non-finite weights, statistics out of range)."""
    try:
        check(ckpt, path, script, env_id)
    except InputError as e:
        return str(e.code).removeprefix("error: ")
    return None


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


def load(path, script, env_id=None):
    """A checkpoint of `script`, read and checked (env_id: see check)."""
    return check(read(path), path, script, env_id)


def is_number(value, low=-sys.float_info.max, high=sys.float_info.max):
    """A real number (no bool) in [low, high]; by default any finite one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def is_float32(value, low=-FLOAT32.max, high=FLOAT32.max):
    """A real number in [low, high] that stays finite as float32 (the scripts log and compute in float32)."""
    return is_number(value, low, high) and abs(value) <= FLOAT32.max


def check(ckpt, path, script, env_id=None):
    """Everything --resume and enjoy.py take from a checkpoint, checked for structure, types, ranges,
    finiteness and consistency before anything is built or written (docs/reliability.md, trust model).
    env_id: the one given on the command line, the only one that may name a module to import."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        fail(f"{path} is not a checkpoint of these scripts")
    if ckpt.get("algorithm") != script.ALGORITHM:
        fail(f"checkpoint {path} is of {ckpt.get('algorithm')}_ppo.py, not {script.ALGORITHM}_ppo.py")
    for key, kind in KEYS.items():
        if key not in ckpt or not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            found = type(ckpt[key]).__name__ if key in ckpt else "missing"
            fail(f"checkpoint {path} is malformed: {key} is {found}")
    # the env id first: a file made elsewhere names no module to import, not even for the checks below
    env_suites.check_env_id_from_file(ckpt["args"].get("env_id"), f"checkpoint {path}", env_id)
    ckpt["args"], completed, lacking = complete_args(ckpt, script)
    if lacking:
        fail(
            f"checkpoint {path} lacks {', '.join(map(flag, lacking))}, which it records "
            "nowhere else: today's default in its place would change the run it holds (docs/reliability.md, old "
            "checkpoints)"
        )
    if completed:
        taken = ", ".join(f"{flag(name)} {value!r}" for name, value in completed.items())
        print(f"checkpoint {path} lacks arguments, taken from what it records or as the code was before them: {taken}")
    args = checkpoint_args(ckpt["args"], path, script)
    validate_run_name(ckpt["run_name"], f"checkpoint {path}: run_name")
    if ckpt["wandb_id"] is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ckpt["wandb_id"]):
        fail(f"checkpoint {path}: wandb_id {ckpt['wandb_id']!r} is not a wandb run id")
    check_meta(ckpt["meta"], path)
    # the agent is float32 whatever --frozen-dtype says; the encoder's dtypes are checked against the model's own
    validate_tensors(ckpt["agent"], f"checkpoint {path}: the agent's weights", (torch.float32,))
    validate_tensors(ckpt["encoder"], f"checkpoint {path}: the encoder state")
    check_optimizer(ckpt["optimizer"], path)
    batch, iteration = args.num_envs * args.num_steps, ckpt["iteration"]
    if not 0 <= iteration <= args.total_timesteps // batch or ckpt["global_step"] != iteration * batch:
        fail(
            f"checkpoint {path}: inconsistent counters (update {iteration}, step {ckpt['global_step']}; "
            f"{args.total_timesteps // batch} updates of {batch} steps)"
        )
    # returns are logged and averaged, the reward statistics scale float32 rewards: finite as float32, so that
    # nothing overflows once used (a variance times a count, a squared difference of means)
    returns, rms = ckpt["recent_returns"], ckpt["reward_rms"]
    best = ckpt["best_return"]
    if len(returns) > 100 or not all(is_float32(r) for r in returns) or not (best == -math.inf or is_float32(best)):
        fail(f"checkpoint {path}: recent_returns or best_return are not finite float32 numbers")
    if not (
        len(rms) == 3 and is_float32(rms[0]) and is_float32(rms[1], 0) and is_number(rms[2], 0, 2**63) and rms[2] > 0
    ):
        fail(f"checkpoint {path}: reward_rms is not (mean, variance >= 0, 0 < count < 2**63) of finite float32 numbers")
    check_rng(ckpt["rng"], path)
    return ckpt


def check_meta(meta, path):
    """meta names the algorithm, the env and library versions (read by the model card): plain strings."""
    versions = meta.get("versions", {})
    if not (
        all(isinstance(meta.get(k, ""), str) for k in ("algorithm", "env_id"))
        and isinstance(versions, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items())
    ):
        fail(f"checkpoint {path}: meta is malformed (algorithm, env_id and versions must be strings)")


# ---------------------------------------------------------------------------------------------
# The optimizer's state: AdamW as the scripts build it
# ---------------------------------------------------------------------------------------------

# what AdamW's state_dict() holds per parameter (torch >= 2.0, not amsgrad)
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}


def adamw_group():
    """A parameter group of AdamW as the scripts build it (AdamW(params, lr, eps)): its fields and their defaults."""
    group = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3, eps=1e-8).state_dict()["param_groups"]
    return {k: v for k, v in group[0].items() if k != "params"}


def check_optimizer(optimizer, path):
    """The AdamW state: one parameter group whose every field is AdamW's, of its type and in range (lr in
    [0, float32 max], betas in [0, 1), eps a normal positive float32, weight decay finite and >= 0, the
    flags the scripts' defaults: amsgrad, capturable, fused... would change the algorithm or need other state);
    per parameter a step count (a finite float scalar >= 0) and two float32 moments of one shape, finite, the
    second >= 0. Shapes against the model's parameters: restore(). A field that an older torch did not write
    (torch fills it in on loading) may be missing; the numbers may not."""
    where = f"checkpoint {path}: the optimizer state"
    state, groups = optimizer.get("state"), optimizer.get("param_groups")
    if set(optimizer) != {"state", "param_groups"} or not isinstance(state, dict) or not isinstance(groups, list):
        fail(f"{where} is malformed (not AdamW's state_dict)")
    if len(groups) != 1 or not isinstance(groups[0], dict):
        fail(f"{where} is malformed: {len(groups)} parameter groups, the scripts' AdamW has 1")
    group, defaults = groups[0], adamw_group()
    numbers = {"lr", "betas", "eps", "weight_decay"}
    unknown = sorted(str(k) for k in group if k not in defaults and k != "params")
    missing = sorted(k for k in [*numbers, "params"] if k not in group)
    if unknown or missing:
        fail(f"{where} is malformed: {'unknown' if unknown else 'missing'} {', '.join(unknown or missing)}")
    lr, betas, eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not is_float32(lr, 0):
        fail(f"{where}: the learning rate is not a finite number >= 0 (got {lr!r})")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b, 0) and b < 1 for b in betas)):
        fail(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    if not is_float32(eps, FLOAT32.smallest_normal):
        fail(f"{where}: eps must be a positive normal float32 number, got {eps!r}")
    if not is_float32(decay, 0):
        fail(f"{where}: weight_decay must be a finite number >= 0, got {decay!r}")
    for key, value in group.items():
        if (
            key not in numbers
            and key != "params"
            and (type(value) is not type(defaults[key]) or value != defaults[key])
        ):
            fail(f"{where}: {key} is {value!r}; the scripts' AdamW has {defaults[key]!r}")
    params = group["params"]
    if not (
        isinstance(params, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in params)
        and len(set(params)) == len(params)
    ):
        fail(f"{where}: params must be distinct parameter numbers")
    for i, entry in state.items():
        what = f"{where} of parameter {i!r}"
        if i not in params or not isinstance(entry, dict) or set(entry) != ADAMW_STATE:
            keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            fail(f"{what} is malformed: it must be a parameter of the group, with {sorted(ADAMW_STATE)}, got {keys}")
        step, avg, avg_sq = entry["step"], entry["exp_avg"], entry["exp_avg_sq"]
        if not (isinstance(step, torch.Tensor) and step.dim() == 0 and step.is_floating_point()):
            fail(f"{what}: step must be a scalar float tensor, got {type(step).__name__}")
        validate_tensors({"exp_avg": avg, "exp_avg_sq": avg_sq, "step": step}, what, (torch.float32, torch.float64))
        if avg.dtype != torch.float32 or avg_sq.dtype != torch.float32 or avg.shape != avg_sq.shape:
            fail(f"{what}: exp_avg and exp_avg_sq must be float32 of one shape")
        if not 0 <= float(step) <= 2**53 or (avg_sq < 0).any():
            fail(f"{what}: step must be >= 0 and exp_avg_sq >= 0")


def check_optimizer_fits(optimizer, saved, path):
    """The saved AdamW state against the optimizer built for this model: each parameter's moments of its shape and
    dtype (torch does not check them on loading; the first step would fail)."""
    params = optimizer.param_groups[0]["params"]
    ids = saved["param_groups"][0]["params"]
    if len(ids) != len(params):
        fail(f"checkpoint {path}: the optimizer state has {len(ids)} parameters, this model {len(params)}")
    for i, param in zip(ids, params):
        entry = saved["state"].get(i)
        if entry is not None and (entry["exp_avg"].shape != param.shape or entry["exp_avg"].dtype != param.dtype):
            fail(
                f"checkpoint {path}: the optimizer state of parameter {i} is {tuple(entry['exp_avg'].shape)}, "
                f"the model's parameter {tuple(param.shape)}: it does not match this model"
            )


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------


def check_rng(rng, path):
    """The RNG states as rng_state() writes them, each tried on a generator of its own (the process's are not
    touched): torch's uint8 state, CUDA's list of them, NumPy's MT19937 tuple (its key an int64 tensor of 624
    32-bit words), Python's random state."""
    where = f"checkpoint {path}: the RNG states"
    if set(rng) != {"torch", "cuda", "numpy", "python"}:
        fail(f"{where} are malformed: {sorted(map(str, rng))}, not cuda, numpy, python and torch")
    try:
        torch_state, cuda, np_state, py_state = rng["torch"], rng["cuda"], rng["numpy"], rng["python"]
        if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8):
            raise TypeError("torch: not a uint8 tensor")
        validate_tensors({"torch": torch_state}, where)
        torch.Generator().set_state(torch_state)
        if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and len(t) <= 1024 for t in cuda
        ):
            raise TypeError("cuda: not a list of uint8 tensors")
        validate_tensors({str(i): t for i, t in enumerate(cuda)}, where)
        if not (isinstance(np_state, (tuple, list)) and len(np_state) == 5):
            raise TypeError("numpy: not a tuple of 5")
        name, keys, pos, has_gauss, cached = np_state
        if not (isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and tuple(keys.shape) == (624,)):
            raise TypeError("numpy: the key is not an int64 tensor of 624 words")
        validate_tensors({"numpy": keys}, where)
        if name != "MT19937" or keys.min() < 0 or keys.max() >= 2**32 or not is_number(cached):
            raise ValueError("numpy: not an MT19937 state")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (pos, has_gauss)):
            raise TypeError("numpy: pos and has_gauss must be integers")
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, float(cached)))
        random.Random().setstate(py_state)
    except (TypeError, ValueError, RuntimeError, IndexError, OverflowError) as e:
        fail(f"{where} are malformed ({' '.join(str(e).split())[:200]})")


def defining_args(args, output_dirs=()):
    """The arguments that define a run (what it trains and how): all but the few --resume may change
    (RESUME_OVERRIDES), the directories it writes to, the checkpoint it was resumed from and what is computed."""
    skip = {*RESUME_OVERRIDES, *COMPUTED, *output_dirs, "resume"}
    return {k: v for k, v in args.items() if k not in skip}


def may_write_output_dirs(args, saved, output_dirs):
    """A checkpoint from elsewhere cannot choose where files are written: the directories its arguments (`saved`)
    name for writing (output_dirs) are written to only if they lie under the working directory, or if the
    command line chose another one; otherwise they are only read (SHELM: a missing embeddings file is an error)."""
    paths = [Path(getattr(args, name)) for name in output_dirs]
    inside = [not path.is_absolute() and ".." not in path.parts for path in paths]
    return all(ok or getattr(args, name) != saved.get(name) for ok, name in zip(inside, output_dirs))


def recorded_sizes(saved, ckpt):
    """The run's sizes that a checkpoint records besides its arguments, where they are positive integers: the
    batch (the computed batch_size, and global_step / iteration), the minibatch and the number of updates."""
    recorded = {k: saved[k] for k in COMPUTED if is_number(saved.get(k), 1) and isinstance(saved[k], int)}
    iteration, step = ckpt.get("iteration"), ckpt.get("global_step")
    if not (is_number(iteration, 1) and isinstance(iteration, int) and isinstance(step, int) and step % iteration == 0):
        return recorded
    # the counters say the batch as well: both or neither
    return recorded if recorded.setdefault("batch_size", step // iteration) == step // iteration else {}


def complete_args(ckpt, script):
    """(the checkpoint's arguments with those it lacks filled in, {name: value} of those filled in that define the
    run, [names that cannot be]) for a checkpoint written before some of this script's arguments existed. Filled in:
    the arguments a resumed run takes from its command line anyway (RESUME_OVERRIDES, the output directories,
    resume) and the computed ones, with their defaults; those added later (ADDED_LATER), with the value that gives
    the run as it was; and the run's sizes, from what the checkpoint records besides (recorded_sizes): the batch
    and update counts give --total-timesteps, --num-envs or --num-steps, the minibatch size --num-minibatches
    (where one value alone fits), and the optimizer's learning rate --learning-rate (without --anneal-lr). Any
    other argument defines the run and is not recorded elsewhere: today's default in its place would silently
    make another run (a 4-update run became one of 31,250 updates), so it cannot be filled in."""
    saved, fields = ckpt["args"], [f.name for f in dataclasses.fields(script.Args)]
    missing = [name for name in fields if name not in saved]
    if not missing:
        return saved, {}, []
    defaults = dataclasses.asdict(script.Args())
    args = dict(saved)
    for name in missing:
        if name in (*RESUME_OVERRIDES, *COMPUTED, *script.OUTPUT_DIRS, "resume"):
            args[name] = defaults[name]
    completed = {name: ADDED_LATER[name] for name in missing if name in ADDED_LATER}
    recorded = recorded_sizes(saved, ckpt)
    batch, minibatch, updates = (recorded.get(k) for k in COMPUTED)
    envs, steps = args.get("num_envs"), args.get("num_steps")
    if batch and "num_envs" in missing and is_number(steps, 1) and batch % steps == 0:
        completed["num_envs"] = batch // steps
    if batch and "num_steps" in missing and is_number(envs, 1) and batch % envs == 0:
        completed["num_steps"] = batch // envs
    if batch and updates and "total_timesteps" in missing:
        completed["total_timesteps"] = batch * updates
    if batch and minibatch and "num_minibatches" in missing:
        fewest, most = batch // (minibatch + 1) + 1, batch // minibatch  # every n with batch // n == minibatch
        if fewest == most:
            completed["num_minibatches"] = most
    groups = ckpt.get("optimizer", {}).get("param_groups") if isinstance(ckpt.get("optimizer"), dict) else None
    lr = groups[0].get("lr") if isinstance(groups, list) and groups and isinstance(groups[0], dict) else None
    if "learning_rate" in missing and args.get("anneal_lr") is False and is_number(lr, 0):
        completed["learning_rate"] = lr  # not annealed: the optimizer's rate is the argument
    args.update(completed)
    return args, completed, [name for name in missing if name not in args]


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
    """The trained weights and the frozen encoder's state (HELM's projection, HELMv2's statistics). The encoder's
    state must have the dtypes and keys of the state this model's encoder writes (encoder_state()): loading
    would cast another dtype without a word; the script's own load_encoder_state checks the shapes and values."""
    own, saved = encoder.encoder_state(), ckpt["encoder"]
    for key, value in saved.items():
        if key in own and value.dtype != own[key].dtype:
            fail(
                f"checkpoint {path}: the encoder state's {key} is {str(value.dtype).removeprefix('torch.')}, "
                f"this model's {str(own[key].dtype).removeprefix('torch.')}"
            )
    try:
        agent.load_state_dict(ckpt["agent"])
        encoder.load_encoder_state(saved)
    except (RuntimeError, KeyError, ValueError) as e:
        fail(f"checkpoint {path} does not match this model ({' '.join(str(e).split())[:200]})")
    extra = sorted(set(saved) - set(own))
    if extra:
        fail(f"checkpoint {path}: the encoder state holds {', '.join(extra)}, which this model's encoder has not")


def restore(ckpt, path, agent, optimizer, encoder, reward_norm):
    """Everything a checked checkpoint holds, back in place: weights, the encoder's state, the optimizer, the
    reward normalisation and the RNG states. Returns (iteration, global_step, best_return, recent_returns)."""
    load_trained(agent, encoder, ckpt, path)
    check_optimizer_fits(optimizer, ckpt["optimizer"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"checkpoint {path}: the optimizer state does not match this model ({e})")
    rms = reward_norm.return_rms
    rms.mean, rms.var, rms.count = ckpt["reward_rms"]
    try:
        set_rng_state(ckpt["rng"])
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:  # checked: CUDA's alone is left
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
