"""The original papers' baselines for HELM, HELMv2 and SHELM, trained from scratch, in one file.

- LSTM-PPO (the default): the scripts' CNN, then a trainable LSTM, then the actor and critic: the original
  code's "LSTM" (Impala-PPO) configurations. The LSTM's state is carried through the rollout and zeroed where
  an episode ends; the update re-runs the LSTM over each env's whole rollout, from the state that env had
  when the rollout began, so the minibatches are whole envs (CleanRL's ppo_atari_lstm.py). Where CleanRL steps
  the LSTM one step at a time in Python, the stretches between episode starts run through nn.LSTM together, in
  one call (Agent.lstm_over_episodes; tests/test_baselines.py checks it against the step-by-step recurrence).
- CNN-PPO (--no-lstm): the CNN, then the actor and critic, no memory at all: the original code's "PPO"
  configurations. The update shuffles single steps, as the memory scripts' does.

Where the memory scripts (shelm_ppo.py, helm_ppo.py, helmv2_ppo.py) read the frozen Transformer-XL beside
their CNN query encoder, these read the same CNN (the same layers, initialisation and width) through a
trainable LSTM, or nothing. The envs, the PPO loop, its settings, the logging, the checkpoints and --resume
are the scripts'. (The scripts' --ablate-memory is another control: the memory agent itself, its memory
read-out zeroed, the frozen models still run.)

    python benchmark/baselines/lstm_ppo.py --env-id MiniGrid-MemoryS11-v0             # LSTM-PPO
    python benchmark/baselines/lstm_ppo.py --env-id MiniGrid-MemoryS11-v0 --no-lstm   # CNN-PPO

The defaults are the published LSTM configuration of MiniGrid-Memory; benchmark/launch.py --published runs
each env's published LSTM and PPO ones (benchmark/configs.json). Docs: docs/benchmarks.md, "The baselines".
"""

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.distributions.categorical import Categorical

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script
from helm_utils import arguments, env_suites, fail, runs, timing  # noqa: E402

# the memory scripts' envs, so that both sides of the comparison see the same observations and rewards:
# MiniGrid as RGB pixels, the other suites, same-step autoreset, reward normalisation and clipping
from shelm_ppo import make_env, make_envs  # noqa: E402, F401 - make_env: its spaces for the size estimate

ALGORITHM = "lstm"  # checkpoints name their script by it: lstm_ppo.py, with or without --lstm
OUTPUT_DIRS = ()  # no argument names a directory the script writes to


