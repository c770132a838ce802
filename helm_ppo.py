# [algorithm-specific]
"""HELM (History compression via Language Models, Paischer et al. ICML 2022) with PPO, in one file.

Each observation is scaled to [0, 1], averaged over its colour channels, flattened and mapped by a
fixed random projection into the Transformer-XL's embedding space; a frozen Hopfield retrieval,
softmax(beta * cosine similarity) against all 267,735 Transformer-XL input token embeddings, turns
it into one soft token: the attention-weighted mix of the vocabulary's embeddings. The frozen,
pretrained Transformer-XL reads one such token per step, and its output for the current step is the
agent's memory. The most attended word of each step is logged, so the memory can be read as text.
Only the CNN query encoder, the actor and the critic train.

    python helm_ppo.py --env-id MiniGrid-MemoryS11-v0 --n-layer 2

Docs: docs/helm_ppo.md. The sections marked [algorithm-specific] are what differ from shelm_ppo.py
and helmv2_ppo.py; everything else is the same code in the three scripts (tests/test_drift.py).
"""

# [end algorithm-specific]
import collections
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import itertools
import math
import operator
import os
import random
import re
import signal
import sys
import time
import types
import typing
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import gymnasium as gym
import minigrid  # noqa: F401 - registers the MiniGrid environments
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions.categorical import Categorical

import prepare_embeddings
from prepare_embeddings import fail

# [algorithm-specific]
ALGORITHM = "helm"
# arguments naming a directory the script writes to (a checkpoint's values must stay under the working directory)
OUTPUT_DIRS = ()
# [end algorithm-specific]
CHECKPOINT_FORMAT = "helm-checkpoint/1"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "helm"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the agent performances (check out `videos` folder)"""
    save_model: bool = False
    """whether to save the trainable weights (runs/{run_name}/model_final.pt and model_best.pt)"""
    upload_model: bool = False
    """after training, evaluate the saved model and upload it, a model card and a video to the Hugging Face hub"""
    hf_entity: str | None = None
    """the user or org name of the model repository from the Hugging Face Hub"""
    eval_episodes: int = 10
    """episodes of the evaluation before the upload (logged as eval/episodic_return)"""

    # Algorithm specific arguments
    env_id: str = "MiniGrid-MemoryS11-v0"
    """the id of the environment"""
    total_timesteps: int = 2_000_000
    """total timesteps of the experiments"""
    # [algorithm-specific]
    learning_rate: float = 1e-4
    """the learning rate of the optimizer (AdamW, eps 1e-8)"""
    # [end algorithm-specific]
    num_envs: int = 16
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = False
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.99
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 8
    """the number of mini-batches"""
    update_epochs: int = 3
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = False
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.005
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold"""

    # Memory: the frozen Transformer-XL
    trxl_model: str = "transfo-xl/transfo-xl-wt103"
    """Transformer-XL: Hugging Face hub id, local directory, tiny-random (tests) or random-wt103 (speed benchmarks)"""
    n_layer: int = 18
    """keep the first N of the Transformer-XL's layers (1..18); 2 learns as well and is faster"""
    mem_len: int = 15
    """number of past steps (tokens) the Transformer-XL keeps per layer"""
    memory_reset: Literal["mask", "zero"] = "mask"
    """at an episode start: mask (hide the old episode from the new) or zero (zero the memories, as the original)"""
    ablate_memory: bool = False
    """feed the agent zeros instead of the Transformer-XL's output (the papers' memoryless baseline)"""
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the frozen Transformer-XL (and SHELM's CLIP): auto is bfloat16 where the hardware has fast bfloat16"""
    observation_cache_size: int = 100_000
    """observations whose frozen-encoder outputs are remembered, so exact repeats skip the encoder (0: off)"""
    # [algorithm-specific]
    # HELM: FrozenHopfield (random projection + Hopfield retrieval over the whole vocabulary)
    beta: float = 100.0
    """inverse temperature of the Hopfield softmax (100: the original's default; see docs/helm_ppo.md)"""
    hopfield_chunk: int = 0
    """0: the softmax over the whole vocabulary at once (batch x vocabulary scores); N: streamed in chunks of N"""
    # [end algorithm-specific]
    log_tokens_every: int = 10
    """every N updates, log the memory tokens of one whole episode as tensorboard text (0: never)"""

    # Reliability
    resume: str | None = None
    """continue the run saved in this checkpoint (its own arguments are used; see docs/reliability.md)"""
    checkpoint_every: int = 10
    """write runs/{run_name}/checkpoint.pt every N updates (0: only at the end and on SIGINT/SIGTERM)"""
    nonfinite_limit: int = 5
    """abort (with a checkpoint) after this many non-finite losses or gradients in a row"""
    progress_bar: bool = True
    """show a progress bar"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# What --resume takes from the command line when given there; every other argument comes from the checkpoint.
RESUME_OVERRIDES = ("cuda", "track", "progress_bar", "checkpoint_every", "upload_model", "hf_entity", "eval_episodes")
RUNS = Path("runs")  # every run directory lies under it, relative to the working directory
MAX_NAME_BYTES = 200  # of a run directory's name; file systems allow 255, the rest is for suffixes


def resume_args(ckpt, path):
    """The checkpoint's arguments with the flags given on this command line: tyro parses it again with the
    checkpoint's values as defaults. Flags outside RESUME_OVERRIDES may only repeat the checkpoint's value."""
    try:
        saved = Args(**ckpt["args"])
    except TypeError as e:
        fail(f"checkpoint {path} was written with other arguments than this script has ({e})")
    args = tyro.cli(Args, default=replace(saved, resume=path))
    changed = [name for name, value in asdict(saved).items() if getattr(args, name) != value]
    fixed = [
        f"--{name.replace('_', '-')}" for name in changed if name not in (*RESUME_OVERRIDES, *OUTPUT_DIRS, "resume")
    ]
    if fixed:
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in (*RESUME_OVERRIDES, *OUTPUT_DIRS))
        fail(f"{' '.join(fixed)}: a resumed run keeps its checkpoint's arguments; only {allowed} can be given")
    return args


def check_args(args):
    """One clear line for each argument out of range, before anything is built or written."""
    positive = [
        "total_timesteps",
        "num_envs",
        "num_steps",
        "num_minibatches",
        "update_epochs",
        "mem_len",
        "nonfinite_limit",
        "eval_episodes",
    ]
    # [algorithm-specific]
    if args.hopfield_chunk < 0:
        fail(f"--hopfield-chunk must be >= 0, got {args.hopfield_chunk}")
    if not (math.isfinite(args.beta) and args.beta > 0):
        fail(f"--beta must be a positive finite number, got {args.beta}")
    # [end algorithm-specific]
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {args.seed}")
    for name in ["learning_rate", "clip_coef", "max_grad_norm"]:
        if not 0 < getattr(args, name) < torch.finfo(torch.float32).max:
            fail(f"--{name.replace('_', '-')} must be a positive float32 number, got {getattr(args, name)}")
    for name in ["gamma", "gae_lambda"]:
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ["ent_coef", "vf_coef", "log_tokens_every", "checkpoint_every", "observation_cache_size"]:
        if not 0 <= getattr(args, name) < torch.finfo(torch.float32).max:
            fail(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(args, name)}")
    if args.target_kl is not None and not 0 < args.target_kl < math.inf:
        fail(f"--target-kl must be positive and finite, got {args.target_kl}")
    if args.n_layer < 1:
        fail(f"--n-layer must be >= 1, got {args.n_layer}")
    if args.num_envs * args.num_steps < args.num_minibatches:
        batch_size = args.num_envs * args.num_steps
        fail(f"--num-minibatches ({args.num_minibatches}) exceeds the batch size num_envs * num_steps ({batch_size})")
    if args.total_timesteps < args.num_envs * args.num_steps:
        rollout = args.num_envs * args.num_steps
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one rollout, num_envs * num_steps ({rollout})")
    batch = args.num_envs * args.num_steps
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


def new_run_name(args):
    return f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"


def validate_run_name(run_name, what):
    """A name that keeps the run directory under runs/: relative, without '..', printable UTF-8, not too long.
    Refused, not repaired: a name from a checkpoint or the command line is used as given or not at all."""
    if not isinstance(run_name, str) or not run_name:
        fail(f"{what} must be a non-empty string, got {run_name!r}")
    try:
        parts = [part.encode("utf-8") for part in run_name.split("/")]
    except UnicodeEncodeError:
        fail(f"{what} {run_name!r} is not valid UTF-8")
    if any(part in (b"", b".", b"..") for part in parts) or re.search(r"[\x00-\x1f\x7f\\]", run_name):
        fail(f"{what} {run_name!r} leaves runs/: it must be relative, without '..', control characters or '\\'")
    if max(len(part) for part in parts) > MAX_NAME_BYTES:
        fail(f"{what} is {max(len(part) for part in parts)} bytes long; at most {MAX_NAME_BYTES} make a directory name")


GL_HELP = (
    "MiniWorld renders with OpenGL, headless through EGL: on Debian or Ubuntu, "
    "apt-get install libegl1 libgl1 libglu1-mesa libgl1-mesa-dri libfontconfig1"
)
MEMORY_GYM = ("memory_gym", "pip install --no-deps -r requirements/memory-gym.txt")
# Suites beside MiniGrid, by the start of their env ids: the module that registers their envs (imported only
# when one of them is asked for) and how to install it. docs/environments.md
ENV_SUITES = {
    "MiniWorld-": ("miniworld", f"pip install -r requirements/requirements.txt; {GL_HELP}"),
    "MortarMayhem": MEMORY_GYM,
    "MysteryPath": MEMORY_GYM,
    "SearingSpotlights": MEMORY_GYM,
    "Endless-": MEMORY_GYM,
    # procgen needs numpy < 2: a virtualenv of its own; procgen_memory.py adapts it to gymnasium
    "procgen-memory-": (
        "procgen_memory",
        "python3 -m venv .venv-procgen && .venv-procgen/bin/pip install -r requirements/procgen.txt, "
        "then run with .venv-procgen/bin/python",
    ),
}


def import_env_suite(env_id):
    """Register the envs of env_id's suite (docs/environments.md). MiniWorld renders off-screen through
    EGL, so no display (nor xvfb) is needed."""
    suite = next((suite for prefix, suite in ENV_SUITES.items() if env_id.startswith(prefix)), None)
    if suite is None or env_id in gym.registry:
        return
    module, install = suite
    if module == "miniworld":
        os.environ.setdefault("PYGLET_HEADLESS", "true")  # read by pyglet when miniworld first imports it
        # triton, which torch's compiler stack imports later (through torchvision), carries its own LLVM; loaded
        # after Mesa's software renderer (linked to the system's LLVM) has made a GL context, it segfaults.
        # Loaded before any GL context, both work.
        if importlib.util.find_spec("triton") is not None:
            import triton  # noqa: F401
    if module == "memory_gym":
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # pygame.init() opens a sound card it never uses
    try:
        importlib.import_module(module)
    except ImportError as e:
        fail(f"{env_id} needs the module {module}, which cannot be imported ({e}); install it with: {install}")


def make_env(env_id, idx, capture_video, run_name, render_mode=None):
    def thunk():
        import_env_suite(env_id)
        try:
            env = gym.make(env_id, render_mode="rgb_array" if capture_video and idx == 0 else render_mode)
        except gym.error.Error as e:
            fail(f"unknown or unusable environment {env_id!r} ({e})")
        except ImportError as e:  # a system library of the renderer
            fail(f"{env_id} cannot be made: {e}" + (f"; {GL_HELP}" if env_id.startswith("MiniWorld-") else ""))
        if isinstance(env.observation_space, gym.spaces.Dict) and "image" in env.observation_space.spaces:
            # MiniGrid as in the original: the agent's partial view rendered as 56x56 RGB pixels
            env = minigrid.wrappers.RGBImgPartialObsWrapper(env, tile_size=8)
            env = minigrid.wrappers.ImgObsWrapper(env)
        if isinstance(env.observation_space, gym.spaces.Dict) and "obs" in env.observation_space.spaces:
            # MiniWorld-Sign observes {obs: image, goal: box or key}; the original kept the image only. The
            # goal is fixed when the env is made (box, by default), so nothing is lost.
            env = gym.wrappers.TransformObservation(env, operator.itemgetter("obs"), env.observation_space["obs"])
        space = env.observation_space
        if not (
            isinstance(space, gym.spaces.Box)
            and space.dtype == np.uint8
            and len(space.shape) == 3
            and space.shape[-1] == 3
        ):
            fail(f"{env_id} does not observe RGB images (H, W, 3) of uint8 but {space}; these agents need pixels")
        if min(space.shape[:2]) < 8:
            fail(f"{env_id} observes images of {space.shape[0]}x{space.shape[1]} pixels; the CNN needs at least 8x8")
        if not isinstance(env.action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)) or (
            isinstance(env.action_space, gym.spaces.MultiDiscrete) and env.action_space.nvec.ndim != 1
        ):
            fail(
                f"{env_id} has the action space {env.action_space}; these agents need Discrete or MultiDiscrete "
                "(one dimension) actions"
            )
        if capture_video and idx == 0:
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        return env

    return thunk


def action_dims(space):
    """Choices per action dimension: (n,) for Discrete, nvec for MultiDiscrete (one categorical each)."""
    return (int(space.n),) if isinstance(space, gym.spaces.Discrete) else tuple(int(n) for n in space.nvec)


def env_actions(action, space):
    """The agent's actions (num_envs, n_dims) as the vector env takes them: (num_envs,) for Discrete."""
    action = action.cpu().numpy()
    return action[:, 0] if isinstance(space, gym.spaces.Discrete) else action


def make_envs(args, run_name):
    """Vector env that resets a finished episode within the same step, so the observation after a
    done is already the new episode's first one: no transition across a reset enters the buffer."""
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)  # raw returns, before normalization
    # as SB3's VecNormalize(norm_obs=False, norm_reward=True, clip_reward=1) in the original
    reward_norm = gym.wrappers.vector.NormalizeReward(envs, gamma=args.gamma)
    envs = gym.wrappers.vector.ClipReward(reward_norm, -1.0, 1.0)
    return envs, reward_norm


