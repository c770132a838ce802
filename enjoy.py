"""Watch a trained HELM, HELMv2 or SHELM agent, read its memory, share it on the Hugging Face hub.

    python enjoy.py runs/<run_name>/model_best.pt --episodes 3 --capture-video --attention --trace csv
    python enjoy.py --hub someone/MiniGrid-MemoryS11-v0-shelm_ppo-seed1 --capture-video
    python enjoy.py runs/<run_name>/model_final.pt --upload someone/my-shelm-agent

Loads a checkpoint of helm_ppo.py, helmv2_ppo.py or shelm_ppo.py (a local file, or one downloaded from
the hub), rebuilds the frozen models it was trained with and runs the policy, the frozen encoder in
evaluation mode (HELMv2's running statistics stay fixed). For env 0 it shows what the memory holds:
a video with a text strip under each frame, heatmaps of the Transformer-XL's attention, a trace of
every step, a window, or lines on stdout (--show-memory). The training scripts' --upload-model uses
evaluate() and push_to_hub() from here. Docs: docs/enjoy.md.
"""

import csv
import importlib
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro

from prepare_embeddings import fail, hub_offline

ALGORITHMS = ("helm", "helmv2", "shelm")
HUB_FILE = "model.pt"  # the checkpoint's name in a model repository written by push_to_hub


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str | None] = None
    """a checkpoint written by one of the training scripts (model_best.pt, model_final.pt, checkpoint.pt)"""
    hub: str | None = None
    """instead, download the checkpoint from this Hugging Face hub model repository (cached; offline from the cache)"""
    hub_file: str = HUB_FILE
    """the checkpoint's file name in the --hub repository"""
    episodes: int = 10
    """number of episodes to run (over all envs)"""
    num_envs: int = 1
    """parallel envs (HELMv2 with --rescale batch needs at least 2); only env 0 is shown"""
    greedy: bool = False
    """take the most likely action instead of sampling"""
    show_memory: bool = False
    """print the tokens entering the memory at each step of env 0"""
    capture_video: bool = False
    """write one mp4 per episode of env 0: the frame, and under it the step, action, reward, value and memory"""
    attention: bool = False
    """write one PNG per episode of env 0: the Transformer-XL's attention from each step to the steps it could see"""
    attention_layer: int = -1
    """the Transformer-XL layer (0-based) whose attention is shown; -1: the last kept layer"""
    attention_heads: bool = False
    """draw one attention panel per head instead of the mean over heads"""
    trace: Literal["csv", "jsonl"] | None = None
    """write every step of env 0 (action, reward, value, memory words, most attended step) as CSV or JSON lines"""
    render: bool = False
    """show env 0 with its memory strip in a window (without a display: write the video instead)"""
    fps: int = 4
    """frames per second of the videos and the window"""
    out_dir: str | None = None
    """directory of the videos, heatmaps and trace (default: videos/<run_name>-enjoy)"""
    upload: str | None = None
    """evaluate the checkpoint and upload it, a model card and a video to this Hugging Face hub repository"""
    seed: int | None = None
    """environment seed (default: the training seed + 10000, so evaluation episodes are new ones)"""
    cuda: bool = True
    """use CUDA when available"""


# ---------------------------------------------------------------------------------------------
# Loading: a checkpoint (local or from the hub), read once and checked by its own training script
# ---------------------------------------------------------------------------------------------


