"""Playing a saved agent: a checkpoint read once and checked by the script that wrote it, its models rebuilt,
the policy run with the frozen encoder in evaluation mode (HELMv2's running statistics fixed), and every
step of env 0 handed to outputs (memory_view.Video, and enjoy.py's window, heatmaps and trace). The
training scripts' --upload-model evaluates with it; enjoy.py watches with it."""

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from helm_utils import checkpoints, fail
from helm_utils.env_suites import action_dims, env_actions
from helm_utils.memory_view import Picture, Video

ALGORITHMS = ("helm", "helmv2", "shelm")


@dataclass
class Loaded:
    """A trained agent ready to play: its script, arguments and frozen and trained models."""

    algorithm: str
    script: object  # the training script's module
    args: object  # its Args, as trained
    ckpt: dict
    trxl: object
    vocab: list
    encoder: object
    agent: object
    device: torch.device
    envs: object


def script_of(ckpt, path):
    """The training script that wrote a checkpoint, imported (the scripts lie in the repository's root)."""
    algorithm = ckpt.get("algorithm")
    if algorithm not in ALGORITHMS:
        fail(f"{path} is not a checkpoint of helm_ppo.py, helmv2_ppo.py or shelm_ppo.py")
    return importlib.import_module(f"{algorithm}_ppo")


def load(path, script=None, num_envs=None, cuda=True, frames=False, from_hub=False, env_id=None):
    """Read a checkpoint once, check it with the training script that wrote it (`script`, the module; None:
    the one its algorithm names), rebuild its models. num_envs None: the fewest the agent plays with (HELMv2's
    --rescale batch standardises across two). env_id: the one the command line gave (or the run's own), the only
    one that may name a module to import (module:Env-v0)."""
    ckpt = checkpoints.read(path)
    script = script or script_of(ckpt, path)
    ckpt = checkpoints.check(ckpt, path, script, env_id)
    args = script.Args(**ckpt["args"])
    if env_id is not None and env_id != args.env_id:
        fail(f"--env-id {env_id} is not the env id of {path} ({args.env_id}): an agent plays the env it was trained on")
    args.num_envs = num_envs or (2 if getattr(args, "rescale", None) == "batch" else 1)
    args.capture_video, args.cuda = False, cuda
    if from_hub and hasattr(args, "embeddings_dir"):
        # the trainer's local paths mean nothing here, and a file from elsewhere must not choose where we write
        args.embeddings_dir, args.embeddings_file = script.Args().embeddings_dir, None
    script.check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and cuda else "cpu")
    torch.manual_seed(args.seed)
    envs = make_envs(script, args, frames)
    may_write = checkpoints.may_write_output_dirs(args, ckpt["args"], script.OUTPUT_DIRS)
    trxl, vocab, encoder = script.build_memory(args, device, verbose=False, may_write=may_write)
    agent = script.Agent(envs.single_observation_space.shape, action_dims(envs.single_action_space), trxl.d_model)
    agent = agent.to(device)
    checkpoints.load_trained(agent, encoder, ckpt, path)
    agent.eval()
    encoder.eval()  # evaluation: HELMv2's running statistics are frozen
    return Loaded(ckpt["algorithm"], script, args, ckpt, trxl, vocab, encoder, agent, device, envs)