# ---------------------------------------------------------------------------------------------
# Transformer-XL (Dai et al. 2019), equal to Hugging Face's TransfoXLModel (tests/test_trxl.py).
# Parameter names are those of the official checkpoint, so its state dict loads by key.
# Tensors are laid out (seq, batch, ...) as in the original implementation.
# ---------------------------------------------------------------------------------------------


class AdaptiveEmbedding(nn.Module):
    """Adaptive input (Baevski & Auli 2019): frequent tokens get wide embeddings, rare ones narrow,
    all projected to d_model; 267,735 words at a fraction of the parameters."""

    def __init__(self, n_token, d_embed, d_model, cutoffs, div_val):
        super().__init__()
        self.cutoff_ends = [0] + list(cutoffs) + [n_token]
        self.d_model = d_model
        self.emb_scale = d_model**0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        for i in range(len(self.cutoff_ends) - 1):
            d_emb_i = d_embed // (div_val**i)
            self.emb_layers.append(nn.Embedding(self.cutoff_ends[i + 1] - self.cutoff_ends[i], d_emb_i))
            self.emb_projs.append(nn.Parameter(torch.randn(d_model, d_emb_i) / d_emb_i**0.5))

    def forward(self, ids):
        flat = ids.reshape(-1)
        out = torch.zeros(flat.numel(), self.d_model, dtype=self.emb_projs[0].dtype, device=flat.device)
        for i, (emb, proj) in enumerate(zip(self.emb_layers, self.emb_projs)):
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():
                out.index_copy_(0, idx, F.linear(emb(flat[idx] - lo), proj))
        return out.view(*ids.shape, self.d_model) * self.emb_scale