def download_checkpoint(repo_id, filename):
    """Local path of `filename` of a hub model repository: from the cache without network when it is
    there, else downloaded once into the cache."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached
        hub_offline()  # out of reach: the hub client goes cache-only, without retries
        return hf_hub_download(repo_id, filename)
    except HFValidationError:
        fail(f"{repo_id!r} is not a Hugging Face hub repository id (owner/name)")
    except RemoteEntryNotFoundError:
        fail(f"the hub repository {repo_id} has no file {filename} (--hub-file names the checkpoint)")
    except RepositoryNotFoundError:
        fail(f"{repo_id} is not a model repository on the Hugging Face hub (or it is private)")
    except LocalEntryNotFoundError:
        fail(f"cannot download {filename} of {repo_id}: no network, and the hub cache does not hold it")
    except Exception as e:  # noqa: BLE001 - network and disk failures all mean the same to the user
        fail(f"cannot download {filename} of {repo_id}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


@dataclass
class Loaded:
    """A trained agent ready to play: its script, arguments and frozen and trained models."""

    algorithm: str
    algo: object  # the training script's module
    args: object  # its Args, as trained
    ckpt: dict
    trxl: object
    vocab: list
    encoder: object
    agent: object
    device: torch.device
    envs: object


def load(path, num_envs=None, cuda=True, frames=False, from_hub=False):
    """Read a checkpoint once, check it with the training script that wrote it, rebuild its models.
    num_envs None: the fewest the agent plays with (HELMv2's --rescale batch standardises across two)."""
    import shelm_ppo  # reading is shared code: any of the three scripts reads any checkpoint

    ckpt = shelm_ppo.read_checkpoint(path)
    algorithm = ckpt.get("algorithm")
    if algorithm not in ALGORITHMS:
        fail(f"{path} is not a checkpoint of helm_ppo.py, helmv2_ppo.py or shelm_ppo.py")
    algo = importlib.import_module(f"{algorithm}_ppo")
    ckpt = algo.check_checkpoint(ckpt, path)
    try:
        args = algo.Args(**ckpt["args"])
    except (TypeError, KeyError) as e:
        fail(f"checkpoint {path} was written with other arguments than {algorithm}_ppo.py has ({e})")
    args.num_envs = num_envs or (2 if getattr(args, "rescale", None) == "batch" else 1)
    args.capture_video, args.cuda = False, cuda
    if from_hub and hasattr(args, "embeddings_dir"):
        # the trainer's local paths mean nothing here, and a file from elsewhere must not choose where we write
        args.embeddings_dir, args.embeddings_file = algo.Args().embeddings_dir, None
    algo.check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and cuda else "cpu")
    torch.manual_seed(args.seed)
    envs = make_envs(algo, args, frames)
    trxl, vocab, encoder = algo.build_memory(
        args, device, verbose=False, may_write=algo.may_write_output_dirs(args, ckpt["args"])
    )
    agent = algo.Agent(envs.single_observation_space.shape, algo.action_dims(envs.single_action_space), trxl.d_model)
    agent = agent.to(device)
    algo.load_trained(agent, encoder, ckpt, path)
    agent.eval()
    encoder.eval()  # evaluation: HELMv2's running statistics are frozen
    return Loaded(algorithm, algo, args, ckpt, trxl, vocab, encoder, agent, device, envs)