@dataclass
class Args:
    exp_name: str | None = None
    """the name of this experiment (default: lstm_ppo, or cnn_ppo with --no-lstm)"""
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
    """not for the baselines: the evaluation before an upload plays the memory agents only"""
    hf_entity: str | None = None
    """the user or org name of the model repository from the Hugging Face Hub"""
    eval_episodes: int = 10
    """episodes of the evaluation before the upload (logged as eval/episodic_return)"""

    # Algorithm specific arguments: the published LSTM configuration of MiniGrid-Memory (benchmark/configs.json)
    env_id: str = "MiniGrid-MemoryS11-v0"
    """the id of the environment"""
    total_timesteps: int = 2_000_000
    """total timesteps of the experiments"""
    learning_rate: float = 5e-5
    """the learning rate of the optimizer (AdamW, eps 1e-8)"""
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
    """the number of mini-batches (with the LSTM: of whole envs, so it must divide --num-envs)"""
    update_epochs: int = 3
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = False
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.001
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold"""

    # The baseline's network
    lstm: bool = True
    """a trainable LSTM between the CNN and the actor and critic (LSTM-PPO); --no-lstm: none (CNN-PPO)"""
    d_model: int = 1024
    """width of the CNN's output: the memory scripts' CNN query encoder is as wide as their Transformer-XL
    (transfo-xl-wt103: 1024; the original PPO baseline's CNN had 1024 too)"""
    lstm_hidden_size: int = 256
    """size of the LSTM's hidden and cell states (the original LSTM baseline's: 256)"""

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

    def __post_init__(self):
        if self.exp_name is None:  # runs/<env>__lstm_ppo__... or runs/<env>__cnn_ppo__...
            self.exp_name = "lstm_ppo" if self.lstm else "cnn_ppo"


def check_args(args):
    """One clear line for each argument out of range, before anything is built or written."""
    if args.lstm and args.num_minibatches >= 1 and args.num_envs % args.num_minibatches:
        fail(
            f"--num-minibatches {args.num_minibatches} must divide --num-envs {args.num_envs}: "
            "the LSTM's minibatches are whole envs"
        )
    arguments.check_ppo_args(args)
    for name in ["d_model", "lstm_hidden_size"]:
        if getattr(args, name) < 1:
            fail(f"{arguments.flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.upload_model:
        fail(
            "--upload-model: the baselines cannot be evaluated for an upload (helm_utils.evaluation plays the "
            "memory agents only); --save-model keeps the weights"
        )
    arguments.check_fits(args)  # what the run allocates, from this file's Agent built on the meta device


# ---------------------------------------------------------------------------------------------
# The agent: the memory scripts' CNN query encoder, an LSTM (or nothing), actor and critic.
# ---------------------------------------------------------------------------------------------


def layer_init(layer, gain=2**0.5, init=nn.init.orthogonal_):
    init(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_shape, action_dims, d_model, lstm_hidden_size=None):
        """lstm_hidden_size None: no LSTM (CNN-PPO)."""
        super().__init__()
        self.action_dims = tuple(action_dims)  # one categorical per action dimension, as the scripts
        # the memory scripts' query encoder, layer by layer and drawn in the same order (tests/test_baselines.py)
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
        self.cnn = nn.Sequential(
            conv, layer_init(nn.Linear(n_flat, d_model), relu_gain, nn.init.xavier_uniform_), nn.ReLU()
        )
        self.lstm = None
        width = d_model
        if lstm_hidden_size is not None:
            self.lstm = nn.LSTM(d_model, lstm_hidden_size)
            for name, param in self.lstm.named_parameters():  # as CleanRL's ppo_atari_lstm.py
                if "bias" in name:
                    nn.init.constant_(param, 0)
                elif "weight" in name:
                    nn.init.orthogonal_(param, 1.0)
            width = lstm_hidden_size
        # the scripts' actor and critic, on the LSTM's output (the CNN's without it)
        self.actor = nn.Sequential(
            layer_init(nn.Linear(width, 128)),
            nn.LayerNorm(128, elementwise_affine=False),
            nn.ReLU(),
            layer_init(nn.Linear(128, sum(self.action_dims))),
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(width, 512)),
            nn.LayerNorm(512, elementwise_affine=False),
            nn.ReLU(),
            layer_init(nn.Linear(512, 1)),
        )

    def initial_state(self, num_envs, device):
        """The LSTM's (hidden, cell) state of num_envs new episodes: zeros. None without an LSTM."""
        if self.lstm is None:
            return None
        zeros = torch.zeros(self.lstm.num_layers, num_envs, self.lstm.hidden_size, device=device)
        return zeros, zeros.clone()

    def get_states(self, obs, lstm_state, done):
        """The actor's and critic's input for observations of T steps of B envs, flattened step-major as the
        rollout stores them (index t * B + env): obs (T * B, H, W, 3), done (T * B,), 1 where the step is an
        episode's first; lstm_state: (hidden, cell), each (1, B, hidden), before the first step. Returns (input
        (T * B, width), the state after the last step). Without an LSTM the input is the CNN's output and the
        state stays None."""
        hidden = self.cnn(obs.permute(0, 3, 1, 2).float() / 255.0)
        if self.lstm is None:
            return hidden, lstm_state
        return self.lstm_over_episodes(hidden, lstm_state, done)

    def lstm_over_episodes(self, x, lstm_state, done):
        """The LSTM over T steps of B envs (x (T * B, input), done and lstm_state as get_states'), its state zeroed
        before each episode's first step and carried to the next step otherwise: what stepping it one step at a
        time does (the rollout, T = 1), in one nn.LSTM call. Each env's steps are cut where episodes start into
        segments, which nn.LSTM runs together as one PackedSequence (its time loop, over the longest segment, is
        in C++): an env's first segment from the env's state (zeroed if its first step starts an episode), every
        later one from zeros. The state after the last step is the one after each env's last segment."""
        num_envs = lstm_state[0].shape[1]
        n = x.shape[0]
        steps = torch.arange(n, device=x.device).view(-1, num_envs).T.reshape(-1)  # env by env: step-major indices
        starts = done[steps] != 0
        starts[:: n // num_envs] = True  # each env's first step starts a segment
        segment = starts.cumsum(0) - 1  # of each step, env by env
        first = starts.nonzero().squeeze(1)  # where each segment starts, env by env
        lengths = torch.diff(first, append=first.new_tensor([n]))
        # pack the steps' indices (no padded copy of the features), then take the features in that order;
        # padded[i, k]: the step-major index of segment k's i-th step
        padded = steps.new_zeros(int(lengths.max()), len(first))
        padded[torch.arange(n, device=x.device) - first[segment], segment] = steps
        packed = nn.utils.rnn.pack_padded_sequence(padded, lengths.cpu(), enforce_sorted=False)
        env_first, env_last = segment.view(num_envs, -1)[:, 0], segment.view(num_envs, -1)[:, -1]
        keep = (1.0 - done[:num_envs]).view(1, -1, 1)  # each env's own state, unless its first step starts an episode
        initial = tuple(s.new_zeros(1, len(first), s.shape[2]).index_copy(1, env_first, keep * s) for s in lstm_state)
        out, (hidden, cell) = self.lstm(packed._replace(data=x[packed.data]), initial)
        return out.data[packed.data.argsort()], (hidden[:, env_last], cell[:, env_last])

    def get_value(self, obs, lstm_state, done):
        return self.critic(self.get_states(obs, lstm_state, done)[0])

    def get_action_and_value(self, obs, lstm_state, done, action=None):
        """action and its log-probability per action dimension (batch, n_dims), the entropy summed over the
        dimensions (batch,), the value (batch, 1), and the LSTM state after the last step."""
        x, lstm_state = self.get_states(obs, lstm_state, done)
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
        return action, logprob, entropy, self.critic(x), lstm_state


class NoEncoder:
    """What the memory scripts' frozen encoder is to their checkpoints (helm_utils.runs saves and restores its
    state), for an agent without one: an empty state."""

    def encoder_state(self):
        return {}

    def load_encoder_state(self, state):
        if state:
            raise ValueError(f"a baseline has no encoder state, this one holds {', '.join(map(str, state))}")


def minibatches(args, device):
    """One epoch's minibatches: (indices into the flattened rollout (index t * num_envs + env), the envs they
    cover or None). With the LSTM, whole envs: every step of num_envs / num_minibatches shuffled envs, in step
    order, so that the LSTM re-runs over them from their state at the rollout's start. Without it, single
    steps, shuffled, as the memory scripts."""
    if not args.lstm:
        return [
            (mb_inds, None) for mb_inds in torch.randperm(args.batch_size, device=device).split(args.minibatch_size)
        ]
    flatinds = torch.arange(args.batch_size, device=device).reshape(args.num_steps, args.num_envs)
    envinds = torch.randperm(args.num_envs, device=device).split(args.num_envs // args.num_minibatches)
    return [(flatinds[:, mb_envs].reshape(-1), mb_envs) for mb_envs in envinds]


if __name__ == "__main__":
    script = sys.modules[__name__]  # this file: the package reads its Args, check_args, ALGORITHM
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
    agent = Agent(
        obs_shape,
        env_suites.action_dims(envs.single_action_space),
        args.d_model,
        args.lstm_hidden_size if args.lstm else None,
    ).to(device)
    optimizer = torch.optim.AdamW(agent.parameters(), lr=args.learning_rate, eps=1e-8)
    n_params = sum(p.numel() for p in agent.parameters())
    print(f"{args.exp_name}: {'LSTM-PPO' if args.lstm else 'CNN-PPO'}, {n_params:,} trainable parameters")
    # a resumed run gets back its weights, optimizer, reward normalisation, RNG states and counters (no frozen
    # encoder: its state is empty); then the run directory is claimed and the logs open (tensorboard, and wandb)
    start_iteration, global_step = run.start(agent, optimizer, NoEncoder(), reward_norm)
    writer = run.writer

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, dtype=torch.uint8, device=device)
    # one column per action dimension (one for Discrete), as the scripts
    actions = torch.zeros((args.num_steps, args.num_envs, len(agent.action_dims)), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs, len(agent.action_dims)), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)

    # TRY NOT TO MODIFY: start the game; a resumed run starts fresh episodes (envs and LSTM states are not saved)
    start_step, start_time = global_step, time.time()
    next_obs_np, _ = envs.reset(seed=args.seed + (start_iteration - 1) * args.num_envs)
    next_obs = torch.from_numpy(next_obs_np).to(device)
    next_done = torch.zeros(args.num_envs, device=device)
    next_lstm_state = agent.initial_state(args.num_envs, device)  # hidden and cell states; None without the LSTM
    lap = timing.Laps()  # where each update's time goes, logged as perf/*

    for iteration in range(start_iteration, args.num_iterations + 1):
        lap("logging")  # the previous update's logging and checkpoints
        run.update_starts(iteration, global_step)  # what a stop during this update saves: where it started
        # the update re-runs the LSTM from the state each env had here
        initial_lstm_state = None if next_lstm_state is None else tuple(s.clone() for s in next_lstm_state)
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

            # ALGO LOGIC: action logic; where an episode has just ended, next_obs is the new episode's first
            # observation, and the LSTM's state is zeroed before it
            with torch.no_grad():
                action, logprob, _, value, next_lstm_state = agent.get_action_and_value(
                    next_obs, next_lstm_state, next_done
                )
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

            if "episode" in infos:
                for i in np.nonzero(infos["_episode"])[0]:
                    r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                    run.recent_returns.append(r)  # their mean decides model_best.pt
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)
            lap("rollout_other")

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_obs, next_lstm_state, next_done).reshape(1, -1)
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

        # flatten the batch, step-major: index t * num_envs + env
        b_obs = obs.reshape((-1,) + obs_shape)
        b_logprobs = logprobs.reshape(-1, len(agent.action_dims))
        b_actions = actions.reshape(-1, len(agent.action_dims))
        b_dones = dones.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # Optimizing the policy and value network
        clipfracs = []
        for _ in range(args.update_epochs):
            for mb_inds, mb_envs in minibatches(args, device):
                # the LSTM runs again over the minibatch's envs, from their state at the rollout's start
                mb_lstm_state = None if mb_envs is None else tuple(s[:, mb_envs] for s in initial_lstm_state)
                _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(
                    b_obs[mb_inds], mb_lstm_state, b_dones[mb_inds], b_actions[mb_inds]
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
        run.update_done(iteration, global_step)  # model_best.pt, checkpoint.pt every --checkpoint-every updates

    envs.close()  # the video under way, if any, is written now
    run.finish(global_step)  # the final checkpoints