class RelMultiHeadAttn(nn.Module):
    """Multi-head attention with relative positions and learned global content/position biases
    (r_w_bias, r_r_bias: untied, one pair per layer), post-LayerNorm."""

    def __init__(self, n_head, d_model, d_head, eps):
        super().__init__()
        self.n_head, self.d_head, self.scale = n_head, d_head, 1 / d_head**0.5
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)
        self.r_w_bias = nn.Parameter(torch.randn(n_head, d_head) * 0.1)
        self.r_r_bias = nn.Parameter(torch.randn(n_head, d_head) * 0.1)
        # enjoy.py sets keep_probs to read the attention; training never does, so nothing is kept
        self.keep_probs, self.probs = False, None

    @staticmethod
    def rel_shift(x):
        # turns scores against absolute key offsets into scores against relative distances
        q, k = x.shape[:2]
        x = torch.cat([x.new_zeros(q, 1, *x.shape[2:]), x], dim=1)
        return x.view(k + 1, q, *x.shape[2:])[1:].view(q, k, *x.shape[2:])

    def keys_values(self, h):
        """Keys and values (..., 2 * n_head * d_head) of layer inputs h: what a memory slot holding h
        offers to later steps. The weights are frozen, so a slot's are computed once, when it is written."""
        return F.linear(h, self.qkv_net.weight[self.n_head * self.d_head :])

    def forward(self, h, pos_emb, mask, mem_kv):
        """h (qlen, bsz, d_model) this step's inputs, mem_kv (mlen, bsz, 2 * n_head * d_head) the keys and
        values of the memory -> (output, the keys and values of h: the memory slots this step writes)."""
        qlen, bsz = h.shape[:2]
        q, kv = self.qkv_net(h).split([self.n_head * self.d_head, 2 * self.n_head * self.d_head], dim=-1)
        q = q.view(qlen, bsz, self.n_head, self.d_head)
        k, v = torch.cat([mem_kv, kv], dim=0).view(-1, bsz, 2, self.n_head, self.d_head).unbind(2)
        r = self.r_net(pos_emb).view(-1, self.n_head, self.d_head)
        content = torch.einsum("ibnd,jbnd->ijbn", q + self.r_w_bias, k)
        position = self.rel_shift(torch.einsum("ibnd,jnd->ijbn", q + self.r_r_bias, r))
        score = (content + position).float() * self.scale  # the softmax in float32 whatever the weights' dtype
        score = score.masked_fill(mask[..., None], torch.finfo(score.dtype).min)
        probs = score.softmax(dim=1)  # (query, key, batch, head); keys: the memory slots, then this step's tokens
        if self.keep_probs:
            self.probs = probs
        out = torch.einsum("ijbn,jbnd->ibnd", probs.to(v.dtype), v).reshape(qlen, bsz, -1)
        return self.layer_norm(h + self.o_net(out)), kv


class PositionwiseFF(nn.Module):
    def __init__(self, d_model, d_inner, eps):
        super().__init__()
        # Identity stands where the checkpoint's dropout was, so the keys read CoreNet.0 and CoreNet.3
        self.CoreNet = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(), nn.Identity(), nn.Linear(d_inner, d_model))
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, h):
        return self.layer_norm(h + self.CoreNet(h))


class DecoderLayer(nn.Module):
    def __init__(self, n_head, d_model, d_head, d_inner, eps):
        super().__init__()
        self.dec_attn = RelMultiHeadAttn(n_head, d_model, d_head, eps)
        self.pos_ff = PositionwiseFF(d_model, d_inner, eps)

    def forward(self, h, pos_emb, mask, mem_kv):
        h, kv = self.dec_attn(h, pos_emb, mask, mem_kv)
        return self.pos_ff(h), kv


class TransformerXL(nn.Module):
    """Transformer-XL with per-layer memories of the last mem_len steps.

    mems (n_layer, mem_len, batch, 2 * n_head * d_head) hold the attention keys and values of each layer's
    past inputs (keys_values(hidden) of Hugging Face's mems, which hold the inputs themselves): the
    weights are frozen, so each slot's keys and values are computed once instead of at every step.
    memory_mask (mem_len, batch) says which memory slots a step may attend to (None: all, as Hugging
    Face's model does). The frozen weights may be bfloat16; inputs are cast to them, outputs are float32."""

    def __init__(self, config, n_layer, mem_len):
        """config: the Hugging Face config.json of the model (a dict); n_layer: how many of its layers to keep."""
        super().__init__()
        self.n_layer, self.mem_len, self.d_model = n_layer, mem_len, config["d_model"]
        self.mem_width = 2 * config["n_head"] * config["d_head"]  # a memory slot holds the keys and values of one input
        self.clamp_len, self.same_length = config["clamp_len"], config["same_length"]
        self.word_emb = AdaptiveEmbedding(
            config["vocab_size"], config["d_embed"], config["d_model"], config["cutoffs"], config["div_val"]
        )
        eps = config.get("layer_norm_epsilon", 1e-5)
        self.layers = nn.ModuleList(
            DecoderLayer(config["n_head"], config["d_model"], config["d_head"], config["d_inner"], eps)
            for _ in range(n_layer)
        )

    @property
    def dtype(self):
        return self.word_emb.emb_projs[0].dtype

    def keys_values(self, hidden):
        """Memories as this model keeps them (keys and values) from Hugging Face's (each layer's inputs),
        (n_layer, mem_len, batch, d_model) -> (n_layer, mem_len, batch, mem_width)."""
        return torch.stack([layer.dec_attn.keys_values(h) for layer, h in zip(self.layers, hidden)])

    def forward(self, x, mems, memory_mask=None):
        """x (qlen, batch, d_model) input embeddings -> (output of the last layer, new mems, new memory_mask)."""
        x = x.to(self.dtype)
        qlen, bsz = x.shape[:2]
        mlen = mems.shape[1]
        klen = mlen + qlen
        ones = torch.ones(qlen, klen, dtype=torch.bool, device=x.device)
        mask = torch.triu(ones, diagonal=1 + mlen)  # no attending to the future
        if self.same_length:  # every query sees the same number of keys, as in training on wt103
            shift = qlen - (klen - self.mem_len) if klen > self.mem_len else qlen
            mask = mask | torch.tril(ones, diagonal=-shift)
        mask = mask[:, :, None]
        if memory_mask is not None:
            visible = torch.cat([memory_mask, torch.ones(qlen, bsz, dtype=torch.bool, device=x.device)])
            mask = mask | ~visible[None]
        pos = torch.arange(klen - 1, -1, -1.0, device=x.device)
        if self.clamp_len > 0:
            pos = pos.clamp(max=self.clamp_len)
        inv_freq = 1 / (10000 ** (torch.arange(0.0, self.d_model, 2.0, device=x.device) / self.d_model))
        angles = torch.outer(pos, inv_freq)  # in float32 whatever the weights' dtype
        pos_emb = torch.cat([angles.sin(), angles.cos()], dim=-1)[:, None, :].to(x.dtype)
        new_kvs, h = [], x
        for layer, mem_kv in zip(self.layers, mems):
            h, kv = layer(h, pos_emb, mask, mem_kv)
            new_kvs.append(kv)
        new_mems = torch.cat([mems, torch.stack(new_kvs)], dim=1)[:, -self.mem_len :]
        if memory_mask is not None:
            memory_mask = torch.cat([memory_mask, torch.ones(qlen, bsz, dtype=torch.bool, device=x.device)])[
                -self.mem_len :
            ]
        return h.float(), new_mems, memory_mask


