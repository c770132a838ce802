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
and helmv2_ppo.py; everything else is the same code in the three scripts (tests/test_drift.py). What a reader of the
algorithm never needs (checkpoints, run directories, logging set-up, evaluation, where the frozen models
come from) lives once in the package helm_utils/ (docs/layout.md).
"""

import math

# [end algorithm-specific]
import operator
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import minigrid  # noqa: F401 - registers the MiniGrid environments
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions.categorical import Categorical

# [algorithm-specific]
from helm_utils import arguments, env_suites, fail, frozen_models, observation_cache, runs, timing

ALGORITHM = "helm"
# arguments naming a directory the script writes to (a checkpoint's values must stay under the working directory)
OUTPUT_DIRS = ()
# [end algorithm-specific]


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
    async_envs: bool = False
    """step the envs in worker processes (gymnasium's AsyncVectorEnv): the same run, faster where cores are many"""
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


def check_args(args):
    """One clear line for each argument out of range, before anything is built or written."""
    arguments.check_ppo_args(args)
    arguments.check_memory_args(args)
    # [algorithm-specific]
    if args.hopfield_chunk < 0:
        fail(f"--hopfield-chunk must be >= 0, got {args.hopfield_chunk}")
    arguments.check_float32(args.beta, "--beta", positive=True)  # beta * cosine is a float32 tensor
    # [end algorithm-specific]


def make_env(env_id, idx, capture_video, run_name, render_mode=None):
    def thunk():
        # MiniWorld, Memory Gym and Procgen are registered on first use (docs/environments.md)
        env = env_suites.make(env_id, render_mode="rgb_array" if capture_video and idx == 0 else render_mode)
        if isinstance(env.observation_space, gym.spaces.Dict) and "image" in env.observation_space.spaces:
            # MiniGrid as in the original: the agent's partial view rendered as 56x56 RGB pixels
            env = minigrid.wrappers.RGBImgPartialObsWrapper(env, tile_size=8)
            env = minigrid.wrappers.ImgObsWrapper(env)
        if isinstance(env.observation_space, gym.spaces.Dict) and "obs" in env.observation_space.spaces:
            # MiniWorld-Sign observes {obs: image, goal: box or key}; the original kept the image only. The
            # goal is fixed when the env is made (box, by default), so nothing is lost.
            env = gym.wrappers.TransformObservation(env, operator.itemgetter("obs"), env.observation_space["obs"])
        env_suites.check_spaces(env, env_id)  # RGB pixels and Discrete or MultiDiscrete actions, or one error line
        if capture_video and idx == 0:
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        return env

    return thunk


def make_envs(args, run_name):
    """Vector env that resets a finished episode within the same step, so the observation after a
    done is already the new episode's first one: no transition across a reset enters the buffer.
    With --async-envs each env steps in a process of its own (docs/benchmarks.md: the GPU's bound), which leaves
    the signals to the main process and stops the run in one line if it dies (helm_utils.env_suites)."""
    vector_env = env_suites.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    envs = vector_env(
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
    config, weights, vocab = frozen_models.trxl_source(source)  # hub id, local directory, or random weights
    frozen_models.check_supported(config, vocab, source, n_layer)
    if weights is None:  # random model: the same weights in every process, its layers a prefix of all 18
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            trxl = TransformerXL(config, n_layer, mem_len)  # the layers are drawn after the embeddings, in order
    else:
        trxl = TransformerXL(config, n_layer, mem_len)
        frozen_models.load_trxl_weights(trxl, weights, n_layer, source)
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
    it is cached (observation_cache.py): only observations not seen before are computed. The retrieval
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
        self.cache = observation_cache.ObservationCache(cache_size)
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
        # what the cache holds was computed with the old projection
        self.cache = observation_cache.ObservationCache(self.cache.size)


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
    # after the encoder: its embeddings stay float32
    trxl.to(frozen_models.resolve_frozen_dtype(args.frozen_dtype, device))
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


if __name__ == "__main__":
    script = sys.modules[__name__]  # this file: the package reads its Args, check_args, ALGORITHM and models
    args, ckpt = runs.parse(script)  # the command line, or with --resume the checkpoint's own arguments
    run = runs.Run(args, ckpt, script)  # its name; nothing is written until run.start() below

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # everything that can fail on bad input happens before anything is written
    envs, reward_norm = make_envs(args, run.name)
    obs_shape = envs.single_observation_space.shape
    trxl, vocab, encoder = build_memory(args, device, may_write=run.may_write_output_dirs)
    agent = Agent(obs_shape, env_suites.action_dims(envs.single_action_space), trxl.d_model).to(device)
    optimizer = torch.optim.AdamW(agent.parameters(), lr=args.learning_rate, eps=1e-8)
    n_frozen = sum(p.numel() for p in trxl.parameters())
    print(f"{ALGORITHM}: Transformer-XL {args.trxl_model}, {trxl.n_layer} layers, {n_frozen:,} frozen parameters")
    # a resumed run gets back its weights, optimizer, encoder state, reward normalisation, RNG states and counters;
    # then the run directory is claimed and the logs open (tensorboard, and wandb with --track)
    start_iteration, global_step = run.start(agent, optimizer, encoder, reward_norm)
    writer = run.writer

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
    lap = timing.Laps()  # where each update's time goes, logged as perf/*

    for iteration in range(start_iteration, args.num_iterations + 1):
        lap("logging")  # the previous update's logging and checkpoints
        run.update_starts(iteration, global_step)  # what a stop during this update saves: where it started
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

        for step in range(0, args.num_steps):
            run.exit_if_stopped()  # on SIGINT/SIGTERM: save where this update started, and exit
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
                env_suites.env_actions(action, envs.single_action_space)
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
                    run.recent_returns.append(r)  # their mean decides model_best.pt
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)
            if next_done_np[0]:
                last_episode_text = "  \n".join(f"{t}: {words}" for t, words in enumerate(episode_text))
                episode_text = []
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
                # one bad minibatch must not poison the weights: skip it (the run stops after --nonfinite-limit)
                if run.nonfinite(loss, grad_norm, iteration, global_step):
                    continue
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
        timing.log_perf(writer, *lap.pop(), args.batch_size, device, global_step)
        for key, value in encoder.log_scalars().items():
            writer.add_scalar(key, value, global_step)
        if args.log_tokens_every and iteration % args.log_tokens_every == 0 and last_episode_text:
            writer.add_text("memory/episode_tokens", last_episode_text, global_step)
        run.update_done(iteration, global_step)  # model_best.pt, checkpoint.pt every --checkpoint-every updates

    envs.close()  # the video under way, if any, is written now
    run.finish(global_step)  # the final checkpoints; with --upload-model the evaluation and the upload