def make_envs(algo, args, frames):
    """The training script's envs, with raw rewards (no normalisation or clipping: they are shown) and
    env 0 rendering frames when asked."""
    render_mode = "rgb_array" if frames else None
    envs = gym.vector.SyncVectorEnv(
        [algo.make_env(args.env_id, i, False, "enjoy", render_mode if i == 0 else None) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


# ---------------------------------------------------------------------------------------------
# Playing: one record per step of env 0, handed to the outputs asked for
# ---------------------------------------------------------------------------------------------


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
    nearest = loaded.algo.nearest_tokens(trxl_in[0, :1], loaded.trxl.word_emb, loaded.encoder.word_norms, k=3)
    return [vocab[i] for i in nearest[0].tolist()], None


def play(loaded, episodes, outputs, greedy=False, seed=None, attention_layer=-1, show_memory=False):
    """Run until `episodes` episodes (over all envs) end; hand each step of env 0 to every output.
    Returns the episodes' returns."""
    algo, args, trxl, agent = loaded.algo, loaded.args, loaded.trxl, loaded.agent
    envs, device = loaded.envs, loaded.device
    attn = trxl.layers[attention_layer].dec_attn
    attn.keep_probs = True
    env0 = envs.unwrapped.envs[0]
    name_of = action_names(env0)
    want_frames = env0.render_mode == "rgb_array"
    obs_np, _ = envs.reset(seed=args.seed + 10_000 if seed is None else seed)
    mems, memory_mask = algo.init_memory(trxl, args.num_envs, args.memory_reset, device)
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
                x = agent.features(algo.memory_readout(trxl_out, args.ablate_memory), obs)
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
                    algo.env_actions(action, envs.single_action_space)
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
                mems, memory_mask = algo.reset_memory(
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


# ---------------------------------------------------------------------------------------------
# Outputs: each gets every step of env 0 and the end of each of its episodes
# ---------------------------------------------------------------------------------------------


class Output:
    def step(self, record):
        pass

    def end_episode(self, episode):
        pass

    def close(self):
        pass


def strip_lines(algorithm, record, attention_layer):
    """The memory strip's text: step, action, reward, value; the memory's words; its attention."""
    lines = [
        f"episode {record.episode}  step {record.t}  action {record.action_name}  "
        f"reward {record.reward:.2f}  value {record.value:.2f}"
    ]
    if algorithm == "shelm":
        lines.append("retrieved: " + " ".join(record.words))
        lines.append("window: " + " ".join(record.window))
    elif algorithm == "helm":
        lines.append(f"most attended word: {record.words[0]} (softmax weight {record.weight:.3f})")
    else:
        lines.append("nearest words: " + ", ".join(record.words))
    step = record.attended["attended_step"]
    where = f"step {step}" if step is not None else "memory before this episode"
    lines.append(
        f"layer {attention_layer} attends most to {where} '{record.attended['attended_word']}' "
        f"({record.attended['attended_weight']:.2f})"
    )
    return lines


class Picture:
    """The frame over its memory strip: frames narrower than MIN_WIDTH are enlarged (nearest neighbour),
    and the strip has a fixed number of lines, so every picture of a run has the same size."""

    MIN_WIDTH, LINES, LINE_HEIGHT, PAD = 480, 6, 15, 6

    def __init__(self, algorithm, attention_layer):
        from PIL import ImageFont

        self.algorithm, self.attention_layer = algorithm, attention_layer
        self.font = ImageFont.load_default(size=12)
        self.lengths = {}  # pixel width of each word drawn so far: the memory repeats its words

    def length(self, text):
        if text not in self.lengths:
            self.lengths[text] = self.font.getlength(text)
        return self.lengths[text]

    def __call__(self, record):
        from PIL import Image, ImageDraw

        frame = record.frame
        scale = -(-self.MIN_WIDTH // frame.shape[1])  # ceil
        frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
        width = frame.shape[1] + frame.shape[1] % 2  # even sizes, as H.264 needs
        strip = Image.new("RGB", (width, self.LINES * self.LINE_HEIGHT + 2 * self.PAD), (16, 16, 16))
        draw = ImageDraw.Draw(strip)
        lines = self.fit(strip_lines(self.algorithm, record, self.attention_layer), width - 2 * self.PAD)
        for i, line in enumerate(lines):
            draw.text((self.PAD, self.PAD + i * self.LINE_HEIGHT), line, fill=(235, 235, 235), font=self.font)
        top = np.zeros((frame.shape[0] + frame.shape[0] % 2, width, 3), dtype=np.uint8)
        top[: frame.shape[0], : frame.shape[1]] = frame
        return np.concatenate([top, np.asarray(strip)])

    def fit(self, lines, width):
        """Lines broken at spaces to fit `width` pixels, at most LINES of them: a window too long loses
        its oldest words."""
        lines = list(lines)
        while True:
            out = [piece for line in lines for piece in self.wrap(line, width)]
            window = next((i for i, line in enumerate(lines) if line.startswith("window: ")), None)
            if len(out) <= self.LINES or window is None or len(lines[window].split(" ")) <= 3:
                return out[: self.LINES]
            words = lines[window].removeprefix("window: ").removeprefix("... ").split(" ")
            lines[window] = "window: ... " + " ".join(words[1:])

    def wrap(self, line, width):
        """One line broken at spaces into lines of at most `width` pixels."""
        out, current, used = [], "", 0.0
        for word in line.split(" "):
            extra = self.length(" " + word) if current else self.length(word)
            if current and used + extra > width:
                out.append(current)
                current, used = "  " + word, self.length("  " + word)
            else:
                current, used = (current + " " + word if current else word), used + extra
        return out + [current]


class Video(Output):
    """One mp4 per episode of env 0: each frame with its memory strip (moviepy, as gymnasium's RecordVideo)."""

    def __init__(self, out_dir, picture, fps, max_episodes=None):
        self.out_dir, self.picture, self.fps, self.max_episodes = Path(out_dir), picture, fps, max_episodes
        self.frames, self.written = [], []

    def step(self, record):
        if self.max_episodes is None or len(self.written) < self.max_episodes:
            self.frames.append(self.picture(record))

    def end_episode(self, episode):
        if self.frames:
            from moviepy import ImageSequenceClip

            path = self.out_dir / f"episode-{episode:03d}.mp4"
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ImageSequenceClip(self.frames, fps=self.fps).write_videofile(str(path), logger=None, audio=False)
            self.written.append(path)
            print(f"video: {path}")
        self.frames = []

    def close(self):
        self.frames = []  # an episode cut short by the end of the run is not written


class Window(Output):
    """A pygame window showing each frame with its memory strip."""

    def __init__(self, picture, fps):
        import pygame

        self.pygame, self.picture, self.delay = pygame, picture, 1 / fps
        pygame.display.init()  # the display only: pygame.init() would also open a sound device
        self.screen = None

    def step(self, record):
        pygame = self.pygame
        picture = self.picture(record)
        if self.screen is None:
            try:
                self.screen = pygame.display.set_mode((picture.shape[1], picture.shape[0]))
            except pygame.error as e:  # a display that cannot be opened (an X server gone, no permission)
                fail(f"cannot open a window on the display ({e}); write videos with --capture-video instead")
            pygame.display.set_caption("enjoy.py")
        self.screen.blit(pygame.surfarray.make_surface(picture.swapaxes(0, 1)), (0, 0))
        pygame.display.flip()
        for event in pygame.event.get():
            if event.type == pygame.QUIT:
                raise KeyboardInterrupt
        time.sleep(self.delay)

    def close(self):
        self.pygame.quit()


def has_display():
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class AttentionMaps(Output):
    """One PNG per episode of env 0: row t is the attention of step t's last token over the steps of the
    episode (the weights of a step's tokens summed), and over memory from before the episode (zeros
    or the old episode, which --memory-reset mask hides); mean over heads, or one panel per head."""

    def __init__(self, out_dir, layer, per_head):
        self.out_dir, self.layer, self.per_head = Path(out_dir), layer, per_head
        self.rows, self.labels, self.written = [], [], []

    def step(self, record):
        n_head = record.attention.shape[0]
        row = np.zeros((n_head, record.t + 2))  # the steps 0..t of this episode, then "earlier"
        for j, key in enumerate(record.key_steps):
            if key is not None and key[0] == record.episode:
                row[:, key[1]] += record.attention[:, j]
            else:
                row[:, -1] += record.attention[:, j]
        self.rows.append(row)
        self.labels.append(f"{record.t} {' '.join(record.words)}")  # each step's words label its row and column

    def matrix(self):
        """(n_head, steps, steps + 1): attention of each step to each step, then to earlier memory."""
        n = len(self.rows)
        out = np.zeros((self.rows[0].shape[0], n, n + 1))
        for t, row in enumerate(self.rows):
            out[:, t, : t + 1] = row[:, :-1]
            out[:, t, -1] = row[:, -1]
        return out

    def end_episode(self, episode):
        if not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        maps = self.matrix()
        earlier = maps[:, :, -1].max() > 0
        if not earlier:
            maps = maps[:, :, :-1]
        panels = list(maps) if self.per_head else [maps.mean(axis=0)]
        n = len(self.rows)
        cols = int(np.ceil(np.sqrt(len(panels))))  # heads on a near-square grid
        rows = -(-len(panels) // cols)
        size = min(3 + 0.18 * n, 14) if len(panels) == 1 else min(3 + 0.1 * n, 7)
        fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False, layout="constrained")
        step = max(1, n // (40 if len(panels) == 1 else 20))  # at most about 40 (20) labels per axis
        vmax = max(panel.max() for panel in panels)  # one colour scale for all panels
        xlabels = self.labels + (["before"] if earlier else [])
        xticks = list(range(0, n, step)) + ([n] if earlier else [])
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for h, (ax, panel) in enumerate(zip(axes.flat, panels)):
            image = ax.imshow(panel, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_yticks(range(0, n, step), self.labels[::step], fontsize=7)
            ax.set_xticks(xticks, [xlabels[i] for i in xticks], fontsize=7, rotation=90)
            ax.set_xlabel("attended step")
            ax.set_ylabel("step")
            ax.set_title(f"layer {self.layer}, head {h}" if self.per_head else f"layer {self.layer}, mean over heads")
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention")
        fig.suptitle(f"episode {episode}: attention of each step to the steps it could see", fontsize=10)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"attention-episode-{episode:03d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.written.append(path)
        print(f"attention: {path}")
        self.rows, self.labels = [], []

    def close(self):
        self.rows, self.labels = [], []


class Trace(Output):
    """Every step of env 0 as one CSV row or JSON line, written as it happens."""

    FIELDS = ["episode", "step", "action", "reward", "value", "words", "window"]
    FIELDS += ["attended_slot", "attended_step", "attended_word"]

    def __init__(self, path, kind):
        self.path, self.kind = Path(path), kind
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", newline="")  # noqa: SIM115 - open for the whole run, closed in close()
        self.csv = csv.DictWriter(self.file, self.FIELDS) if kind == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def step(self, record):
        row = {
            "episode": record.episode,
            "step": record.t,
            "action": record.action_name,
            "reward": record.reward,
            "value": round(record.value, 6),
            "words": record.words,
            "window": record.window,
            "attended_slot": record.attended["attended_slot"],
            "attended_step": record.attended["attended_step"],
            "attended_word": record.attended["attended_word"],
        }
        if self.csv:
            self.csv.writerow(dict(row, words=" ".join(row["words"]), window=" ".join(row["window"])))
        else:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        if not self.file.closed:
            self.file.close()
            print(f"trace: {self.path}")


# ---------------------------------------------------------------------------------------------
# Evaluation and the hub upload (also used by the training scripts' --upload-model)
# ---------------------------------------------------------------------------------------------


def evaluate(checkpoint, episodes, video_dir=None, cuda=True, from_hub=False):
    """Returns of `episodes` episodes of a saved agent (sampled actions, new seeds), and the mp4 of env
    0's first episode with its memory strip (written to video_dir, default videos/<run_name>-eval)."""
    loaded = load(checkpoint, cuda=cuda, frames=True, from_hub=from_hub)
    video_dir = Path(video_dir or Path("videos") / f"{safe_name(loaded.ckpt.get('run_name'))}-eval")
    video = Video(video_dir, Picture(loaded.algorithm, loaded.trxl.n_layer - 1), fps=4, max_episodes=1)
    returns = play(loaded, episodes, [video])
    print(f"evaluation: mean return over {len(returns)} episodes {np.mean(returns):.3f} +- {np.std(returns):.3f}")
    return returns, video.written[0] if video.written else None


def safe_name(name):
    """A checkpoint's run name, used in output paths only when it is one plain file name."""
    name = str(name)
    if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
        fail(f"the checkpoint's run name {name[:80]!r} is not a plain file name; pass --out-dir")
    return name


def training_command(algorithm, args, defaults):
    """The command line that reproduces a run: its script and the arguments that differ from the defaults."""
    skip = {"batch_size", "minibatch_size", "num_iterations", "resume", "upload_model", "hf_entity"}
    parts = [f"python {algorithm}_ppo.py"]
    for name, value in args.items():
        if name in skip or value == defaults.get(name, object()):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts.append(" ".join([flag, *(shlex.quote(str(v)) for v in value)]))
        elif value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def model_card(ckpt, repo_id, returns, video_name):
    """README.md of the model repository: what was trained, how, how well it plays, how to watch it."""
    algorithm, args = ckpt["algorithm"], ckpt["args"]
    algo = importlib.import_module(f"{algorithm}_ppo")
    from dataclasses import asdict

    command = training_command(algorithm, args, asdict(algo.Args()))
    mean, std = float(np.mean(returns)), float(np.std(returns))
    name = {"helm": "HELM", "helmv2": "HELMv2", "shelm": "SHELM"}[algorithm]
    versions = "\n".join(f"- {k}: {v}" for k, v in ckpt.get("meta", {}).get("versions", {}).items())
    arguments = "\n".join(f"| {k} | {v} |" for k, v in args.items())
    return f"""---
tags:
- reinforcement-learning
- {args["env_id"]}
- {algorithm}
- ppo
- custom-implementation
model-index:
- name: {algorithm}_ppo
  results:
  - task:
      type: reinforcement-learning
      name: reinforcement-learning
    dataset:
      name: {args["env_id"]}
      type: {args["env_id"]}
    metrics:
    - type: mean_reward
      value: {mean:.2f} +/- {std:.2f}
      name: mean_reward
      verified: false
---

# {name} (PPO) playing {args["env_id"]}

A {name} agent trained with `{algorithm}_ppo.py`: a PPO agent whose memory is a frozen, pretrained
Transformer-XL ({args["trxl_model"]}, first {args["n_layer"]} layers). This repository holds its trainable
weights (`{HUB_FILE}`, {ckpt.get("global_step")} steps); the frozen models are rebuilt from their sources.

## Evaluation

Mean return over {len(returns)} episodes: **{mean:.3f} +- {std:.3f}** (sampled actions, seeds new to training).
Returns: {", ".join(f"{r:.3f}" for r in returns)}

`{video_name}` shows one episode, with the memory's text under each frame.

## Watch it

```bash
pip install -r requirements/requirements.txt   # in a checkout of the HELM/SHELM scripts
python enjoy.py --hub {repo_id} --episodes 3 --capture-video --attention
```

## Command

```bash
{command}
```

## Arguments

| argument | value |
|---|---|
{arguments}

## Library versions

{versions}
"""


def push_to_hub(checkpoint, repo_id, returns, video):
    """Upload a checkpoint (as model.pt), its model card (README.md) and an evaluation video (replay.mp4)
    to a hub model repository; one line and exit status 1 when it cannot, the local files untouched."""
    import huggingface_hub
    from huggingface_hub import constants

    remedy = f"the run is saved; upload it later with: python enjoy.py {checkpoint} --upload {repo_id}"
    if constants.HF_HUB_OFFLINE:
        fail(f"cannot upload to the Hugging Face hub while offline (HF_HUB_OFFLINE is set); {remedy}")
    if not huggingface_hub.get_token():
        fail(f"no Hugging Face token (run `hf auth login` or set HF_TOKEN); {remedy}")
    if hub_offline():  # one quick probe, instead of the client's retries for half a minute
        fail(f"cannot upload: the Hugging Face hub is out of reach; {remedy}")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory(prefix="helm-upload-") as folder:
        files = {HUB_FILE: Path(checkpoint).read_bytes(), "README.md": model_card(ckpt, repo_id, returns, "replay.mp4")}
        if video is not None:
            files["replay.mp4"] = Path(video).read_bytes()
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data.encode() if isinstance(data, str) else data)
        try:
            api = huggingface_hub.HfApi()
            url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=f"{ckpt['algorithm']}_ppo.py agent for {ckpt['args']['env_id']}",
            )
        except Exception as e:  # noqa: BLE001 - network, permission and server errors all end here
            fail(f"upload to {repo_id} failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}; {remedy}")
    print(f"uploaded {', '.join(sorted(files))} to {url}")
    return sorted(files)


# ---------------------------------------------------------------------------------------------


def main(cli):
    if cli.episodes < 1 or cli.num_envs < 1 or cli.fps < 1:
        fail("--episodes, --num-envs and --fps must be >= 1")
    if cli.seed is not None and not 0 <= cli.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {cli.seed}")
    if (cli.checkpoint is None) == (cli.hub is None):
        fail("give a checkpoint file or --hub REPO_ID (one of them)")
    path = cli.checkpoint if cli.hub is None else download_checkpoint(cli.hub, cli.hub_file)
    if cli.upload:
        returns, video = evaluate(path, cli.episodes, cli.out_dir, cli.cuda, from_hub=cli.hub is not None)
        push_to_hub(path, cli.upload, returns, video)
        return
    window = cli.render and has_display()
    if cli.render and not window:
        print("no display: --render shows no window; the video with the memory strip is written instead")
    video = cli.capture_video or (cli.render and not window)
    loaded = load(path, cli.num_envs, cli.cuda, frames=video or window, from_hub=cli.hub is not None)
    n_layer = loaded.trxl.n_layer
    if not -n_layer <= cli.attention_layer < n_layer:
        fail(f"--attention-layer must be in [{-n_layer}, {n_layer - 1}] (the model keeps {n_layer} layers)")
    layer = cli.attention_layer % n_layer
    out_dir = Path(cli.out_dir or Path("videos") / f"{safe_name(loaded.ckpt.get('run_name'))}-enjoy")
    picture = Picture(loaded.algorithm, layer)
    outputs = []
    if video:
        outputs.append(Video(out_dir, picture, cli.fps))
    if window:
        outputs.append(Window(picture, cli.fps))
    if cli.attention:
        outputs.append(AttentionMaps(out_dir, layer, cli.attention_heads))
    if cli.trace:
        outputs.append(Trace(out_dir / f"trace.{cli.trace}", cli.trace))
    ckpt = loaded.ckpt
    print(f"{loaded.algorithm} agent from {path} (step {ckpt.get('global_step')}) on {loaded.args.env_id}")
    try:
        returns = play(loaded, cli.episodes, outputs, cli.greedy, cli.seed, layer, cli.show_memory)
    except KeyboardInterrupt:  # Ctrl-C, or the window closed: what was written stays
        print("stopped")
        return
    print(f"mean return over {len(returns)} episodes: {np.mean(returns):.3f} +- {np.std(returns):.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
    sys.exit(0)