def build_trxl(source, n_layer, mem_len, device):
    """The frozen Transformer-XL with its first n_layer layers, and its vocabulary (idx2sym)."""
    config, weights, vocab = prepare_embeddings.trxl_source(source)
    for key, want in [("adaptive", True), ("untie_r", True), ("pre_lnorm", False), ("attn_type", 0)]:
        if config.get(key, want) != want:
            fail(f"{source}: {key}={config.get(key)} is not supported (the wt103 model has {key}={want})")
    if config.get("div_val", 1) < 2:
        fail(f"{source}: div_val={config.get('div_val')} is not supported (adaptive embeddings need div_val > 1)")
    if not 1 <= n_layer <= config["n_layer"]:
        fail(f"--n-layer must be between 1 and {config['n_layer']} for {source}, got {n_layer}")
    if len(vocab) != config["vocab_size"]:
        fail(f"{source}: the vocabulary has {len(vocab)} words but the model {config['vocab_size']}")
    if weights is None:  # random model: the same weights in every process, its layers a prefix of all 18
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            trxl = TransformerXL(config, n_layer, mem_len)  # the layers are drawn after the embeddings, in order
    else:
        trxl = TransformerXL(config, n_layer, mem_len)
        state = {}
        for key, value in prepare_embeddings.read_state_dict(weights).items():
            key = key.removeprefix("transformer.")  # the official checkpoint is the LM-head model
            if key.startswith("crit.") or key == "pos_emb.inv_freq":
                continue
            layer = key.split(".")[1] if key.startswith("layers.") else ""
            if layer.isdigit() and int(layer) >= n_layer:  # other keys that are no parameter fail to load below
                continue
            state[key] = value
        try:
            trxl.load_state_dict(state)
        except RuntimeError as e:
            fail(f"weights {weights} do not fit the Transformer-XL of {source}: {' '.join(str(e).split())[:300]}")
    return trxl.to(device).eval().requires_grad_(False), vocab


def init_memory(trxl, num_envs, memory_reset, device):
    """Empty memories. With mask, a fresh start has nothing to attend to; with zero, every slot is
    visible and holds zeros, as in the original (and as Hugging Face initialises mems): the keys and
    values of a zero input are zeros, since qkv_net has no bias."""
    mems = torch.zeros(trxl.n_layer, trxl.mem_len, num_envs, trxl.mem_width, dtype=trxl.dtype, device=device)
    memory_mask = torch.full((trxl.mem_len, num_envs), memory_reset == "zero", dtype=torch.bool, device=device)
    return mems, memory_mask


def memory_readout(trxl_out, ablate_memory):
    """The agent's memory input: the Transformer-XL's output at the step's last token. With
    --ablate-memory it is zeros, while everything else (the frozen models included) runs unchanged."""
    return torch.zeros_like(trxl_out[-1]) if ablate_memory else trxl_out[-1]


def reset_memory(mems, memory_mask, done, memory_reset):
    """Forget the finished episodes of the envs in `done` (bool, num_envs)."""
    if memory_reset == "mask":
        return mems, memory_mask & ~done[None, :]
    return mems * ~done[None, None, :, None], memory_mask


def resolve_frozen_dtype(name, device):
    """torch dtype of --frozen-dtype: auto is bfloat16 where matrix products in it are fast (CUDA, CPUs
    with AVX512-BF16 or AMX), float32 elsewhere."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            name = "bfloat16" if torch.backends.mkldnn.is_available() and mkldnn_bf16_supported() else "float32"
    return getattr(torch, name)


def mkldnn_bf16_supported():
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


class ObservationCache:
    """What a frozen encoder computed for each observation seen, so exact repeats skip it: grid worlds
    show the same views again and again. Keys are 128-bit BLAKE2 hashes of the observation's bytes; at
    most `size` entries are kept, the least recently used go first; size 0 turns the cache off."""

    def __init__(self, size):
        self.size, self.entries = size, collections.OrderedDict()
        self.lookups = self.hits = 0

    def __len__(self):
        return len(self.entries)

    def __call__(self, obs, compute):
        """compute(observations) -> tuple of tensors with one row per observation. The same for obs
        (numpy, batch x ...), with compute run only on the observations not in the cache, each once."""
        if self.size == 0:
            return compute(obs)
        keys = [hashlib.blake2b(o.tobytes(), digest_size=16).digest() for o in obs]
        missing = {}  # key -> first index in the batch: an observation shown by several envs is computed once
        for i, key in enumerate(keys):
            if key not in self.entries:
                missing.setdefault(key, i)
        self.lookups += len(keys)
        self.hits += sum(key in self.entries for key in keys)
        rows = {key: self.entries[key] for key in keys if key in self.entries}
        if missing:
            computed = compute(obs[list(missing.values())])
            for j, key in enumerate(missing):
                rows[key] = tuple(t[j].clone() for t in computed)  # clone: a row alone, not a view of the batch
        for key in keys:  # most recently used last
            self.entries[key] = rows[key]
            self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return tuple(torch.stack(column) for column in zip(*(rows[key] for key in keys)))

    def log_scalars(self):
        """The share of lookups since the last call that the cache answered."""
        if not self.size:
            return {}
        rate = self.hits / self.lookups if self.lookups else float("nan")
        self.lookups = self.hits = 0
        return {"charts/observation_cache_hit_rate": rate}


# [algorithm-specific]
# ---------------------------------------------------------------------------------------------
# HELM's frozen encoder: FrozenHopfield. A fixed random projection of the observation, then one
# step of a modern Hopfield network whose stored patterns are all Transformer-XL token embeddings.
# ---------------------------------------------------------------------------------------------


class FrozenHopfield(nn.Module):
    """Observations (uint8 numpy, batch x H x W x 3) -> Transformer-XL input embeddings (1, batch, d).

    x = P @ flatten(mean over colour channels of obs / 255), P (d_model, H*W) ~ N(0, 1/d_model), fixed;
    soft token = sum_v softmax_v(beta * cos(x, E_v)) E_v over the embeddings E (n_token, d_model) of the
    whole vocabulary, with cos(x, E_v) = x . E_v / (|x| |E_v| + 1e-8) as in the original.

    The paper averages over the colour channels. The original code's obs.mean(1) does so only because
    stable-baselines3 hands it channel-first images (it wraps uint8 image envs in VecTransposeImage);
    on the channel-last images these scripts use, mean(1) would average over the image rows. Here the
    average is taken explicitly over the last (colour) axis: the projection sees H*W pixels.

    The vocabulary embeddings and their norms are computed once and kept as buffers (267,735 x 1024
    floats, 1.1 GB, for wt103). With chunk 0 the scores of the whole vocabulary are one batch x vocabulary
    matrix (17 MB for 16 envs): two matrix products per step. With chunk N the softmax-weighted sum is
    streamed over chunks of N words with an online softmax (running max, normaliser and weighted sum),
    so no scores matrix larger than N x batch exists. The result is a function of the observation, so
    it is cached (ObservationCache): only observations not seen before are computed. The retrieval
    stays in float32 whatever --frozen-dtype says: beta (100) would magnify bfloat16's rounding of the
    cosine. `tokens` is the id of the most attended word: the memory's text."""

    tokens_per_step = 1

    def __init__(self, word_emb, n_token, obs_hw, beta, chunk, seed, cache_size=0):
        super().__init__()
        self.beta, self.chunk, self.obs_hw = float(beta), int(chunk), tuple(obs_hw)
        device = word_emb.emb_projs[0].device
        self.d_model = word_emb.d_model
        embeddings = torch.empty(n_token, self.d_model, device=device)
        with torch.no_grad():  # in chunks: no intermediate of the whole vocabulary's size
            for i in range(0, n_token, 16384):
                embeddings[i : i + 16384] = word_emb(torch.arange(i, min(i + 16384, n_token), device=device))
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.register_buffer("embedding_norms", embeddings.norm(dim=-1), persistent=False)
        # drawn on the CPU from its own generator: the same on every device, and the global RNG
        # streams (agent initialisation, action sampling) are left as they are
        generator = torch.Generator().manual_seed(seed)
        shape = (self.d_model, self.obs_hw[0] * self.obs_hw[1])
        projection = torch.normal(0.0, 1 / math.sqrt(self.d_model), shape, generator=generator)
        self.register_buffer("projection", projection.to(device), persistent=False)
        self.top_weight_sum, self.top_weight_count = 0.0, 0
        self.cache = ObservationCache(cache_size)
        self.last_top_weight = None

    def project(self, obs):
        """uint8 (batch, H, W, 3) array or tensor -> projected observations (batch, d_model)."""
        images = torch.as_tensor(obs).to(self.projection.device)
        pixels = (images.float() / 255.0).mean(dim=-1).flatten(1)  # the colour channels are averaged
        return pixels @ self.projection.T

    def retrieve(self, x):
        """(soft tokens (batch, d_model), most attended token ids (batch,), its softmax weight (batch,))
        for projected observations x (batch, d_model)."""
        if not 0 < self.chunk < self.embeddings.shape[0]:
            sims = (x @ self.embeddings.T) / (x.norm(dim=-1, keepdim=True) * self.embedding_norms + 1e-8)
            weights = (self.beta * sims).softmax(dim=1)
            best = weights.argmax(dim=1)  # the first of equal maxima
            return weights @ self.embeddings, best, weights.gather(1, best[:, None])[:, 0]
        return self.retrieve_streamed(x)

    def retrieve_streamed(self, x):
        """retrieve, one vocabulary chunk at a time."""
        bsz = x.shape[0]
        x_norm = x.norm(dim=-1, keepdim=True)
        run_max = x.new_full((bsz,), -math.inf)  # running max of the logits
        run_sum = x.new_zeros(bsz)  # running sum of exp(logit - run_max)
        run_out = x.new_zeros(bsz, self.d_model)  # running sum of exp(logit - run_max) * embedding
        best = torch.zeros(bsz, dtype=torch.long, device=x.device)
        best_logit = x.new_full((bsz,), -math.inf)
        for start in range(0, self.embeddings.shape[0], self.chunk):
            emb = self.embeddings[start : start + self.chunk]
            norms = self.embedding_norms[start : start + self.chunk]
            logits = self.beta * (x @ emb.T) / (x_norm * norms[None, :] + 1e-8)  # (batch, chunk)
            chunk_max, chunk_arg = logits.max(dim=1)
            better = chunk_max > best_logit  # strict: the first of equal maxima wins, as argmax
            best = torch.where(better, chunk_arg + start, best)
            best_logit = torch.where(better, chunk_max, best_logit)
            new_max = torch.maximum(run_max, chunk_max)
            rescale = torch.exp(run_max - new_max)  # 0 for the first chunk (run_max is -inf)
            weights = torch.exp(logits - new_max[:, None])
            run_sum = run_sum * rescale + weights.sum(dim=1)
            run_out = run_out * rescale[:, None] + weights @ emb
            run_max = new_max
        return run_out / run_sum[:, None], best, torch.exp(best_logit - run_max) / run_sum

    @torch.no_grad()
    def forward(self, obs):
        soft, best, top_weight = self.cache(obs, self.encode)
        self.last_top_weight = top_weight  # enjoy.py shows it beside the word
        self.top_weight_sum += float(top_weight.sum())
        self.top_weight_count += top_weight.numel()
        return soft[None], best[:, None]

    def encode(self, obs):
        return self.retrieve(self.project(obs))

    def log_scalars(self):
        """Mean softmax weight of the most attended word since the last call: near 1 the retrieval is
        one word per step (large beta), near 1/n_token it is the vocabulary's mean (small beta)."""
        if not self.top_weight_count:
            return self.cache.log_scalars()
        mean = self.top_weight_sum / self.top_weight_count
        self.top_weight_sum, self.top_weight_count = 0.0, 0
        return {"charts/hopfield_top_weight": mean} | self.cache.log_scalars()

    def encoder_state(self):
        return {"projection": self.projection.cpu()}  # drawn at random: saved, so a run resumes with it

    def load_encoder_state(self, state):
        projection = state.get("projection") if isinstance(state, dict) else None
        if not isinstance(projection, torch.Tensor):
            fail("the checkpoint holds no FrozenHopfield projection (was it written by helm_ppo.py?)")
        if tuple(projection.shape) != tuple(self.projection.shape):
            fail(
                f"the checkpoint's FrozenHopfield projection is {tuple(projection.shape)}, this model needs "
                f"{tuple(self.projection.shape)} (d_model x H*W pixels): another Transformer-XL or environment"
            )
        self.projection.copy_(projection.to(self.projection))
        self.cache = ObservationCache(self.cache.size)  # what it holds was computed with the old projection


