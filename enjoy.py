"""Watch a trained HELM, HELMv2 or SHELM agent, read its memory, share it on the Hugging Face hub.

    python enjoy.py runs/<run_name>/model_best.pt --episodes 3 --capture-video --attention --trace csv
    python enjoy.py --hub someone/MiniGrid-MemoryS11-v0-shelm_ppo-seed1 --capture-video
    python enjoy.py runs/<run_name>/model_final.pt --upload someone/my-shelm-agent

Loads a checkpoint of helm_ppo.py, helmv2_ppo.py or shelm_ppo.py (a local file, or one downloaded from
the hub), rebuilds the frozen models it was trained with and runs the policy, the frozen encoder in
evaluation mode (HELMv2's running statistics stay fixed). For env 0 it shows what the memory holds:
a video with a text strip under each frame, heatmaps of the Transformer-XL's attention, a trace of
every step, a window, or lines on stdout (--show-memory). Playing, the video and the hub live in the
package helm_utils/ (evaluation, memory_view, hub), which the training scripts' --upload-model uses too;
nothing imports this file. Docs: docs/enjoy.md.
"""

import csv
import io
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from helm_utils import fail, files
from helm_utils.evaluation import evaluate, load, play, safe_name
from helm_utils.hub import HUB_FILE, download_checkpoint, push_to_hub
from helm_utils.memory_view import Output, Picture, Video


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
    """directory of the videos, heatmaps and trace (default: videos/<run_name>-enjoy); existing files are kept"""
    env_id: str | None = None
    """the checkpoint's env id, given to run it when it names a module to import (module:Env-v0)"""
    upload: str | None = None
    """evaluate the checkpoint and upload it, a model card and a video to this Hugging Face hub repository"""
    seed: int | None = None
    """environment seed (default: the training seed + 10000, so evaluation episodes are new ones)"""
    cuda: bool = True
    """use CUDA when available"""


# ---------------------------------------------------------------------------------------------
# Outputs beside the video (helm_utils/memory_view.py): a window, attention heatmaps, a trace
# ---------------------------------------------------------------------------------------------


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
        files.output_dir(self.out_dir, "--out-dir")
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
        path = self.out_dir / f"attention-episode-{episode:03d}.png"
        path = files.write_new(path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        self.written.append(path)
        print(f"attention: {path}")
        self.rows, self.labels = [], []

    def close(self):
        self.rows, self.labels = [], []


class Trace(Output):
    """Every step of env 0 as one CSV row or JSON line, written as it happens into a file of its own that takes
    its name when enjoy.py ends (files.NewFile: no link followed, an existing trace kept: trace-2.csv)."""

    FIELDS = ["episode", "step", "action", "reward", "value", "words", "window"]
    FIELDS += ["attended_slot", "attended_step", "attended_word"]

    def __init__(self, path, kind):
        self.path, self.kind = Path(path), kind
        files.output_dir(self.path.parent, "--out-dir")
        self.file = files.NewFile(self.path)
        self.row = io.StringIO()
        self.csv = csv.DictWriter(self.row, self.FIELDS) if kind == "csv" else None
        if self.csv:
            self.csv.writeheader()
            self.flush()

    def flush(self):
        self.file.write(self.row.getvalue())
        self.row.seek(0)
        self.row.truncate()

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
            self.row.write(json.dumps(row) + "\n")
        self.flush()

    def close(self):
        if self.file.written is None:
            path = self.file.close()
            print(f"trace: {path}" + (f" ({self.path} exists: kept)" if path != self.path else ""))


# ---------------------------------------------------------------------------------------------


def stop_on_sigterm(signum, frame):
    """SIGTERM as Ctrl-C: the outputs are closed (what was written keeps its name), then enjoy.py ends."""
    raise KeyboardInterrupt


MAX_FPS = 1000  # what a video or a window can show; ffmpeg refuses absurd rates


def main(cli):
    if cli.episodes < 1 or cli.num_envs < 1 or not 1 <= cli.fps <= MAX_FPS:
        fail(f"--episodes and --num-envs must be >= 1 and --fps in [1, {MAX_FPS}]")
    if cli.seed is not None and not 0 <= cli.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {cli.seed}")
    if (cli.checkpoint is None) == (cli.hub is None):
        fail("give a checkpoint file or --hub REPO_ID (one of them)")
    path = cli.checkpoint if cli.hub is None else download_checkpoint(cli.hub, cli.hub_file)
    if cli.upload:
        hub = cli.hub is not None
        returns, video = evaluate(path, None, cli.episodes, cli.cuda, cli.out_dir, from_hub=hub, env_id=cli.env_id)
        push_to_hub(path, cli.upload, returns, video)
        return
    window = cli.render and has_display()
    if cli.render and not window:
        print("no display: --render shows no window; the video with the memory strip is written instead")
    video = cli.capture_video or (cli.render and not window)
    loaded = load(path, None, cli.num_envs, cli.cuda, video or window, from_hub=cli.hub is not None, env_id=cli.env_id)
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
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    main(tyro.cli(Args))
    sys.exit(0)
