# [algorithm-specific]
"""HELMv2 (Paischer et al.) with PPO, in one file.

A frozen CLIP RN50 embeds each observation; the embedding, standardised per dimension and rescaled to
the per-dimension mean and std of the Transformer-XL's word embeddings, is fed as one input embedding
per step to a frozen, pretrained Transformer-XL, whose output for the current step is the agent's
memory. Only the CNN query encoder, the actor and the critic train. For reading the memory, each input
is shown as the vocabulary word whose embedding is nearest to it.

    python helmv2_ppo.py --env-id MiniGrid-MemoryS11-v0 --n-layer 2

Docs: docs/helmv2_ppo.md. The sections marked [algorithm-specific] are what differ from helm_ppo.py
and shelm_ppo.py; everything else is the same code in the three scripts (tests/test_drift.py). What a reader of the
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

ALGORITHM = "helmv2"
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
    learning_rate: float = 3e-4
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
    # HELMv2: CLIP + rescaling to the word-embedding statistics
    clip_model: str = "RN50"
    """open_clip model name whose embeddings have the Transformer-XL's d_model, or tiny-random (tests only)"""
    clip_pretrained: str = "openai"
    """open_clip pretrained tag, a local weights file, or random (random weights: speed benchmarks only)"""
    rescale: Literal["running", "batch"] = "running"
    """standardise CLIP embeddings with running statistics (running) or across the envs of each step (batch)"""
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
    if args.rescale == "batch" and args.num_envs < 2:
        fail(
            "--rescale batch standardises each step across the envs and needs --num-envs >= 2 (the std of one "
            f"sample is NaN), got {args.num_envs}; use --rescale running"
        )
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
# HELMv2's frozen encoder: CLIP image embedding, standardised per dimension and rescaled to the
# mean and std of the Transformer-XL's word embeddings -> one Transformer-XL input per step.
# ---------------------------------------------------------------------------------------------


def merge_moments(count, mean, var, x):
    """(count, mean, population variance) of the samples summarised by (count, mean, var) together
    with the rows of x, in float64: the parallel update of Chan et al., exact whatever the batch sizes."""
    x = x.double()
    n = x.shape[0]
    if n == 0:
        return count, mean, var
    total = count + n
    x_mean = x.mean(0)
    delta = x_mean - mean
    m2 = var * count + x.var(0, unbiased=False) * n + delta**2 * (count * n / total)
    return total, mean + delta * (n / total), m2 / total


@torch.no_grad()
def word_embedding_stats(word_emb, chunk=16384):
    """Per-dimension mean and std (unbiased, as torch.std) of the input embeddings of the whole
    vocabulary, word_emb(arange(n_token)), and each word's embedding norm; chunk by chunk, since the
    wt103 matrix alone is 267,735 x 1024 floats (1 GB)."""
    n_token, device = word_emb.cutoff_ends[-1], word_emb.emb_projs[0].device
    count = torch.zeros((), dtype=torch.float64, device=device)
    mean = var = torch.zeros(word_emb.d_model, dtype=torch.float64, device=device)
    norms = []
    for start in range(0, n_token, chunk):
        emb = word_emb(torch.arange(start, min(start + chunk, n_token), device=device))
        count, mean, var = merge_moments(count, mean, var, emb)
        norms.append(emb.norm(dim=-1))
    std = (var * count / (count - 1)).sqrt()
    return mean.float(), std.float(), torch.cat(norms)