def build_memory(args, device, verbose=True, may_write=True):
    """(frozen Transformer-XL, its vocabulary, frozen encoder) for these arguments (it writes nothing, whatever
    may_write says)."""
    trxl, vocab = build_trxl(args.trxl_model, args.n_layer, args.mem_len, device)
    # the projection's input size is H*W. The probe is not closed: Memory Gym's close() quits pygame, which
    # would take the surfaces of the envs already running with it
    obs_hw = make_env(args.env_id, 0, False, "probe")().observation_space.shape[:2]
    encoder = FrozenHopfield(
        trxl.word_emb, len(vocab), obs_hw, args.beta, args.hopfield_chunk, args.seed, args.observation_cache_size
    )
    trxl.to(resolve_frozen_dtype(args.frozen_dtype, device))  # after the encoder: its embeddings stay float32
    if verbose:
        chunks = f"in chunks of {args.hopfield_chunk}" if args.hopfield_chunk else "at once"
        print(
            f"FrozenHopfield: {obs_hw[0]}x{obs_hw[1]} pixels -> {trxl.d_model} dims, "
            f"softmax(beta={args.beta:g} * cosine) over all {len(vocab):,} Transformer-XL tokens {chunks}"
        )
    return trxl, vocab, encoder


# [end algorithm-specific]
# ---------------------------------------------------------------------------------------------
# The trainable agent: CNN query encoder, actor and critic, as in the original.
# ---------------------------------------------------------------------------------------------


def layer_init(layer, gain=2**0.5, init=nn.init.orthogonal_):
    init(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_shape, action_dims, d_model):
        super().__init__()
        self.action_dims = tuple(action_dims)  # one categorical per action dimension, as CleanRL's ppo_trxl
        h, w, _ = obs_shape
        k1, s1 = (8, 4) if h > 9 else (4, 2)
        k2, s2 = (4, 2) if w > 9 else (2, 1)
        relu_gain = nn.init.calculate_gain("relu")
        conv = nn.Sequential(
            layer_init(nn.Conv2d(3, 64, k1, s1), relu_gain, nn.init.xavier_uniform_),  # channel scale 4
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 128, k2, s2), relu_gain, nn.init.xavier_uniform_),
            nn.ReLU(),
            nn.Flatten(),
        )
        n_flat = conv(torch.zeros(1, 3, h, w)).shape[1]
        self.query = nn.Sequential(
            conv, layer_init(nn.Linear(n_flat, d_model), relu_gain, nn.init.xavier_uniform_), nn.ReLU()
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(2 * d_model, 128)),
            nn.LayerNorm(128, elementwise_affine=False),
            nn.ReLU(),
            layer_init(nn.Linear(128, sum(self.action_dims))),
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(2 * d_model, 512)),
            nn.LayerNorm(512, elementwise_affine=False),
            nn.ReLU(),
            layer_init(nn.Linear(512, 1)),
        )

    def features(self, trxl_out, obs):
        query = self.query(obs.permute(0, 3, 1, 2).float() / 255.0)
        return torch.cat([trxl_out, query], dim=-1)

    def get_value(self, trxl_out, obs):
        return self.critic(self.features(trxl_out, obs))

    def get_action_and_value(self, trxl_out, obs, action=None):
        """action and its log-probability per action dimension (batch, n_dims), the entropy summed over the
        dimensions (batch,), the value (batch, 1). A Discrete action space has one dimension."""
        x = self.features(trxl_out, obs)
        logits = self.actor(x)
        # not validated: non-finite logits (diverged weights) must reach the non-finite guard, not raise here
        probs = [Categorical(logits=part, validate_args=False) for part in logits.split(self.action_dims, dim=-1)]
        if action is None:
            # non-finite logits cannot be sampled either: take action 0; the losses on this rollout will be
            # non-finite as well, and the guard skips those updates
            finite = torch.isfinite(logits).all()
            action = torch.stack(
                [p.sample() if finite else logits.new_zeros(logits.shape[:-1], dtype=torch.long) for p in probs], -1
            )
        logprob = torch.stack([p.log_prob(a) for p, a in zip(probs, action.unbind(-1))], dim=-1)
        entropy = torch.stack([p.entropy() for p in probs], dim=-1).sum(-1)
        return action, logprob, entropy, self.critic(x)


