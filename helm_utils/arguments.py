"""The checks every script's arguments get, the name of a new run, and the command line of a resumed run.

A script's own check_args calls check_ppo_args and check_memory_args (which ends with check_fits, the size
ceiling), then checks its own flags; the baselines call check_fits last."""

import contextlib
import functools
import io
import math
import os
import shlex
import sys
import time
import weakref
from dataclasses import asdict, replace

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helm_utils import env_suites, fail, frozen_models
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


def check_memory_args(args):
    """The frozen memory's arguments, the same in the three scripts; then whether the run's tensors fit."""
    for name in ["mem_len", "n_layer"]:
        if getattr(args, name) < 1:
            fail(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ["log_tokens_every", "observation_cache_size"]:
        if not 0 <= getattr(args, name) <= INT64_MAX:
            fail(f"{flag(name)} must be >= 0 and < 2**63, got {getattr(args, name)}")
    # the layers of a model known without reading its files (another's are checked once its config.json is read)
    known = args.trxl_model in (frozen_models.TINY, frozen_models.RANDOM_WT103, frozen_models.WT103_HUB_ID)
    if known and args.n_layer > trxl_config(args)["n_layer"]:
        fail(
            f"--n-layer must be between 1 and {trxl_config(args)['n_layer']} for {args.trxl_model}, got {args.n_layer}"
        )
    check_fits(args)


# ---------------------------------------------------------------------------------------------
# What a run allocates, from the script's own networks built on the meta device (shapes, no memory)
# ---------------------------------------------------------------------------------------------

ENV_BYTES = 16 * 1024  # an environment (MiniGrid's is ~45 KB of Python objects): a lower bound
CACHE_ENTRY_BYTES = 200  # an observation cache entry (key, dict slot, tensor objects) besides its numbers
SMALLEST_SPACES = ((8, 8, 3), (2,))  # the smallest observation and action space the agents take (env_suites)


def trxl_config(args):
    """The Transformer-XL's config when it is known without reading a file, else the wt103 model's (the one
    these scripts are made for; a local model of other sizes is bounded by frozen_models.MAX_TRXL_PARAMETERS)."""
    tiny = getattr(args, "trxl_model", None) == frozen_models.TINY
    return frozen_models.TINY_TRXL_CONFIG if tiny else frozen_models.WT103_CONFIG


def script_of(args):
    """The training script whose Args these are (the file run as __main__, or imported): the estimate builds its
    own networks (docs/layout.md: a script hands itself to the package). A script loaded without an import must be
    put in sys.modules first, as importlib's recipe for loading a file does."""
    script = sys.modules.get(type(args).__module__)
    if getattr(script, "Args", None) is not type(args):
        raise LookupError(f"the script of {type(args).__module__}.Args is not in sys.modules: import it, or add it")
    return script


@functools.lru_cache(maxsize=32)
def env_spaces(make_env, env_id):
    """(observation shape, action dims) of env_id as the script's make_env gives them, from one env made here where
    that is plain Python and quick: the registered MiniGrid envs (a fraction of a millisecond). Elsewhere the
    smallest the agents take stand for them, a lower bound: MiniWorld opens a GL context (which must not exist
    before the --async-envs workers fork), Memory Gym a window system, Procgen a process, and an id naming a module
    would run the user's code before the checks are done."""
    spec = gym.registry.get(env_id)
    if spec is None or not isinstance(spec.entry_point, str) or not spec.entry_point.startswith("minigrid."):
        return SMALLEST_SPACES
    env = make_env(env_id, 0, False, "")()
    try:
        return tuple(env.observation_space.shape), env_suites.action_dims(env.action_space)
    finally:
        env.close()


class PeakBytes(TorchDispatchMode):
    """The most bytes that the tensors made under it hold at once (a view or an in-place result is not counted
    again): run on the meta device, what a computation needs beside its inputs, from the code itself."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                self.live += tensor_bytes(t)
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self.release, tensor_bytes(t))  # when the code lets go of it
        return out

    def release(self, nbytes):
        self.live -= nbytes


def estimate(args):
    """[(bytes, what, flags)] of what a run allocates for these arguments, from the script's own networks built
    on the meta device (every shape, no memory; milliseconds, and each size once per process): the trainable agent
    with its gradients and AdamW's two moments, the rollout buffers, the environments, and for the memory scripts
    the frozen Transformer-XL (built in float32), its memories (keys and values of each layer's last --mem-len
    steps in the frozen dtype, kept and written anew by each step), the other tensors of one memory step at their
    peak (a step run on meta) and the observation cache when full. Lower bounds: the frozen encoders, the update's
    activations and the allocator's slack are not counted, and where the observation is not known without opening
    a renderer (env_spaces) the smallest stands for it. Arguments a script lacks count nothing (the baselines have
    no Transformer-XL, the memory scripts no --d-model: their agent is as wide as the Transformer-XL)."""
    script = script_of(args)
    obs_shape, action_dims = env_spaces(script.make_env, args.env_id)
    memory = hasattr(args, "mem_len")
    parts, width = [], getattr(args, "d_model", 0)
    if memory:
        tiny = args.trxl_model == frozen_models.TINY
        width = trxl_config(args)["d_model"]
        device = "cuda" if args.cuda and torch.cuda.is_available() else "cpu"
        dtype = frozen_models.resolve_frozen_dtype(args.frozen_dtype, device)
        tokens = max(getattr(args, "topk", 1), 1)  # tokens per step: SHELM's words (checked later), HELM's one
        layers = min(args.n_layer, trxl_config(args)["n_layer"])  # more: refused (check_memory_args, check_supported)
        frozen, memories, step = frozen_sizes(
            script, tiny, layers, args.mem_len, args.num_envs, args.memory_reset, dtype, tokens
        )
        parts += [
            (4 * frozen, "the frozen Transformer-XL", ["trxl_model", "n_layer"]),
            (memories, "the Transformer-XL memories", ["mem_len", "num_envs", "n_layer"]),
            (step, "the other tensors of a memory step", ["mem_len", "num_envs", "topk"]),
        ]
    lstm = ((args.lstm_hidden_size if args.lstm else None),) if hasattr(args, "lstm") else ()
    agent_flags = ["trxl_model"] if memory else ["d_model", "lstm_hidden_size"] if args.lstm else ["d_model"]
    trained = 4 * 4 * agent_parameters(script, obs_shape, action_dims, width, lstm)  # float32, 4 copies
    parts += [
        (trained, "the agent's weights, gradients and AdamW moments", agent_flags),
        (
            args.num_steps * args.num_envs * rollout_bytes(obs_shape, action_dims, width if memory else 0),
            "the rollout buffers",
            ["num_steps", "num_envs"],
        ),
        (args.num_envs * ENV_BYTES, "the environments", ["num_envs"]),
    ]
    if memory:
        cache = args.observation_cache_size * (CACHE_ENTRY_BYTES + 4 * tokens)
        parts.append((cache, "the observation cache when full", ["observation_cache_size"]))
    return parts


@contextlib.contextmanager
def on_meta():
    """Modules built on the meta device (shapes, no memory), the random generators left as they were."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        yield


def parameters(module):
    return sum(p.numel() for p in module.parameters())


def tensor_bytes(tensor):
    return tensor.numel() * tensor.element_size()


BEYOND_INT64 = 2**63  # bytes of a tensor whose size torch cannot even compute (it overflows int64)


@contextlib.contextmanager
def beyond_int64():
    """Lets a tensor too large for torch to compute its size (on meta too) pass as OverflowError: no machine holds
    it, and the caller counts BEYOND_INT64 bytes."""
    try:
        yield
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise OverflowError(str(e)) from None


@functools.lru_cache(maxsize=64)
def agent_parameters(script, obs_shape, action_dims, width, lstm):
    """The parameters of the script's own Agent for these spaces and widths (lstm: the baseline's LSTM size);
    BEYOND_INT64 where one of its tensors is too large for torch to compute its size."""
    try:
        with on_meta(), beyond_int64():
            return parameters(script.Agent(obs_shape, action_dims, width, *lstm))
    except OverflowError:
        return BEYOND_INT64


@functools.lru_cache(maxsize=64)
def frozen_sizes(script, tiny, n_layer, mem_len, num_envs, memory_reset, dtype, tokens):
    """(parameters of the script's Transformer-XL, bytes of its memories, bytes of the other tensors of one step at
    their peak): the model built on meta, the memories' shape from the script's init_memory (kept, and written
    anew by each step: twice), and a step of the script's forward run on meta through one layer (every layer is
    alike, and the step goes through them one after the other) under PeakBytes."""
    config = frozen_models.TINY_TRXL_CONFIG if tiny else frozen_models.WT103_CONFIG
    with on_meta():
        trxl = script.TransformerXL(config, n_layer, mem_len)
        one_layer = script.TransformerXL(config, 1, mem_len)
    frozen = parameters(trxl)  # mem_len sizes no parameter
    try:
        with on_meta(), beyond_int64():
            mems, _ = script.init_memory(trxl.to(dtype), num_envs, memory_reset, torch.device("meta"))
            one_mems, mask = script.init_memory(one_layer.to(dtype), num_envs, memory_reset, torch.device("meta"))
            inputs = torch.zeros(tokens, num_envs, trxl.d_model)
        with torch.no_grad(), PeakBytes() as step, beyond_int64():
            _, new_mems, _ = one_layer(inputs, one_mems, mask)
            written = new_mems.untyped_storage().nbytes()  # the memories it writes: counted with the memories
    except OverflowError:
        return frozen, BEYOND_INT64, BEYOND_INT64
    return frozen, 2 * tensor_bytes(mems), step.peak - written


def rollout_bytes(obs_shape, action_dims, memory_width):
    """Bytes per step of one env in the rollout buffers: the observation (uint8), the memory scripts' Transformer-XL
    output (float32), an action and its log-probability per action dimension, reward, done, value, advantage and
    return."""
    return math.prod(obs_shape) + 4 * memory_width + (8 + 4) * len(action_dims) + 4 * 5


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


def check_fits(args, host=()):
    """One line naming the flags, when what the run will allocate (estimate) cannot fit in this machine's memory,
    before anything is built: a size from a typo or a checkpoint ends here, not in a traceback or a swapping machine.
    On CUDA the tensors must fit the GPU as well; the environments always live in RAM, and so do `host`, more
    [(bytes, what, flags)] of a tool that runs the script's memory (benchmark/probe.py's frames), whose flags are
    named as they read ("--episodes 200")."""
    parts = estimate(args) + list(host)
    limits = {"memory": memory_limit()}
    if getattr(args, "cuda", False) and torch.cuda.is_available():
        limits["GPU memory"] = torch.cuda.get_device_properties(0).total_memory
    for where, limit in limits.items():
        counted = [p for p in parts if where == "memory" or (p[1] != "the environments" and p not in host)]
        total = sum(nbytes for nbytes, _, _ in counted)
        if total > limit:
            nbytes, what, names = max(counted, key=lambda p: p[0])
            # the run's flags with their values; a tool's own (host) name theirs as they read ("--episodes 200")
            given = ", ".join(
                f"{flag(name)} {getattr(args, name)}" if hasattr(args, name) else name
                for name in names
                if hasattr(args, name) or name.startswith("--")
            )
            fail(
                f"{given}: {what} alone take at least {size(nbytes)}, the run at least {size(total)}, more than "
                f"the {size(limit)} of {where} here; choose smaller values"
            )


def new_run_name(args):
    return f"{env_suites.run_label(args.env_id)}__{args.exp_name}__{args.seed}__{int(time.time())}"


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


def script_args(module, argv, what):
    """A script's Args for the command line `argv`, parsed by tyro and checked by its check_args (ranges, sizes
    against this machine's memory), in this process: what a benchmark tool runs or builds is refused in one line
    naming `what` before any work, as the script itself would refuse it."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            parsed = tyro.cli(module.Args, args=list(argv))
    except SystemExit:
        # tyro's message is a box: its first lines inside say what is wrong
        lines = [line.strip(" │╭╮╰╯─-") for line in out.getvalue().splitlines()]
        lines = [line for line in lines if line and not line.startswith(("For full helptext", "Usage:", "usage:"))]
        reason = " ".join(lines[1:] or lines).split(" Argument helptext:")[0][:300]
        fail(f"{what}: {shlex.join(argv)} cannot be parsed by the script{': ' + reason if reason else ''}")
    try:
        module.check_args(parsed)
    except SystemExit as e:
        fail(f"{what}: {str(e.code).removeprefix('error: ')}")
    return parsed


def refuse_flags(tokens, names, what, why):
    """One line if the command-line tokens give one of the flags `names` (as --name, --name=..., --no-name, with _ or
    -): flags a tool sets itself, which a script's flags it hands on would change without the tool knowing."""
    for token in tokens:
        given = token.split("=", 1)[0].replace("_", "-")
        if given.startswith("--") and given.removeprefix("--").removeprefix("no-") in {
            n.replace("_", "-") for n in names
        }:
            fail(f"{what}: {token} is not for a script here: {why}")