@torch.no_grad()
def nearest_tokens(x, word_emb, word_norms, chunk=16384, k=1):
    """Ids (batch, k) of the k vocabulary words whose input embeddings are most cosine-similar to each row
    of x, most similar first (training uses the nearest; enjoy.py shows a few).

    The adaptive embedding of word i of cluster c is s * P_c e_i, so x . E_i = (s P_c^T x) . e_i: every
    cluster is scored in its own narrow width, a chunk of words at a time, without building the
    vocabulary's embeddings or a vocabulary x batch matrix."""
    best = torch.full((x.shape[0], k), -math.inf, device=x.device)
    ids = torch.zeros(x.shape[0], k, dtype=torch.long, device=x.device)
    x = F.normalize(x.float(), dim=-1)
    for c, (emb, proj) in enumerate(zip(word_emb.emb_layers, word_emb.emb_projs)):
        lo = word_emb.cutoff_ends[c]
        y = (x.to(proj.dtype) @ proj) * word_emb.emb_scale  # in the embeddings' dtype (--frozen-dtype)
        for start in range(0, emb.num_embeddings, chunk):
            w = emb.weight[start : start + chunk]
            sims = (y @ w.T).float() / word_norms[lo + start : lo + start + len(w)].clamp_min(1e-12)
            value, index = sims.topk(min(k, len(w)), dim=1)
            # the best so far first: of equal similarities the lower id wins, as argmax
            best, order = torch.cat([best, value], dim=1).sort(dim=1, descending=True, stable=True)
            ids = torch.cat([ids, index + lo + start], dim=1).gather(1, order)
            best, ids = best[:, :k], ids[:, :k]
    return ids