class Laps:
    """Wall time of each phase of the training loop: lap(name) adds the time since the previous lap
    to that phase. Logged per update as perf/<phase>_s, so a run shows where its time goes. On a GPU
    a phase ends when its work is queued, not done: the phases shift, their sum stays right."""

    def __init__(self):
        self.totals, self.last = collections.defaultdict(float), time.perf_counter()
        self.cpu_start = time.process_time()

    def __call__(self, name):
        now = time.perf_counter()
        self.totals[name] += now - self.last
        self.last = now

    def pop(self):
        """(the phases' totals, the process's CPU time) since the last pop, and a fresh start."""
        totals, self.totals = dict(self.totals), collections.defaultdict(float)
        cpu, self.cpu_start = time.process_time() - self.cpu_start, time.process_time()
        return totals, cpu


# ---------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain data only, read back with torch.load(weights_only=True).
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path, state):
    # serialized in memory, written by Python: torch.save reports a full disk as RuntimeError, not OSError
    buffer = io.BytesIO()
    torch.save(state, buffer)
    prepare_embeddings.write_atomically(path, lambda f: f.write(buffer.getbuffer()))


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


class Checkpoints:
    """Writes the run's checkpoints into run_dir. What stays fixed during training (arguments, names,
    the agent and optimizer objects) is given once; each save adds a training_state()."""

    def __init__(self, run_dir, writer, run_info, agent, optimizer):
        self.run_dir, self.writer, self.run_info = run_dir, writer, run_info
        self.agent, self.optimizer = agent, optimizer

    def save(self, name, state):
        self.writer.flush()  # the log holds all that the checkpoint covers, even if the process is killed next
        weights = {"agent": self.agent.state_dict(), "optimizer": self.optimizer.state_dict()}
        save_checkpoint(self.run_dir / name, {"format": CHECKPOINT_FORMAT, **self.run_info, **weights, **state})

    def save_and_exit(self, signum, state):
        self.save("checkpoint.pt", state)
        self.writer.close()
        ignore_signals()
        resume = self.run_dir / "checkpoint.pt"
        print(f"\ninterrupted by signal {signum}; resume with --resume {resume}", file=sys.stderr)
        sys.exit(128 + signum)


class StopRequest:
    """Catches SIGINT/SIGTERM (Ctrl-C, preemption) so that the loop can finish the env step or update
    under way, save and exit; `signum` is the first signal received (None: none yet)."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.catch)

    def catch(self, signum, frame):
        self.signum = self.signum or signum


class VideoLog:
    """Hands the videos that RecordVideo writes into video_dir to wandb, each once. wandb's own hook
    (wandb.init(monitor_gym=True)) fails with gymnasium 1.x's RecordVideo."""

    def __init__(self, video_dir):
        self.video_dir = video_dir
        self.logged = self.on_disk()  # a resumed run's earlier videos were logged by the earlier process

    def on_disk(self):
        # with the modification time: a resumed run's recorder writes the same file names again
        return {path: path.stat().st_mtime_ns for path in sorted(self.video_dir.glob("*.mp4"))}

    def log_new(self):
        import wandb

        on_disk = self.on_disk()
        for path, mtime in on_disk.items():
            if self.logged.get(path) != mtime:
                wandb.log({"videos": wandb.Video(str(path), format="mp4")})
        self.logged = on_disk


def load_checkpoint(path):
    return check_checkpoint(read_checkpoint(path), path)