def make_envs(script, args, frames):
    """The training script's envs, with raw rewards (no normalisation or clipping: they are shown) and
    env 0 rendering frames when asked."""
    render_mode = "rgb_array" if frames else None
    envs = gym.vector.SyncVectorEnv(
        [
            script.make_env(args.env_id, i, False, "enjoy", render_mode if i == 0 else None)
            for i in range(args.num_envs)
        ],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


@dataclass
class Step:
    """What env 0 did at one step, and what its memory held."""

    episode: int  # 1, 2, ... (env 0's episodes)
    t: int  # step within the episode
    action: int | list  # a list of one number per dimension for a MultiDiscrete action space
    action_name: str
    reward: float  # the environment's own reward
    value: float  # the critic's estimate
    words: list  # the memory's text of this step (see memory_words)
    weight: float | None  # HELM: softmax weight of the most attended word
    window: list  # the words of the tokens the Transformer-XL window holds now, oldest first (SHELM's strip)
    attention: np.ndarray  # (n_head, keys) of the step's last token in the chosen layer
    key_steps: list  # for each key: the (episode, t) whose token it is, or None (zero or earlier memory)
    frame: np.ndarray | None = None  # the environment, before the action
    attended: dict = field(default_factory=dict)  # the most attended key: step, words, weight


def action_names(env):
    """Name of each action of env (MiniGrid's enum, Atari's meanings), or its number."""
    base = env.unwrapped
    if hasattr(base, "actions"):
        return lambda a: base.actions(a).name
    if hasattr(base, "get_action_meanings"):
        meanings = base.get_action_meanings()
        return lambda a: meanings[a]
    return str


def memory_words(loaded, trxl_in, tokens):
    """(words, weight) of env 0's step. SHELM: the words retrieved into the memory. HELM: the most attended
    word of the soft token, and its softmax weight. HELMv2: the words whose Transformer-XL input embeddings
    are nearest to the rescaled CLIP embedding (the memory's input), nearest first."""
    vocab = loaded.vocab
    if loaded.algorithm == "shelm":
        return [vocab[i] for i in tokens[0].tolist()], None
    if loaded.algorithm == "helm":
        return [vocab[tokens[0, 0]]], float(loaded.encoder.last_top_weight[0])
    nearest = loaded.script.nearest_tokens(trxl_in[0, :1], loaded.trxl.word_emb, loaded.encoder.word_norms, k=3)
    return [vocab[i] for i in nearest[0].tolist()], None


def play(loaded, episodes, outputs, greedy=False, seed=None, attention_layer=-1, show_memory=False):
    """Run until `episodes` episodes (over all envs) end; hand each step of env 0 to every output.
    Returns the episodes' returns."""
    script, args, trxl, agent = loaded.script, loaded.args, loaded.trxl, loaded.agent
    envs, device = loaded.envs, loaded.device
    attn = trxl.layers[attention_layer].dec_attn
    attn.keep_probs = True
    env0 = envs.unwrapped.envs[0]
    name_of = action_names(env0)
    want_frames = env0.render_mode == "rgb_array"
    obs_np, _ = envs.reset(seed=args.seed + 10_000 if seed is None else seed)
    mems, memory_mask = script.init_memory(trxl, args.num_envs, args.memory_reset, device)
    slots = [None] * trxl.mem_len  # env 0: the (episode, t, word) each memory slot holds, None for zeros
    returns, episode, t = [], 1, 0
    try:
        with torch.no_grad():
            while len(returns) < episodes:
                frame = env0.render() if want_frames else None
                if want_frames and frame is None:  # an env that draws nothing: show what the agent sees
                    frame = obs_np[0]
                trxl_in, tokens = loaded.encoder(obs_np)
                visible = memory_mask[:, 0].tolist()
                trxl_out, mems, memory_mask = trxl(trxl_in, mems, memory_mask)
                obs = torch.from_numpy(obs_np).to(device)
                x = agent.features(script.memory_readout(trxl_out, args.ablate_memory), obs)
                logits, value = agent.actor(x), agent.critic(x)[:, 0]
                parts = logits.split(agent.action_dims, dim=-1)  # one categorical per action dimension
                if greedy:
                    action = torch.stack([part.argmax(dim=-1) for part in parts], dim=-1)
                else:
                    action = torch.stack([torch.distributions.Categorical(logits=p).sample() for p in parts], dim=-1)
                words, weight = memory_words(loaded, trxl_in, tokens)
                step_words = [loaded.vocab[i] for i in tokens[0].tolist()]
                keys = slots + [(episode, t, w) for w in step_words]
                window = [k[2] for k, v in zip(keys, visible + [True] * len(step_words)) if k is not None and v]
                obs_np, reward, terminations, truncations, infos = envs.step(
                    env_actions(action, envs.single_action_space)
                )
                action0 = action[0].tolist()
                record = Step(
                    episode=episode,
                    t=t,
                    action=action0[0] if len(action0) == 1 else action0,
                    action_name=name_of(action0[0]) if len(action0) == 1 else " ".join(map(str, action0)),
                    reward=float(reward[0]),
                    value=float(value[0]),
                    words=words,
                    weight=weight,
                    window=window,
                    attention=attn.probs[-1, :, 0, :].T.float().cpu().numpy(),  # the step's last token
                    key_steps=[k[:2] if k is not None else None for k in keys],
                    frame=frame,
                )
                record.attended = most_attended(record, keys)
                if show_memory:
                    print(f"  t={t:3d}  memory <- {' '.join(step_words)}")
                for output in outputs:
                    output.step(record)
                slots = keys[-trxl.mem_len :]
                done = np.logical_or(terminations, truncations)
                mems, memory_mask = script.reset_memory(
                    mems, memory_mask, torch.as_tensor(done, device=device), args.memory_reset
                )
                t += 1
                if done[0]:
                    for output in outputs:
                        output.end_episode(episode)
                    episode, t = episode + 1, 0
                    if args.memory_reset == "zero":
                        slots = [None] * trxl.mem_len
                if "episode" in infos:
                    for i in np.nonzero(infos["_episode"])[0]:
                        returns.append(float(infos["episode"]["r"][i]))
                        print(
                            f"episode {len(returns)}: return {returns[-1]:.3f}, length {int(infos['episode']['l'][i])}"
                        )
    finally:
        attn.keep_probs, attn.probs = False, None
        for output in outputs:
            output.close()
        envs.close()
    return returns


def most_attended(record, keys):
    """The key the step's last token attends to most (mean over heads): its slot (0: the oldest memory
    slot, mem_len and on: this step's tokens), step and word."""
    mean = record.attention.mean(axis=0)
    j = int(mean.argmax())
    key = keys[j]
    return {
        "attended_slot": j,
        "attended_step": key[1] if key is not None and key[0] == record.episode else None,
        "attended_word": key[2] if key is not None else "",
        "attended_weight": float(mean[j]),
    }


def evaluate(checkpoint, script, episodes, cuda=True, video_dir=None, from_hub=False, env_id=None):
    """Returns of `episodes` episodes of a saved agent (sampled actions, new seeds), and the mp4 of env
    0's first episode with its memory strip (written to video_dir, default videos/<run_name>-eval).
    script: the training script's module (None: the one the checkpoint's algorithm names); env_id: see load."""
    loaded = load(checkpoint, script, cuda=cuda, frames=True, from_hub=from_hub, env_id=env_id)
    what = "--out-dir" if video_dir else "the evaluation's video folder"
    video_dir = Path(video_dir or Path("videos") / f"{safe_name(loaded.ckpt.get('run_name'))}-eval")
    video = Video(video_dir, Picture(loaded.algorithm, loaded.trxl.n_layer - 1), fps=4, max_episodes=1, what=what)
    returns = play(loaded, episodes, [video])
    print(f"evaluation: mean return over {len(returns)} episodes {np.mean(returns):.3f} +- {np.std(returns):.3f}")
    return returns, video.written[0] if video.written else None


def safe_name(name):
    """A checkpoint's run name, used in output paths only when it is one plain file name."""
    name = str(name)
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        fail(f"the checkpoint's run name {name[:80]!r} is not a plain file name; pass --out-dir")
    return name