class CLIPRescale(nn.Module):
    """Observations (uint8 numpy, batch x H x W x 3) -> Transformer-XL input embeddings (1, batch, d).

    CLIP's image embedding x is standardised per dimension and given the word embeddings' statistics,
    x_norm * we_std + we_mean, so that it looks to the language model like a word. rescale="batch"
    standardises with the current batch across envs (the original); rescale="running" with running
    statistics (float64) of all CLIP embeddings seen in training mode, updated with each batch before it
    is standardised and frozen in eval mode. The token returned is env 0's nearest vocabulary word.

    After load_encoder_state (a resumed run), the first batch is standardised with the restored
    statistics but not added to them: it is the first observation of the fresh episodes a resumed run
    starts, and stands in for the observation after the checkpoint's last step, which the statistics
    already count. So a resumed run counts what an uninterrupted one does, and resuming a finished run
    saves the statistics unchanged.

    CLIP's embeddings of the observations seen are cached (observation_cache.py): exact repeats skip CLIP.
    The standardisation comes after the cache, since its statistics move: the result is the same as
    without the cache, to rounding (CLIP then sees other batches)."""

    def __init__(self, clip, word_emb, rescale, chunk=16384, cache_size=0):
        super().__init__()
        # in a dict: not submodules, so not in checkpoints, and .train() leaves CLIP's BatchNorm in eval
        self.frozen = {"clip": clip, "word_emb": word_emb}
        self.rescale, self.chunk, self.tokens_per_step = rescale, chunk, 1
        we_mean, we_std, word_norms = word_embedding_stats(word_emb, chunk)
        self.register_buffer("we_mean", we_mean, persistent=False)
        self.register_buffer("we_std", we_std, persistent=False)
        self.register_buffer("word_norms", word_norms, persistent=False)
        d, device = word_emb.d_model, we_mean.device
        self.register_buffer("count", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("mean", torch.zeros(d, dtype=torch.float64, device=device))
        self.register_buffer("var", torch.zeros(d, dtype=torch.float64, device=device))  # population variance
        self.restored = False  # statistics just loaded: the next training batch is not added (see above)
        self.cache = observation_cache.ObservationCache(cache_size)

    def standardise(self, features):
        """CLIP embeddings (batch, d) float32 -> standardised per dimension (computed in float64)."""
        if self.rescale == "batch":
            if features.shape[0] < 2:
                fail(
                    "--rescale batch needs at least 2 observations per step (the std of one sample is NaN); "
                    "use --rescale running"
                )
            x = features.double()
            return ((x - x.mean(0)) / (x.std(0) + 1e-8)).float()
        if self.training and self.restored:
            self.restored = False
        elif self.training:
            self.count, self.mean, self.var = merge_moments(self.count, self.mean, self.var, features)
        elif self.count == 0:
            fail(
                "the running statistics of the CLIP embeddings are empty: "
                "load a trained checkpoint's encoder state before evaluating"
            )
        return ((features.double() - self.mean) / (self.var.sqrt() + 1e-8)).float()

    def embed(self, features):
        """CLIP embeddings (batch, d) -> Transformer-XL input embeddings (batch, d)."""
        return self.standardise(features) * self.we_std + self.we_mean

    @torch.no_grad()
    def forward(self, obs):
        (features,) = self.cache(obs, self.clip_features)
        x = self.embed(features)
        # the memory is logged as text for env 0 alone, and a search over the whole vocabulary for every
        # env would cost as much as the rest of the encoder: the nearest word of env 0's input only
        # a row's scores of a whole cluster are at most 160,000 numbers: one chunk per cluster, fewer kernels
        return x[None], nearest_tokens(x[:1], self.frozen["word_emb"], self.word_norms, chunk=2**20)

    def clip_features(self, obs):
        images = torch.from_numpy(obs).to(self.we_mean.device)
        return (frozen_models.clip_image_features(self.frozen["clip"], images),)

    def log_scalars(self):
        return self.cache.log_scalars()

    def encoder_state(self):
        if self.rescale == "batch":
            return {}  # nothing trained, drawn at random or accumulated: the models define it
        return {"count": self.count.cpu().clone(), "mean": self.mean.cpu().clone(), "var": self.var.cpu().clone()}

    def load_encoder_state(self, state):
        if self.rescale == "batch":
            if state:
                fail(
                    "the encoder state holds running statistics (trained with --rescale running) "
                    "but --rescale batch uses none"
                )
            return
        want = {"count": (), "mean": tuple(self.mean.shape), "var": tuple(self.var.shape)}
        if not isinstance(state, dict) or set(state) != set(want):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            fail(
                f"the encoder state has {keys} but --rescale running needs count, mean and var "
                "(trained with --rescale batch?)"
            )
        for key, shape in want.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                fail(
                    f"the encoder state's running {key} has shape {got}, but this model's CLIP embeddings need {shape}"
                )
            if not torch.isfinite(value).all() or (key != "mean" and (value < 0).any()):
                fail(f"the encoder state's running {key} holds negative or non-finite values")
        self.count, self.mean, self.var = (state[k].to(self.mean) for k in ("count", "mean", "var"))
        self.restored = bool(self.count > 0)


def build_memory(args, device, verbose=True, may_write=True):
    """(frozen Transformer-XL, its vocabulary, frozen encoder) for these arguments (it writes nothing, whatever
    may_write says)."""
    trxl, vocab = build_trxl(args.trxl_model, args.n_layer, args.mem_len, device)
    clip = frozen_models.load_clip(args.clip_model, args.clip_pretrained, device, tiny_kind="RN")
    with torch.no_grad():
        clip_dim = frozen_models.clip_image_features(
            clip, torch.zeros(1, 32, 32, 3, dtype=torch.uint8, device=device)
        ).shape[-1]
    if clip_dim != trxl.d_model:
        fail(
            f"CLIP {args.clip_model} embeds images in {clip_dim} dimensions but the Transformer-XL "
            f"{args.trxl_model} takes {trxl.d_model}; HELMv2 feeds one to the other (RN50's 1024 fits wt103)"
        )
    encoder = CLIPRescale(clip, trxl.word_emb, args.rescale, cache_size=args.observation_cache_size)
    # CLIP stays float32: the standardisation magnifies its small differences between observations, which
    # bfloat16 would round away; it runs only on observations the cache has not seen
    # after the word statistics: they stay float32
    trxl.to(frozen_models.resolve_frozen_dtype(args.frozen_dtype, device))
    if verbose:
        print(
            f"CLIP {args.clip_model} embeddings rescaled to the statistics of {len(vocab)} word embeddings "
            f"({args.rescale} standardisation)"
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