def read_checkpoint(path):
    """A checkpoint of any of the three scripts, read once (enjoy.py then checks it with its own script)."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not a torch file at all
        fail(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint of these scripts")
    return ckpt


# what every checkpoint holds, and of which type (bool is an int to Python, never to a checkpoint)
CHECKPOINT_KEYS = {
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


def is_number(value, low=-sys.float_info.max, high=sys.float_info.max):
    """A real number (no bool) in [low, high]; by default any finite one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def check_checkpoint(ckpt, path):
    """Everything --resume and enjoy.py take from a checkpoint, checked for structure, types, ranges,
    finiteness and consistency before anything is built or written (docs/reliability.md, trust model)."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint of these scripts")
    if ckpt.get("algorithm") != ALGORITHM:
        fail(f"checkpoint {path} is of {ckpt.get('algorithm')}_ppo.py, not {ALGORITHM}_ppo.py")
    for key, kind in CHECKPOINT_KEYS.items():
        if key not in ckpt or not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            found = type(ckpt[key]).__name__ if key in ckpt else "missing"
            fail(f"checkpoint {path} is malformed: {key} is {found}")
    args = checkpoint_args(ckpt["args"], path)
    validate_run_name(ckpt["run_name"], f"checkpoint {path}: run_name")
    if ckpt["wandb_id"] is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ckpt["wandb_id"]):
        fail(f"checkpoint {path}: wandb_id {ckpt['wandb_id']!r} is not a wandb run id")
    prepare_embeddings.validate_tensors(ckpt["agent"], f"checkpoint {path}: the agent's weights")
    prepare_embeddings.validate_tensors(ckpt["encoder"], f"checkpoint {path}: the encoder state")
    state, groups = ckpt["optimizer"].get("state"), ckpt["optimizer"].get("param_groups")
    if not (isinstance(state, dict) and isinstance(groups, list) and groups):
        fail(f"checkpoint {path}: the optimizer state is malformed")
    for group in groups:
        if not isinstance(group, dict) or not is_number(group.get("lr"), 0, torch.finfo(torch.float32).max):
            fail(f"checkpoint {path}: the optimizer's learning rate is missing or not a finite number >= 0")
    for i, tensors in state.items():
        prepare_embeddings.validate_tensors(tensors, f"checkpoint {path}: the optimizer state of parameter {i}")
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


def checkpoint_args(saved, path):
    """The Args of a checkpoint, each of its declared type and within range."""
    fields = {field.name: field.type for field in dataclasses.fields(Args)}
    unknown = [str(name) for name in saved if name not in fields]
    if unknown:
        fail(f"checkpoint {path} was written with other arguments than this script has: {', '.join(unknown)}")
    for name, value in saved.items():
        if not value_fits(value, fields[name]):
            fail(f"checkpoint {path}: argument {name} is {repr(value)[:60]}, not {fields[name]}")
    args = Args(**saved)
    try:
        check_args(args)
    except SystemExit as e:
        fail(f"checkpoint {path} holds an argument out of range: {str(e.code).removeprefix('error: ')}")
    return args


def may_write_output_dirs(args, saved):
    """A checkpoint from elsewhere cannot choose where files are written: the directories its arguments (`saved`)
    name for writing (OUTPUT_DIRS) are written to only if they lie under the working directory, or if the
    command line chose another one; otherwise they are only read (SHELM: a missing embeddings file is an error)."""
    paths = [Path(getattr(args, name)) for name in OUTPUT_DIRS]
    inside = [not path.is_absolute() and ".." not in path.parts for path in paths]
    return all(ok or getattr(args, name) != saved.get(name) for ok, name in zip(inside, OUTPUT_DIRS))


def continues_in_place(run_dir, resume, ckpt):
    """Whether resuming `resume` may go on in its run's directory: only if the run's checkpoint.pt is not ahead
    of it (going on from model_best.pt of a run that went further would move the run's files back in time)."""
    latest = run_dir / "checkpoint.pt"
    if not latest.exists() or latest.samefile(resume):
        return True
    try:
        step = torch.load(latest, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # noqa: BLE001 - whatever it holds, it is not to be overwritten
        return False
    return isinstance(step, int) and step <= ckpt["global_step"]


def claim_run_dir(run_name, new):
    """runs/<run_name>, locked for this process's life: a second process on the same run gets one line instead
    of mixing its files in. A new run's directory is created here, never reused: if two runs started in the
    same second take the name, the second gets it with a suffix -2 (-3, ...)."""
    try:
        if new:
            (RUNS / run_name).parent.mkdir(parents=True, exist_ok=True)
            for n in itertools.count(1):
                run_dir = RUNS / (run_name if n == 1 else f"{run_name}-{n}")
                try:
                    run_dir.mkdir()
                    break
                except FileExistsError:
                    continue
        else:
            run_dir = RUNS / run_name
            run_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(run_dir / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        fail(f"cannot create the run directory {RUNS / run_name} in {os.getcwd()}: {e.strerror or e}")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"{run_dir} is in use by another process (it holds {run_dir / '.lock'}); one run, one process")
    return run_dir, lock


def ignore_signals():
    """Once the run is saved for good: Python drops its handlers while it shuts down, so a signal then would
    kill the process (status -15, no message) after all was done; ignored, the run ends as it was going to."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def interrupted_before_training(signum, frame):
    """SIGINT/SIGTERM before the run directory exists: nothing to save, stop at once with one line."""
    print(f"interrupted by signal {signum} before training started; no run was written", file=sys.stderr)
    raise SystemExit(128 + signum)


def load_trained(agent, encoder, ckpt, path):
    try:
        agent.load_state_dict(ckpt["agent"])
        encoder.load_encoder_state(ckpt["encoder"])
    except (RuntimeError, KeyError, ValueError) as e:
        fail(f"checkpoint {path} does not match this model ({' '.join(str(e).split())[:200]})")


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


def log_perf(writer, phases, cpu_seconds, batch_size, device, global_step):
    """perf/<phase>_s of one update, perf/rollout_s and perf/update_sps (this update's steps per second
    of wall time, the previous update's logging included), perf/cpu_s (the process's CPU time in that
    while, all threads: with one thread, what the update costs on a core of its own), and the peak CUDA
    memory on a GPU."""
    writer.add_scalar("perf/cpu_s", cpu_seconds, global_step)
    for name, seconds in phases.items():
        writer.add_scalar(f"perf/{name}_s", seconds, global_step)
    rollout = sum(v for k, v in phases.items() if k in ("agent", "env", "encoder", "trxl", "rollout_other"))
    writer.add_scalar("perf/rollout_s", rollout, global_step)
    writer.add_scalar("perf/update_sps", batch_size / sum(phases.values()), global_step)
    if device.type == "cuda":
        writer.add_scalar("perf/cuda_max_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30, global_step)


def versions():
    import importlib.metadata as md

    return {p: md.version(p) for p in ["torch", "gymnasium", "minigrid", "open_clip_torch"]} | {
        "python": sys.version.split()[0]
    }


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted_before_training)
    args = tyro.cli(Args)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        args = resume_args(ckpt, args.resume)
    check_args(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.total_timesteps % args.batch_size:
        print(
            f"--total-timesteps {args.total_timesteps} is not a multiple of the batch size {args.batch_size}: "
            f"{args.num_iterations} updates, {args.num_iterations * args.batch_size} steps"
        )
    run_name = ckpt["run_name"] if ckpt else new_run_name(args)
    new_run = ckpt is None or not continues_in_place(RUNS / run_name, args.resume, ckpt)
    if ckpt and new_run:
        run_name = new_run_name(args)
        print(
            f"{RUNS / ckpt['run_name'] / 'checkpoint.pt'} is further than {args.resume}: going on in a new run, "
            f"{RUNS / run_name}, so that nothing of {ckpt['run_name']} is overwritten"
        )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # everything that can fail on bad input happens before anything is written
    envs, reward_norm = make_envs(args, run_name)
    obs_shape = envs.single_observation_space.shape
    trxl, vocab, encoder = build_memory(args, device, may_write=not ckpt or may_write_output_dirs(args, ckpt["args"]))
    agent = Agent(obs_shape, action_dims(envs.single_action_space), trxl.d_model).to(device)
    optimizer = torch.optim.AdamW(agent.parameters(), lr=args.learning_rate, eps=1e-8)
    start_iteration, global_step, best_return = 1, 0, -math.inf
    recent_returns = collections.deque(maxlen=100)
    wandb_id = None
    if ckpt:
        load_trained(agent, encoder, ckpt, args.resume)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            fail(f"checkpoint {args.resume}: the optimizer state does not match this model ({e})")
        start_iteration, global_step, best_return = (
            ckpt["iteration"] + 1,
            ckpt["global_step"],
            float(ckpt["best_return"]),
        )
        recent_returns.extend(ckpt["recent_returns"])
        reward_norm.return_rms.mean, reward_norm.return_rms.var, reward_norm.return_rms.count = ckpt["reward_rms"]
        wandb_id = None if new_run else ckpt["wandb_id"]
        try:
            set_rng_state(ckpt["rng"])
        except (TypeError, ValueError, RuntimeError, IndexError) as e:
            fail(f"checkpoint {args.resume}: the RNG states are malformed ({' '.join(str(e).split())[:200]})")
        print(f"resuming {run_name} at step {global_step} (update {start_iteration - 1} of {args.num_iterations})")
    n_frozen = sum(p.numel() for p in trxl.parameters())
    print(f"{ALGORITHM}: Transformer-XL {args.trxl_model}, {trxl.n_layer} layers, {n_frozen:,} frozen parameters")

    stop = StopRequest()  # from here on a signal is saved for: the run directory is about to exist
    # the first write: the run directory, this process's alone from now on
    run_dir, run_lock = claim_run_dir(run_name, new_run)
    run_name = run_dir.relative_to(RUNS).as_posix()
    if not new_run and not continues_in_place(run_dir, args.resume, ckpt):
        fail(f"{run_dir / 'checkpoint.pt'} was written by another process meanwhile; resume it instead")

    videos = None
    if args.track:
        import wandb

        # wandb logs what the SummaryWriter below writes (sync_tensorboard=True would wait 10 s at the end
        # to guess the log directory)
        wandb.tensorboard.patch(root_logdir=str(run_dir))
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            config=vars(args),
            name=run_name,
            id=wandb_id,  # None: a new run; a resumed run continues its checkpoint's
            resume="allow",
            save_code=True,
        )
        wandb_id = wandb.run.id
        if args.capture_video:
            videos = VideoLog(Path("videos") / run_name)
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops what an interrupted run logged after its last checkpoint: the steps after
    # global_step (the losses of the checkpoint's last update are logged at global_step itself)
    try:
        writer = SummaryWriter(str(run_dir), purge_step=global_step + 1 if ckpt else None)
    except OSError as e:
        fail(f"cannot write the logs in {run_dir}: {e.strerror or e}")
    if not ckpt:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n{}".format("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
        )
    meta = {"algorithm": ALGORITHM, "env_id": args.env_id, "versions": versions()}
    run_info = {"algorithm": ALGORITHM, "args": asdict(args), "meta": meta, "run_name": run_name, "wandb_id": wandb_id}
    checkpoints = Checkpoints(run_dir, writer, run_info, agent, optimizer)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, dtype=torch.uint8, device=device)
    trxl_outs = torch.zeros((args.num_steps, args.num_envs, trxl.d_model), device=device)
    # one column per action dimension (one for Discrete), as CleanRL's ppo_trxl
    actions = torch.zeros((args.num_steps, args.num_envs, len(agent.action_dims)), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs, len(agent.action_dims)), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)

    # TRY NOT TO MODIFY: start the game; a resumed run starts fresh episodes (envs are not saved)
    start_step, start_time = global_step, time.time()
    next_obs_np, _ = envs.reset(seed=args.seed + (start_iteration - 1) * args.num_envs)
    next_obs = torch.from_numpy(next_obs_np).to(device)
    next_done = torch.zeros(args.num_envs, device=device)
    mems, memory_mask = init_memory(trxl, args.num_envs, args.memory_reset, device)
    with torch.no_grad():
        trxl_in, next_tokens = encoder(next_obs_np)
        trxl_out, mems, memory_mask = trxl(trxl_in, mems, memory_mask)
        next_trxl_out = memory_readout(trxl_out, args.ablate_memory)
    # env 0's memory as text, one line per step: the episode under way, and the last one finished (logged)
    episode_text, last_episode_text = [], None
    nonfinite_in_row = 0
    progress = None
    if args.progress_bar:
        from tqdm import tqdm

        progress = tqdm(
            total=args.num_iterations * args.batch_size, initial=global_step, unit="step", dynamic_ncols=True
        )
    lap = Laps()

    for iteration in range(start_iteration, args.num_iterations + 1):
        lap("logging")  # the previous update's logging and checkpoints
        # where a run interrupted during this iteration resumes: the end of the previous update
        resume_state = training_state(iteration - 1, global_step, best_return, recent_returns, reward_norm, encoder)
        if stop.signum:
            checkpoints.save_and_exit(stop.signum, resume_state)
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

        for step in range(0, args.num_steps):
            if stop.signum:  # the update has not run yet: resume_state still describes the weights
                checkpoints.save_and_exit(stop.signum, resume_state)
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done
            trxl_outs[step] = next_trxl_out
            episode_text.append(" ".join(vocab[t] for t in next_tokens[0].tolist()))  # env 0's memory words

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_trxl_out, next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob
            lap("agent")

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs_np, reward, terminations, truncations, infos = envs.step(
                env_actions(action, envs.single_action_space)
            )
            next_done_np = np.logical_or(terminations, truncations)
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device).view(-1)
            next_obs = torch.from_numpy(next_obs_np).to(device)
            next_done = torch.as_tensor(next_done_np, dtype=torch.float32, device=device)
            lap("env")

            # the next observation into the memory; where an episode has just ended, that observation is the
            # new episode's first, so the env's memory is reset before it
            with torch.no_grad():
                mems, memory_mask = reset_memory(mems, memory_mask, next_done.bool(), args.memory_reset)
                trxl_in, next_tokens = encoder(next_obs_np)
                lap("encoder")
                trxl_out, mems, memory_mask = trxl(trxl_in, mems, memory_mask)
                next_trxl_out = memory_readout(trxl_out, args.ablate_memory)
                lap("trxl")

            if "episode" in infos:
                for i in np.nonzero(infos["_episode"])[0]:
                    r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                    recent_returns.append(r)
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)
            if next_done_np[0]:
                last_episode_text = "  \n".join(f"{t}: {words}" for t, words in enumerate(episode_text))
                episode_text = []
            if progress is not None:
                progress.update(args.num_envs)
            lap("rollout_other")

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_trxl_out, next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards).to(device)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - dones[t + 1]
                    nextvalues = values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values

        # flatten the batch; the frozen models are not run again: their outputs are in trxl_outs
        b_obs = obs.reshape((-1,) + obs_shape)
        b_trxl_outs = trxl_outs.reshape(-1, trxl.d_model)
        b_logprobs = logprobs.reshape(-1, len(agent.action_dims))
        b_actions = actions.reshape(-1, len(agent.action_dims))
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # Optimizing the policy and value network
        clipfracs = []
        for _ in range(args.update_epochs):
            b_inds = torch.randperm(args.batch_size, device=device)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]

                _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                    b_trxl_outs[mb_inds], b_obs[mb_inds], b_actions[mb_inds]
                )
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                mb_advantages = mb_advantages[:, None]  # each action dimension's ratio is clipped on its own

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss: plain mean squared error as the original (CleanRL halves it)
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss = torch.max(v_loss_unclipped, v_loss_clipped).mean()
                else:
                    v_loss = ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    # one bad minibatch must not poison the weights: skip it, give up if it persists
                    nonfinite_in_row += 1
                    message = f"non-finite loss or gradient at step {global_step}: update skipped"
                    warnings.warn(f"{message} ({nonfinite_in_row} in a row)", stacklevel=1)
                    if nonfinite_in_row >= args.nonfinite_limit:
                        # saved as the end of this iteration: its rollout is complete, and the counters in the
                        # checkpoint must say so (global_step == iteration * batch_size) for a resume to add up
                        state = training_state(
                            iteration, global_step, best_return, recent_returns, reward_norm, encoder
                        )
                        checkpoints.save("checkpoint_nonfinite.pt", state)
                        writer.close()
                        last = run_dir / "checkpoint.pt"
                        before = (
                            f"last periodic checkpoint: {last}" if last.exists() else "no periodic checkpoint before it"
                        )
                        fail(
                            f"{nonfinite_in_row} non-finite losses or gradients in a row at step {global_step}; "
                            f"state saved to {run_dir / 'checkpoint_nonfinite.pt'} ({before})"
                        )
                    continue
                nonfinite_in_row = 0
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        lap("update")
        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        log_perf(writer, *lap.pop(), args.batch_size, device, global_step)
        for key, value in encoder.log_scalars().items():
            writer.add_scalar(key, value, global_step)
        if args.log_tokens_every and iteration % args.log_tokens_every == 0 and last_episode_text:
            writer.add_text("memory/episode_tokens", last_episode_text, global_step)
        if videos is not None:
            videos.log_new()
        mean_return = float(np.mean(recent_returns)) if recent_returns else float("nan")
        if progress is not None:
            progress.set_postfix(SPS=sps, ret=f"{mean_return:.3f}")

        new_best = bool(recent_returns) and mean_return > best_return
        if new_best:
            best_return = mean_return
        state = training_state(iteration, global_step, best_return, recent_returns, reward_norm, encoder)
        if new_best and args.save_model:
            checkpoints.save("model_best.pt", state)
        # not while non-finite updates are being skipped: the weights may have diverged, and checkpoint.pt
        # is the last good state that the non-finite abort points to
        if args.checkpoint_every and iteration % args.checkpoint_every == 0 and not nonfinite_in_row:
            checkpoints.save("checkpoint.pt", state)

    final = training_state(args.num_iterations, global_step, best_return, recent_returns, reward_norm, encoder)
    checkpoints.save("checkpoint.pt", final)
    if args.save_model or args.upload_model:
        checkpoints.save("model_final.pt", final)
        print(f"model saved to {run_dir / 'model_final.pt'}")
    if progress is not None:
        progress.close()
    envs.close()  # the video under way, if any, is written now
    if videos is not None:
        videos.log_new()
    if args.upload_model:
        # enjoy.py watches agents, so it evaluates and uploads them too (docs/enjoy.md); only then imported
        import enjoy

        episodic_returns, video = enjoy.evaluate(run_dir / "model_final.pt", args.eval_episodes, cuda=args.cuda)
        for idx, episodic_return in enumerate(episodic_returns):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)
    writer.close()
    if args.upload_model:
        repo_name = f"{args.env_id}-{args.exp_name}-seed{args.seed}"
        repo_id = f"{args.hf_entity}/{repo_name}" if args.hf_entity else repo_name
        enjoy.push_to_hub(run_dir / "model_final.pt", repo_id, episodic_returns, video)
    if args.track:
        wandb.finish()  # the last tensorboard events synced before the process ends
    ignore_signals()
