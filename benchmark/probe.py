"""Memory probe: does the frozen memory of HELM, HELMv2 and SHELM carry the cue of a memory task?

    python benchmark/probe.py --trxl-model tiny-random --clip-model tiny-random     # all scripts, MemoryS7, CPU
    python benchmark/probe.py --env-id MiniGrid-MemoryS11-v0 --scripts shelm_ppo.py --episodes 400
    python benchmark/probe.py --variants "n2:--n-layer 2" "n2-ablated:--n-layer 2 --ablate-memory"

No RL, nothing trained but linear classifiers (docs/probe.md):

1. Episodes of a memory task are collected with a fixed behaviour policy, in lanes of back-to-back episodes,
   as the training's vector env makes them (--num-envs envs, each reset within the step its episode ends).
   MiniGrid-Memory (any size): a scripted policy turns round to the cue (the object in the start room,
   key or ball: the label), looks at it, turns away, walks to the junction, waits there for --wait steps
   without ever facing the corridor back to the cue, and walks to one of the two end objects at random.
   MiniWorld-TMaze/YMaze (label: the arm the box is in): a scripted policy walks to the junction, looks
   into both arms, turns round, walks back down the stem and turns to and fro there until the time limit.
   Memory Gym's MortarMayhem (label: the first command): a random policy. bsuite's memory_len and memory_size
   (label: the first context bit): a random policy (no action matters before the last). The policy never
   depends on the label.
2. Each script (imported, not copied) runs its own frozen pipeline over the lanes, exactly as its training
   loop does: `init_memory`, then at every step `reset_memory` where an episode has just begun, the
   script's `encoder`, its Transformer-XL, `memory_readout`. The read-out at step t is what the agent
   receives with the observation of step t.
3. Steps since the cue: at step t of an episode, t - (the last step <= t at which the cue was in view);
   0 while it is in view, undefined (not used) before it was first seen. In view is read from the env's
   state: MiniGrid's own visibility (`agent_sees`: the cue's cell in the agent's 7x7 view and not
   occluded, the same computation that draws the observation), MiniWorld's occlusion query of the box
   (`get_visible_ents`), Memory Gym's command display (the first command on screen).
4. For each delay d of --delays, one logistic regression per held-out fold predicts the label from the
   read-out of every step that is d steps after the cue, from complete episodes only. Folds are whole
   episodes (--folds, stratified by label): every episode is predicted once by a classifier that never
   saw it. Features are standardized on the training episodes (features constant there are dropped; with
   none left the classifier predicts the training episodes' majority class); the L2 regularization C is
   chosen in --c-grid by the log-loss of a cross-validation over the training episodes (one value: fixed).
   Accuracy with a 95% bootstrap interval over the held-out episodes (--bootstrap resamples of episodes).
5. Controls: --ablate-memory (the read-out is zeros: must sit at chance), the frozen encoder's output at
   step t (what the Transformer-XL is given at that step: the cue is in it only while in view), the raw
   observation at step t (pixels: what is decodable without any memory), and chance: the held-out
   accuracy of always predicting the training episodes' majority class.
6. The cue's influence (MiniGrid-Memory and bsuite, --counterfactual): a twin of every env shows the other cue and
   takes the same actions (the trajectory is the same); the relative change of every feature between the
   twins, at each delay, says whether the read-out keeps any trace of the cue, decodable or not.

Written to --out: probe.png (accuracy and influence against delay, a line per variant, a column per
script), probe.md (the tables and the encoders' token statistics) and probe.json (everything, with the
arguments and the time of each phase), replaced together once all three are made. --replot writes the three
again from a probe.json, whose structure is checked first.

Every argument, the probe's and each variant's (through its script's own Args and check_args, with the probe's
--env-id and --num-envs), --out and what the probe will hold in memory (the frames, the read-outs, the bootstrap;
helm_utils.arguments.check_fits with the scripts' own estimate) are checked before anything runs: one `error:`
line otherwise. A variant may not give the flags the probe sets for all of them (--env-id, --num-envs, --cuda):
its episodes are collected once, for every variant.
"""

import copy
import dataclasses
import importlib
import io
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helm_utils import arguments, fail  # noqa: E402
from helm_utils.files import output_files, parse_json, read_json, replace_together, write_new  # noqa: E402

SCRIPTS = ("shelm_ppo.py", "helm_ppo.py", "helmv2_ppo.py")
# one factor at a time around --n-layer 2 --mem-len 64 (64 steps hold the cue of every delay probed)
DEFAULT_VARIANTS = (
    "n1:--n-layer 1 --mem-len 64",
    "n2:--n-layer 2 --mem-len 64",
    "n18:--n-layer 18 --mem-len 64",
    "n2-mem16:--n-layer 2 --mem-len 16",
    "n2-zero:--n-layer 2 --mem-len 64 --memory-reset zero",
    "n2-ablated:--n-layer 2 --mem-len 64 --ablate-memory",
)
# script arguments the probe hands on to every script that has them
PASSTHROUGH = ("trxl_model", "clip_model", "clip_pretrained", "embeddings_dir")
# arguments of init_memory, reset_memory and memory_readout, not of build_memory: variants that differ only
# in these share one build of the frozen models and one pass of the encoder (the encoder sees the same steps)
MEMORY_HANDLING = ("memory_reset", "ablate_memory")


@dataclass
class Args:
    scripts: tuple[str, ...] = SCRIPTS
    """scripts whose memory is probed"""
    env_id: str = "MiniGrid-MemoryS7-v0"
    """MiniGrid-Memory*, MiniWorld-TMaze*/YMaze* or Memory Gym's MortarMayhem(-Grid)"""
    episodes: int = 200
    """complete episodes to probe (the first to end; those still running when they have are not used)"""
    num_envs: int = 16
    """envs stepped together: lanes of back-to-back episodes, as the training's vector env"""
    policy: Literal["auto", "scripted", "random"] = "auto"
    """behaviour policy: auto is scripted where there is one (MiniGrid-Memory, MiniWorld), random elsewhere"""
    wait: tuple[int, int] = (30, 50)
    """scripted MiniGrid-Memory policy: steps waited at the junction, drawn uniformly from [min, max]"""
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    """NAME:FLAGS, the script arguments of each variant (after --script-args)"""
    script_args: str = ""
    """arguments given to every script, e.g. --script-args="--frozen-dtype float32" (with =)"""
    trxl_model: str | None = None
    """the scripts' --trxl-model (default: theirs, the pretrained transfo-xl-wt103)"""
    clip_model: str | None = None
    """the scripts' --clip-model, where they have one"""
    clip_pretrained: str | None = None
    """the scripts' --clip-pretrained, where they have one"""
    embeddings_dir: str | None = None
    """SHELM's --embeddings-dir (the vocabulary embeddings file is built there on first use)"""
    delays: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 30, 40)
    """steps since the cue at which the cue is decoded"""
    folds: int = 5
    """held-out folds of episodes"""
    inner_folds: int = 3
    """folds of the training episodes that choose C"""
    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
    """inverse L2 regularization strengths of the logistic regression (on standardized features), chosen by
    cross-validated log-loss over the training episodes (one value: fixed)"""
    standardize: bool = True
    """standardize the features (on the training episodes) before the logistic regression"""
    bootstrap: int = 2000
    """bootstrap resamples of the held-out episodes for the 95% intervals"""
    controls: bool = True
    """also decode the encoder's output and the raw observation at step t (no memory)"""
    counterfactual: bool = True
    """MiniGrid-Memory and bsuite: also run twin episodes with the other cue, and measure the cue's influence on each
    read-out (its relative change between the twins), at each delay"""
    jobs: int = 0
    """processes that decode the delays side by side (0: one per CPU core, at most one per delay)"""
    seed: int = 1
    """seed of the envs, the policy, the folds and the bootstrap"""
    cuda: bool = True
    """run the frozen models on the GPU where there is one"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    out: str = "runs/probe"
    """folder of probe.png, probe.md and probe.json"""
    replot: str | None = None
    """only write probe.png and probe.md again from this probe.json (into --out)"""


# ---------------------------------------------------------------------------------------------
# The cue of each memory task: its label, when it is in view, and a behaviour policy
# ---------------------------------------------------------------------------------------------

# MiniGrid actions and directions (minigrid.core.actions.Actions; agent_dir 0 east, 1 south, 2 west, 3 north)
LEFT, RIGHT, FORWARD, NOOP = 0, 1, 2, 6  # `done` does nothing in MiniGrid-Memory
EAST, SOUTH, WEST, NORTH = 0, 1, 2, 3


class MiniGridMemory:
    """MiniGrid-Memory: the cue is the object in the start room (key or ball) at (1, height // 2 - 1); the
    agent starts facing east, away from it. In view: MiniGrid's agent_sees, the visibility that also
    decides what the observation shows."""

    classes = ("key", "ball")
    has_script = True

    @staticmethod
    def cue_pos(u):
        return 1, u.height // 2 - 1

    def label(self, u):
        return self.classes.index(u.grid.get(*self.cue_pos(u)).type)

    def in_view(self, u):
        return bool(u.agent_sees(*self.cue_pos(u)))

    def make_twin(self, env):
        """Make env the twin of an env of the same seed: every episode the same but for the cue, the other
        object (drawn after everything else, so the layout and the agent's start are the same). The end
        objects, walls and dynamics do not depend on the cue, so the same actions give the same trajectory;
        the frames differ only where the cue is in view."""
        from minigrid.core.world_object import Ball, Key

        u = env.unwrapped
        generate = u._gen_grid

        def gen_grid(width, height):
            generate(width, height)
            cue = u.grid.get(*self.cue_pos(u))
            u.grid.set(*self.cue_pos(u), (Ball if cue.type == "key" else Key)(cue.color))

        u._gen_grid = gen_grid  # MiniGridEnv.reset calls self._gen_grid

    @staticmethod
    def same_course(u, twin):
        """Whether the twin still follows the env's trajectory (the same actions must move both alike)."""
        return np.array_equal(u.agent_pos, twin.agent_pos)

    def script(self, u, rng, wait):
        """Actions of one episode (a generator that reads the env's state): turn round to face the start room,
        walk towards the cue until it is in view, look at it for 0-2 more steps, turn round, walk east to the
        junction, wait there for `wait` steps turning at random between north, east and south (never west,
        down the corridor to the cue), then turn to one of the two end objects at random and step next to it,
        which ends the episode. Nothing depends on the label."""
        cue, junction_x = self.cue_pos(u), u.success_pos[0]
        turn = LEFT if rng.random() < 0.5 else RIGHT
        while u.agent_dir != WEST:
            yield turn
        while not u.agent_sees(*cue):
            ahead = u.grid.get(*u.front_pos)
            if ahead is not None and not ahead.can_overlap():
                break
            yield FORWARD
        for _ in range(rng.integers(0, 3)):
            yield NOOP
        turn = LEFT if rng.random() < 0.5 else RIGHT
        while u.agent_dir != EAST:
            yield turn
        while u.agent_pos[0] < junction_x:
            yield FORWARD
        allowed = {EAST: (LEFT, RIGHT, NOOP), NORTH: (RIGHT, NOOP), SOUTH: (LEFT, NOOP)}
        for _ in range(rng.integers(wait[0], wait[1] + 1)):
            choices = allowed[u.agent_dir]
            yield choices[rng.integers(len(choices))]
        target = NORTH if rng.random() < 0.5 else SOUTH
        towards_east = {NORTH: RIGHT, SOUTH: LEFT}  # from north or south, by way of east
        while u.agent_dir != target:
            yield (LEFT if target == NORTH else RIGHT) if u.agent_dir == EAST else towards_east[u.agent_dir]
        yield FORWARD


class MiniWorldMaze:
    """MiniWorld-TMaze and YMaze: the cue is the red box, the label the arm it is in (the sign of its z: the two
    arms lie on either side of the stem's axis, x). In view: MiniWorld's occlusion query (get_visible_ents)."""

    classes = ("arm z<0", "arm z>0")
    has_script = True
    JUNCTION_X = {"TMaze": 9.5, "YMaze": 0.0}  # where the stem meets the arms
    LEFT, RIGHT, FORWARD = 0, 1, 2  # turn_left adds turn_step (15 degrees) to dir; dir 0 faces +x

    def label(self, u):
        return int(u.box.pos[2] > 0)

    def in_view(self, u):
        return u.box in u.get_visible_ents()

    def script(self, u, rng, wait):
        """Actions of one episode: face the junction (+x), walk to it, look left and right (90 degrees each way:
        the box is in one arm), turn round and walk back down the stem, then turn to and fro by one step
        facing away from the arms until the episode's time limit. Nothing depends on the label."""
        junction_x = self.JUNCTION_X[type(u).__name__]

        def heading():  # degrees in [-180, 180)
            return (math.degrees(u.agent.dir) + 180) % 360 - 180

        def face(target):
            while abs((heading() - target + 180) % 360 - 180) > 7.5:
                yield self.LEFT if (target - heading()) % 360 < 180 else self.RIGHT

        def walk(done):
            for _ in range(200):
                if done():
                    return
                before = u.agent.pos.copy()
                yield self.FORWARD
                if np.allclose(before, u.agent.pos):  # a wall
                    return

        yield from face(0)
        yield from walk(lambda: u.agent.pos[0] >= junction_x)
        first = 90 if rng.random() < 0.5 else -90
        yield from face(first)
        yield from face(-first)
        yield from face(180 if first > 0 else -180)
        yield from walk(lambda: u.agent.pos[0] <= junction_x - 6)
        while True:
            yield self.LEFT
            yield self.RIGHT


class MortarMayhem:
    """Memory Gym's MortarMayhem and MortarMayhem-Grid: commands are shown one by one at the start (the agent
    cannot move meanwhile); the label is the first command. In view: the frame shown is one of the first
    command's (the first run of frames of the display list, before its first gap)."""

    has_script = False

    def __init__(self):
        from memory_gym.pygame_assets import Command

        self.classes = tuple(Command.COMMANDS)

    def label(self, u):
        self.classes = tuple(self.classes[: u.reset_params["allowed_commands"]])  # the commands this env draws
        return self.classes.index(u._commands[0])

    def in_view(self, u):
        shown = u._command_visualization_clone
        frame = len(shown) - len(u._command_visualization) - 1  # the frame on screen now
        first = shown[0]
        return 0 <= frame < len(shown) and all(c == first for c in shown[: frame + 1])


class BsuiteMemory:
    """bsuite's memory_len and memory_size (helm_utils/bsuite_memory.py): the label is the first context bit (-1 or
    +1), in view in the observations that show the context, the first two of an episode (bsuite's clock is at most
    1 after the reset and the first step). No action matters before the last one: a random policy."""

    classes = ("-1", "+1")
    has_script = False

    def label(self, u):
        return int(u._env._context[0])  # bsuite's MemoryChain (shimmy's binding holds it): 0 for -1, 1 for +1

    def in_view(self, u):
        return u._env._timestep <= 1

    def make_twin(self, env):
        """Make env the twin of an env of the same seed: every episode the same (bsuite's own draws, so the same
        query and the same later episodes) but for the first context bit, the other one. The frames differ only
        while the context shows, and so does nothing else before the last step's reward."""
        chain = env.unwrapped._env  # bsuite's MemoryChain
        draw = chain._reset

        def reset():
            timestep = draw()
            chain._context[0] = 1 - chain._context[0]
            return timestep._replace(observation=chain._get_observation())

        chain._reset = reset

    @staticmethod
    def same_course(u, twin):
        return u._env._timestep == twin._env._timestep and u._env._query == twin._env._query


def cue_task(env_id):
    if env_id.startswith("bsuite/memory_"):
        return BsuiteMemory()
    if env_id.startswith(("MiniGrid-Memory", "HELM-PassiveMemory")):
        return MiniGridMemory()
    if re.match(r"MiniWorld-[TY]Maze(-v\d+)?$", env_id):
        return MiniWorldMaze()
    if re.match(r"MortarMayhem(-Grid)?-v\d+$", env_id):
        return MortarMayhem()
    fail(
        f"{env_id}: the probe knows the cue of MiniGrid-Memory*, HELM-PassiveMemory*, MiniWorld-TMaze/YMaze (not "
        "their Left/Right variants: one class), MortarMayhem(-Grid)-v0 and bsuite/memory_len|memory_size/<i>"
    )


@dataclass
class Lanes:
    """What the envs showed, step by step. obs (T, N, H, W, 3) uint8; starts (T, N): the frame is the first of
    an episode; episode (T, N): the index of the frame's episode in labels, -1 for episodes still running
    when the collection stopped; since_cue (T, N): steps since the cue was last in view, -1 before it was
    first seen in the episode. labels, lengths, cue_seen: one per complete episode. twin_obs: the frames of
    the twin envs (--counterfactual), each episode with the other cue and the same actions."""

    obs: np.ndarray
    starts: np.ndarray
    episode: np.ndarray
    since_cue: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    cue_seen: np.ndarray
    classes: tuple
    twin_obs: np.ndarray | None = None  # the frames of the twin episodes (the other cue), where there are twins


@dataclass
class Episode:
    label: int
    policy: object
    last_seen: int | None = None
    length: int = 0
    index: int = -1  # in the list of complete episodes, once it has ended


def collect(module, task, args):
    """Step --num-envs envs made by the script's own make_env with the behaviour policy until --episodes
    episodes have ended. A finished env is reset within the step (its next frame is the new episode's
    first), as the training's vector env does, so each env is a lane of back-to-back episodes."""
    n = args.num_envs
    envs = [module.make_env(args.env_id, i, False, "probe")() for i in range(n)]
    twins = None
    if args.counterfactual and getattr(task, "make_twin", None) is not None:
        twins = [module.make_env(args.env_id, i, False, "probe")() for i in range(n)]
        for twin in twins:
            task.make_twin(twin)
    rng = np.random.default_rng(args.seed)
    scripted = scripted_policy(task, args)

    def begin(env):
        u = env.unwrapped
        return Episode(task.label(u), task.script(u, rng, args.wait) if scripted else None)

    frames, current, twin_frames = [], [], []
    for i, env in enumerate(envs):
        env.action_space.seed(args.seed * 1000 + i)
        frame, _ = env.reset(seed=args.seed * 1000 + i)
        frames.append(frame)
        current.append(begin(env))
        if twins:
            twin_frames.append(twins[i].reset(seed=args.seed * 1000 + i)[0])
    obs, starts, since, owners, done, twin_obs = [], [], [], [], [], []
    start_row = np.ones(n, bool)
    t, started, every = 0, time.time(), max(1, args.episodes // 10)
    print(f"collecting {args.episodes} episodes of {args.env_id} in {n} envs{' and their twins' if twins else ''}")
    while len(done) < args.episodes:
        row = np.full(n, -1)
        for i, (env, ep) in enumerate(zip(envs, current)):
            if task.in_view(env.unwrapped):
                ep.last_seen = ep.length
            if ep.last_seen is not None:
                row[i] = ep.length - ep.last_seen
        obs.append(np.stack(frames))
        if twins:
            twin_obs.append(np.stack(twin_frames))
        starts.append(start_row)
        since.append(row)
        owners.append(list(current))
        start_row = np.zeros(n, bool)
        for i, (env, ep) in enumerate(zip(envs, current)):
            action = next(ep.policy, None) if ep.policy is not None else None
            if action is None:  # the random policy (a script never runs out before its episode ends)
                action = env.action_space.sample()
            frames[i], _, terminated, truncated, _ = env.step(action)
            ep.length += 1
            if twins:
                twin_frames[i], _, twin_terminated, twin_truncated, _ = twins[i].step(action)
                same = task.same_course(env.unwrapped, twins[i].unwrapped)
                if not same or (terminated, truncated) != (twin_terminated, twin_truncated):
                    raise RuntimeError(f"the twin of env {i} left its trajectory at step {t}")
            if terminated or truncated:
                ep.index = len(done)
                done.append(ep)
                if len(done) % every == 0 and len(done) < args.episodes:
                    print(f"  {len(done)} of {args.episodes} episodes, {t + 1} steps, {time.time() - started:.0f} s")
                frames[i], _ = env.reset()
                current[i] = begin(env)
                start_row[i] = True
                if twins:
                    twin_frames[i], _ = twins[i].reset()
        t += 1
    return Lanes(
        obs=np.stack(obs),
        starts=np.stack(starts),
        episode=np.array([[ep.index for ep in row] for row in owners]),
        since_cue=np.stack(since),
        labels=np.array([ep.label for ep in done]),
        lengths=np.array([ep.length for ep in done]),
        cue_seen=np.array([ep.last_seen is not None for ep in done]),
        classes=task.classes,
        twin_obs=np.stack(twin_obs) if twins else None,
    )


# ---------------------------------------------------------------------------------------------
# The scripts' frozen pipeline
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def memory_readouts(module, trxl, encoder, obs, starts, settings, device):
    """Run lanes of observations through a script's frozen pipeline as its training loop does.

    module: the script (imported); trxl, encoder: from its build_memory, fresh (HELMv2's encoder keeps
    running statistics, which then start empty as in a new training run; it stays in training mode as
    there). obs (T, N, H, W, 3) uint8 numpy, the N envs' frames step by step; starts (T, N) bool, True where
    the frame is an episode's first (row 0 must be all True: the memories start empty). settings: a list of
    (memory_reset, ablate_memory), one memory per item, all fed by the same encoder outputs (as separate
    training runs would be: the encoder sees the same frames in the same batches).

    Returns (readouts, inputs, tokens): readouts, one float32 array (T, N, d_model) per setting, the agent's
    memory input at each step, the same numbers as the training loop's trxl_outs buffer; inputs (T, N,
    tokens x d_model) float32, what the encoder gave the Transformer-XL at each step; tokens (T, n, k), the
    encoder's token ids (n = N, or 1 where the encoder names env 0's only, as HELMv2)."""
    steps, n = starts.shape
    if not np.all(starts[0]):
        raise ValueError("the first row of starts must be all True: the memories start empty")
    memories = [module.init_memory(trxl, n, reset, device) for reset, _ in settings]
    readouts = [np.zeros((steps, n, trxl.d_model), np.float32) for _ in settings]
    inputs, tokens = None, []
    for t in range(steps):
        if t:  # as the training loop: the memory of an env whose episode has just begun is reset before its frame
            done = torch.as_tensor(starts[t], dtype=torch.bool, device=device)
            memories = [
                module.reset_memory(mems, mask, done, reset) for (mems, mask), (reset, _) in zip(memories, settings)
            ]
        trxl_in, step_tokens = encoder(np.ascontiguousarray(obs[t]))
        for j, (_, ablate) in enumerate(settings):
            trxl_out, mems, mask = trxl(trxl_in, *memories[j])
            memories[j] = (mems, mask)
            readouts[j][t] = module.memory_readout(trxl_out, ablate).float().cpu().numpy()
        x = trxl_in.float().permute(1, 0, 2).reshape(n, -1).cpu().numpy()
        if inputs is None:
            inputs = np.zeros((steps, *x.shape), np.float32)
        inputs[t] = x
        tokens.append(step_tokens.cpu().numpy())
    return readouts, inputs, np.stack(tokens)


# ---------------------------------------------------------------------------------------------
# Decoding: held-out logistic regression, bootstrap intervals
# ---------------------------------------------------------------------------------------------


def held_out_predictions(X, y, groups, folds, c_grid, seed, inner_folds=3, standardize=True):
    """Predictions of every row by a classifier that never saw its group (episode), and of the chance
    predictor (the majority class of the training groups). Outer folds: stratified by label, by group.
    Features are standardized on the training rows; those constant there are dropped; C is chosen in c_grid
    by the log-loss of a cross-validation over the training groups (stratified, by group too).
    Returns (predictions, chance predictions, the C of each fold)."""
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

    if not np.isfinite(X).all():
        raise ValueError("non-finite features")
    pred, chance, chosen = np.zeros(len(y), int), np.zeros(len(y), int), []
    n_splits = min(folds, min_groups_per_class(y, groups))
    if n_splits < 2:
        raise ValueError("too few episodes of some class for held-out folds")
    outer = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in outer.split(X, y, groups):
        classes, counts = np.unique(y[train], return_counts=True)
        chance[test] = classes[np.argmax(counts)]
        std = X[train].std(0)
        keep = std > 1e-6 * (np.abs(X[train]).mean(0) + 1e-12)  # constant on the training rows: no information
        if len(classes) < 2 or not keep.any():
            pred[test] = chance[test]
            continue
        Xtr, Xte = X[train][:, keep], X[test][:, keep]
        if standardize:
            scaler = StandardScaler().fit(Xtr)
            Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
        if Xtr.shape[1] > Xtr.shape[0]:
            # the weights of an L2-regularized linear model lie in the span of its training rows (the loss's
            # gradient does, and the penalty keeps nothing else): fitted in an orthonormal basis of that span,
            # the same predictions with at most one dimension per training row (pixels: 9408 -> about 160)
            _, sv, vt = np.linalg.svd(Xtr, full_matrices=False)
            basis = vt[sv > sv[0] * 1e-10].T
            Xtr, Xte = Xtr @ basis, Xte @ basis
        inner_splits = min(inner_folds, min_groups_per_class(y[train], groups[train]))
        # checked here once: sklearn's own checks of every small fit would cost more than the fits
        with warnings.catch_warnings(), sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
            warnings.simplefilter("ignore", ConvergenceWarning)
            if len(c_grid) == 1 or inner_splits < 2:
                c = c_grid[0] if len(c_grid) == 1 else 1.0
                clf = LogisticRegression(C=c, solver="newton-cholesky", max_iter=200).fit(Xtr, y[train])
            else:
                inner = StratifiedGroupKFold(n_splits=inner_splits, shuffle=True, random_state=seed)
                splits = list(inner.split(Xtr, y[train], groups[train]))
                clf = LogisticRegressionCV(
                    Cs=list(c_grid),
                    cv=splits,
                    scoring="neg_log_loss",
                    l1_ratios=(0.0,),
                    use_legacy_attributes=False,
                    solver="newton-cholesky",  # a few Newton steps: lbfgs takes hundreds where C is large
                    max_iter=200,
                )
                clf.fit(Xtr, y[train])
                c = float(clf.C_)
        chosen.append(c)
        pred[test] = clf.predict(Xte)
    return pred, chance, chosen


def min_groups_per_class(y, groups):
    return min(len(np.unique(groups[y == c])) for c in np.unique(y)) if len(y) else 0


def bootstrap_interval(correct, groups, resamples, seed):
    """95% percentile interval of the accuracy, resampling groups (episodes) with replacement."""
    _, inverse = np.unique(groups, return_inverse=True)
    hits, counts = np.bincount(inverse, weights=correct), np.bincount(inverse)
    draws = np.random.default_rng(seed).integers(0, len(counts), (resamples, len(counts)))
    accuracies = hits[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(accuracies, [2.5, 97.5])
    return float(low), float(high)


def decode_delay(X, y, groups, args):
    """Accuracy, interval, chance and the chosen C of one delay's rows (a process of its own with --jobs)."""
    pred, chance, chosen = held_out_predictions(
        X, y, groups, args.folds, args.c_grid, args.seed, args.inner_folds, args.standardize
    )
    correct, chance_correct = (pred == y).astype(float), (chance == y).astype(float)
    return {
        "accuracy": float(correct.mean()),
        "interval": bootstrap_interval(correct, groups, args.bootstrap, args.seed),
        "chance": float(chance_correct.mean()),
        "chance_interval": bootstrap_interval(chance_correct, groups, args.bootstrap, args.seed),
        "C": chosen,
    }


def decode(features, lanes, args):
    """{delay: accuracy, interval, chance, ...} of the label from features (T, N, F) at each delay; the delays
    are decoded in --jobs processes (the same numbers whatever their number)."""
    complete = lanes.episode >= 0
    results, work = {}, []
    for d in args.delays:
        rows = complete & (lanes.since_cue == d)
        groups = lanes.episode[rows]
        y = lanes.labels[groups]
        results[d] = {"samples": int(rows.sum()), "episodes": len(np.unique(groups))}
        if len(np.unique(y)) < 2 or min_groups_per_class(y, groups) < 2:
            results[d]["accuracy"] = None
        else:
            work.append((d, (features[rows].astype(np.float64), y, groups, args)))
    jobs = min(len(work), args.jobs or os.cpu_count() or 1)
    if jobs > 1:
        from joblib import Parallel, delayed

        decoded = Parallel(n_jobs=jobs)(delayed(decode_delay)(*task) for _, task in work)
    else:
        decoded = [decode_delay(*task) for _, task in work]
    for (d, _), entry in zip(work, decoded):
        results[d] |= entry
    return results


def influence(features, twin_features, lanes, delays):
    """{delay: the cue's influence}: the relative change of the features between twin episodes (the same
    episode with the other cue), ||f - f'|| / ||f||, over the steps of complete episodes at that delay: its
    median and maximum, and the share of steps where the twins' features are identical (no trace at all)."""
    complete = lanes.episode >= 0
    out = {}
    for d in delays:
        rows = complete & (lanes.since_cue == d)
        f, g = features[rows].astype(np.float64), twin_features[rows].astype(np.float64)
        if not len(f):
            out[d] = None
            continue
        change = np.linalg.norm(f - g, axis=-1) / np.maximum(np.linalg.norm(f, axis=-1), 1e-30)
        out[d] = {
            "median": float(np.median(change)),
            "max": float(change.max()),
            "identical": float(np.mean(np.all(f == g, axis=-1))),
        }
    return out


# ---------------------------------------------------------------------------------------------
# What the encoders give the memory: distinct tokens per episode
# ---------------------------------------------------------------------------------------------


def token_statistics(tokens, inputs, lanes, vocab):
    """How much the encoder's output varies within and across episodes: distinct tokens (the words the
    memory reads as text), distinct input vectors and distinct observations per complete episode."""
    steps, n = lanes.starts.shape
    lanes_with_tokens = tokens.shape[1]  # N, or 1: the encoder names env 0's token only
    per_episode = {"tokens": [], "inputs": [], "observations": []}
    all_tokens = []
    for e in range(len(lanes.labels)):
        t_idx, l_idx = np.nonzero(lanes.episode == e)
        per_episode["inputs"].append(len({inputs[t, i].tobytes() for t, i in zip(t_idx, l_idx)}))
        per_episode["observations"].append(len({lanes.obs[t, i].tobytes() for t, i in zip(t_idx, l_idx)}))
        if l_idx[0] < lanes_with_tokens:
            words = [tuple(tokens[t, i].tolist()) for t, i in zip(t_idx, l_idx)]
            per_episode["tokens"].append(len(set(words)))
            all_tokens += words
    counts = {}
    for w in all_tokens:
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]

    def summary(values):
        if not values:
            return None
        return {"mean": float(np.mean(values)), "min": int(np.min(values)), "max": int(np.max(values))}

    return {
        "episodes_with_tokens": len(per_episode["tokens"]),
        "distinct_tokens_per_episode": summary(per_episode["tokens"]),
        "distinct_inputs_per_episode": summary(per_episode["inputs"]),
        "distinct_observations_per_episode": summary(per_episode["observations"]),
        "distinct_tokens_overall": len(counts),
        "top_tokens": [{"words": " ".join(vocab[i] for i in w), "share": c / len(all_tokens)} for w, c in top],
    }


# ---------------------------------------------------------------------------------------------
# Output: figure, table, JSON
# ---------------------------------------------------------------------------------------------


def fmt(entry):
    if entry.get("accuracy") is None:
        return "n/a"
    low, high = entry["interval"]
    return f"{entry['accuracy']:.2f} [{low:.2f}, {high:.2f}]"


def fmt_influence(entry):
    if not entry:
        return "n/a"
    if entry["identical"] == 1:
        return "0 (all)"
    same = f" ({entry['identical']:.0%})" if entry["identical"] > 0 else ""
    return f"{entry['median']:.1e}{same}"


def summary_line(row):
    twins = {d: f" ({fmt_influence(v.get('influence'))})" if "influence" in v else "" for d, v in row["delays"].items()}
    return ", ".join(f"d={d} {fmt(v)}{twins[d]}" for d, v in row["delays"].items())


def markdown(report):
    delays = report["args"]["delays"]
    lines = [
        f"Decoding accuracy of the cue ({', '.join(report['episodes']['classes'])}) from each feature at each "
        f"number of steps since the cue was last in view; {report['episodes']['complete']} held-out episodes of "
        f"{report['args']['env_id']}, 95% bootstrap interval over episodes.",
        "",
        "| script | variant | features | " + " | ".join(f"d={d}" for d in delays) + " |",
        "|---|---|---|" + "---|" * len(delays),
    ]
    for row in report["results"]:
        cells = [fmt(row["delays"][str(d)]) for d in delays]
        lines.append(f"| {row['script']} | {row['variant']} | {row['features']} | " + " | ".join(cells) + " |")
    chance = report["results"][0]["delays"] if report["results"] else {}
    cells = [f"{chance[str(d)]['chance']:.2f}" if chance[str(d)].get("chance") is not None else "n/a" for d in delays]
    lines.append("| chance | majority class | | " + " | ".join(cells) + " |")
    samples = [str(chance[str(d)]["episodes"]) for d in delays]
    lines.append("| episodes | | | " + " | ".join(samples) + " |")
    if any(v.get("influence") for r in report["results"] for v in r["delays"].values()):
        lines += [
            "",
            "The cue's influence: the median relative change of the features between twin episodes (the same "
            "actions, the other cue), |f - f'| / |f|; 0 (all) where the twins' features are identical at every "
            "step, and the share of identical steps in brackets where some are:",
            "",
            "| script | variant | features | " + " | ".join(f"d={d}" for d in delays) + " |",
            "|---|---|---|" + "---|" * len(delays),
        ]
        for row in report["results"]:
            cells = [fmt_influence(row["delays"][str(d)].get("influence")) for d in delays]
            lines.append(f"| {row['script']} | {row['variant']} | {row['features']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "What each encoder gives the Transformer-XL (complete episodes; HELMv2 names env 0's word only):",
        "",
        "| script | distinct tokens per episode (mean, min-max) | distinct tokens overall | most common | "
        "distinct inputs per episode | distinct observations per episode |",
        "|---|---|---|---|---|---|",
    ]

    def spread(summary):  # None: no complete episode had any
        return "n/a" if summary is None else f"{summary['mean']:.1f} ({summary['min']}-{summary['max']})"

    for script, s in report["tokens"].items():
        top = ", ".join(f"{t['words']} ({t['share']:.0%})" for t in s["top_tokens"][:3])
        lines.append(
            f"| {script} | {spread(s['distinct_tokens_per_episode'])} | {s['distinct_tokens_overall']} | {top} | "
            f"{spread(s['distinct_inputs_per_episode'])} | {spread(s['distinct_observations_per_episode'])} |"
        )
    return "\n".join(lines) + "\n"


INFLUENCE_FLOOR = 1e-9  # where the twins' features are identical, the influence is drawn at this level


def figure(report):
    """Accuracy against delay (and, with twins, the cue's influence), a column per script, a line per variant: the
    PNG file's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    scripts = list(dict.fromkeys(row["script"] for row in report["results"] if row["script"] != "-"))
    panels = scripts or ["-"]
    twins = any(v.get("influence") for r in report["results"] for v in r["delays"].values())
    fig, axes = plt.subplots(
        2 if twins else 1, len(panels), figsize=(4.4 * len(panels), 7.0 if twins else 4.0), squeeze=False
    )
    styles = {"memory": "-", "input": "--", "observation": ":"}
    variants = list(dict.fromkeys(r["variant"] for r in report["results"] if r["kind"] == "memory"))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {"input": "black", "observation": "grey"} | {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}
    handles = {}
    for column, script in enumerate(panels):
        ax = axes[0][column]
        rows = [r for r in report["results"] if r["script"] in (script, "-")]
        chance = [(int(k), v["chance"]) for k, v in rows[0]["delays"].items() if v.get("chance") is not None]
        if chance:
            handles["chance (majority class)"] = ax.plot(*zip(*chance), "-.", color="black", lw=0.8, alpha=0.7)[0]
        for r in rows:
            label = r["variant"] if r["kind"] == "memory" else r["features"]
            color = colors[r["variant"] if r["kind"] == "memory" else r["kind"]]
            d = [int(k) for k, v in r["delays"].items() if v.get("accuracy") is not None]
            acc = [r["delays"][str(k)]["accuracy"] for k in d]
            low = [r["delays"][str(k)]["interval"][0] for k in d]
            high = [r["delays"][str(k)]["interval"][1] for k in d]
            handles[label] = ax.plot(d, acc, styles[r["kind"]], marker="o", ms=3, color=color, lw=1.3)[0]
            ax.fill_between(d, low, high, color=color, alpha=0.1, linewidth=0)
            if twins:
                d = [int(k) for k, v in r["delays"].items() if v.get("influence")]
                change = [max(r["delays"][str(k)]["influence"]["median"], INFLUENCE_FLOOR) for k in d]
                axes[1][column].plot(d, change, styles[r["kind"]], marker="o", ms=3, color=color, lw=1.3)
        ax.set_title(script)
        ax.set_ylim(0.0, 1.05)
        ax.grid(alpha=0.3)
        axes[-1][column].set_xlabel("steps since the cue was last in view")
        if twins:
            axes[1][column].set_yscale("log")
            axes[1][column].set_ylim(INFLUENCE_FLOOR / 3, 3)
            axes[1][column].grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out decoding accuracy (95% CI)")
    if twins:
        axes[1][0].set_ylabel(f"cue's influence: median |f - f'| / |f|\n(identical twins drawn at {INFLUENCE_FLOOR:g})")
    fig.suptitle(f"Memory probe, {report['args']['env_id']}, {report['episodes']['complete']} episodes", fontsize=10)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.03 * (1 + len(handles) // 6), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=72)
    plt.close(fig)
    # a palette of 256 colours: a third of the size, the same to the eye
    png = io.BytesIO()
    Image.open(buffer).convert("RGB").quantize(256).save(png, format="PNG", optimize=True)
    return png.getvalue()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_variants(variants):
    parsed = []
    for v in variants:
        name, sep, flags = v.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.=+-]+", name):
            fail(f"--variants {v!r}: each variant is NAME:FLAGS, NAME of letters, digits and _.=+-")
        try:
            parsed.append((name, shlex.split(flags)))
        except ValueError as e:
            fail(f"--variants {v!r}: {e}")
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        fail(f"--variants: the names must differ, got {', '.join(names)}")
    return parsed


OUTPUTS = ("probe.json", "probe.md", "probe.png")  # one set: replaced together
# flags every variant gets from the probe, for the one collection of episodes all of them read
PROBE_SETS = ("env_id", "num_envs", "cuda")
MAX_DELAYS = 100  # --delays: columns of the table, points of the figure
MAX_STEPS = 100_000  # a delay or a wait, in steps: beyond any episode of the tasks probed
MAX_WORKERS = 1024  # --jobs, --threads
MAX_C = 100  # --c-grid values


def check_args(args):
    """The probe's own arguments, each bounded, before anything is imported, built or written."""
    if not args.scripts or len(set(args.scripts)) != len(args.scripts):
        fail(f"--scripts: give one or more of {', '.join(SCRIPTS)}, each once, got {' '.join(args.scripts) or 'none'}")
    for script in args.scripts:
        if script not in SCRIPTS:
            fail(f"--scripts: {script!r} is not one of {', '.join(SCRIPTS)}")
    if args.folds < 2 or args.inner_folds < 2:
        fail(f"--folds and --inner-folds must be >= 2, got {args.folds} and {args.inner_folds}")
    if args.episodes < 2 * args.folds:
        fail(f"--episodes must be at least 2 x --folds ({2 * args.folds}), got {args.episodes}")
    if args.inner_folds > args.episodes:
        fail(f"--inner-folds must be at most --episodes ({args.episodes}), got {args.inner_folds}")
    if not 1 <= args.num_envs <= args.episodes:
        fail(
            f"--num-envs must be >= 1 and at most --episodes ({args.episodes}): the first episodes to end are "
            f"probed, more envs would be cut off; got {args.num_envs}"
        )
    delays = args.delays
    if not delays or min(delays) < 0 or max(delays) > MAX_STEPS or len(set(delays)) != len(delays):
        fail(f"--delays must be distinct steps in [0, {MAX_STEPS}], got {' '.join(map(str, delays)) or 'none'}")
    if len(delays) > MAX_DELAYS:
        fail(f"--delays: at most {MAX_DELAYS} of them, got {len(delays)}")
    if not 0 <= args.wait[0] <= args.wait[1] <= MAX_STEPS:
        fail(f"--wait must be two steps 0 <= min <= max <= {MAX_STEPS}, got {args.wait[0]} {args.wait[1]}")
    if not 1 <= len(args.c_grid) <= MAX_C or not all(0 < c < math.inf for c in args.c_grid):
        fail(f"--c-grid must be 1 to {MAX_C} positive finite numbers, got {' '.join(map(str, args.c_grid)) or 'none'}")
    if args.bootstrap < 1:
        fail(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if not (0 <= args.threads <= MAX_WORKERS and 0 <= args.jobs <= MAX_WORKERS):
        fail(f"--threads and --jobs must be in [0, {MAX_WORKERS}], got {args.threads} and {args.jobs}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be >= 0 and < 2**32, got {args.seed}")
    if not args.variants:
        fail("--variants: give at least one")
    try:
        tokens = shlex.split(args.script_args)
    except ValueError as e:
        fail(f"--script-args {args.script_args!r}: {e}")
    arguments.refuse_flags(tokens, PROBE_SETS, "--script-args", "the probe sets it for every variant")


def plan(args):
    """[(script, module, [(variant, flags, Args)])] with every variant's arguments parsed and checked by its script
    (the sizes against this machine's memory included), with the probe's --env-id and --num-envs."""
    variants = parse_variants(args.variants)
    for name, flags in variants:
        why = "the probe sets it for every variant (its episodes are collected once, for all); give the probe's own"
        arguments.refuse_flags(flags, PROBE_SETS, f"--variants {name}", why)
    planned = []
    for script in args.scripts:
        module = importlib.import_module(script[: -len(".py")])
        fields = {f.name for f in dataclasses.fields(module.Args)}
        common = ["--env-id", args.env_id, "--num-envs", str(args.num_envs), "--cuda" if args.cuda else "--no-cuda"]
        for name in PASSTHROUGH:
            if getattr(args, name) is not None and name in fields:
                common += [f"--{name.replace('_', '-')}", getattr(args, name)]
        common += shlex.split(args.script_args)
        parsed = [
            (name, flags, arguments.script_args(module, common + flags, f"{script} variant {name}"))
            for name, flags in variants
        ]
        planned.append((script, module, parsed))
    return planned


def scripted_policy(task, args):
    """Whether the episodes follow the task's scripted policy; one line where --policy asks for one it lacks."""
    if args.policy == "scripted" and not task.has_script:
        fail(f"--policy scripted: there is no scripted policy for {args.env_id}; use --policy random")
    return args.policy == "scripted" or (args.policy == "auto" and task.has_script)


def check_task(module, args):
    """The cue task of --env-id with one env made as the probe makes them (a missing suite or an unknown env is one
    line); the shape of its observations; a --wait the episodes' time limit leaves room for."""
    env = module.make_env(args.env_id, 0, False, "probe")()
    shape, limit = env.observation_space.shape, getattr(env.unwrapped, "max_steps", None)
    env.close()
    task = cue_task(args.env_id)
    scripted = scripted_policy(task, args)
    if scripted and isinstance(task, MiniGridMemory) and limit is not None and args.wait[1] >= limit:
        fail(
            f"--wait {args.wait[0]} {args.wait[1]}: the episodes of {args.env_id} end after {limit} steps, before "
            f"the scripted policy would choose; choose a wait below {limit}"
        )
    return task, shape


def check_fits(args, planned, task, obs_shape):
    """What the probe will hold, counted as lower bounds (at least one frame per episode; with the scripted
    MiniGrid-Memory policy at least the shortest wait), beside each variant's own estimate (the scripts'
    arguments.estimate, its Transformer-XL's memories for --num-envs envs): one line before anything runs when it
    cannot fit in this machine's memory (arguments.check_fits)."""
    twins = 2 if args.counterfactual and hasattr(task, "make_twin") else 1
    length = 1 + (args.wait[0] if isinstance(task, MiniGridMemory) and scripted_policy(task, args) else 0)
    frames = args.episodes * length
    jobs = min(len(args.delays), args.jobs or os.cpu_count() or 1)
    for script, _, parsed in planned:
        for group in build_groups(parsed):
            sargs = group[0][2]
            width = arguments.trxl_config(sargs)["d_model"] * (len(group) + getattr(sargs, "topk", 1))
            episodes = f"--episodes {args.episodes}"
            host = [
                (frames * (math.prod(obs_shape) + 25) * twins, "the episodes' frames", [episodes]),
                (frames * 4 * width * twins, f"the read-outs of {script}'s pipeline", [episodes, "--variants"]),
                (
                    args.bootstrap * args.episodes * 24 * jobs,
                    "the bootstrap",
                    [f"--bootstrap {args.bootstrap}", episodes],
                ),
            ]
            try:
                arguments.check_fits(sargs, host)
            except SystemExit as e:
                fail(f"{script} variant {group[0][0]}: {str(e.code).removeprefix('error: ')}")


def build_groups(parsed):
    """Variants that differ only in how the memory is handled (MEMORY_HANDLING) share one build."""
    groups = {}
    for name, flags, sargs in parsed:
        key = json.dumps({k: v for k, v in dataclasses.asdict(sargs).items() if k not in MEMORY_HANDLING}, default=str)
        groups.setdefault(key, []).append((name, flags, sargs))
    return list(groups.values())


def report_schema():
    """The structure of probe.json, as markdown and figure read it: checked before a --replot draws anything, and
    before a new report replaces an earlier one."""
    from typing import Annotated, NotRequired

    from pydantic import Field
    from typing_extensions import TypedDict

    Count = Annotated[int, Field(ge=0)]
    Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    Change = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    Text = Annotated[str, Field(max_length=10_000)]

    class Influence(TypedDict):
        median: Change
        max: Change
        identical: Share

    class Entry(TypedDict):
        samples: Count
        episodes: Count
        accuracy: Share | None
        interval: NotRequired[tuple[Share, Share]]
        chance: NotRequired[Share]
        chance_interval: NotRequired[tuple[Share, Share]]
        C: NotRequired[Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(max_length=100)]]
        influence: NotRequired[Influence | None]

    class Row(TypedDict):
        script: Literal[(*SCRIPTS, "-")]
        variant: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.=+-]+$", max_length=200)]
        flags: Text
        kind: Literal["memory", "input", "observation"]
        features: Literal["memory read-out", "encoder output at t", "observation at t"]
        delays: Annotated[dict[str, Entry], Field(max_length=MAX_DELAYS)]

    class ReportArgs(TypedDict):
        env_id: Annotated[str, Field(min_length=1, max_length=200)]
        delays: Annotated[list[Annotated[int, Field(ge=0, le=MAX_STEPS)]], Field(min_length=1, max_length=MAX_DELAYS)]

    class Episodes(TypedDict):
        complete: Count
        classes: Annotated[list[Annotated[str, Field(max_length=200)]], Field(min_length=1, max_length=100)]

    class Spread(TypedDict):
        mean: Change
        min: Count
        max: Count

    class Token(TypedDict):
        words: Text
        share: Share

    class Tokens(TypedDict):
        distinct_tokens_per_episode: Spread | None
        distinct_inputs_per_episode: Spread | None
        distinct_observations_per_episode: Spread | None
        distinct_tokens_overall: Count
        top_tokens: Annotated[list[Token], Field(max_length=100)]

    class Report(TypedDict):
        args: ReportArgs
        episodes: Episodes
        results: Annotated[list[Row], Field(min_length=1, max_length=1000)]
        tokens: dict[Literal[SCRIPTS], Tokens]

    return Report


def check_report(report, what):
    """What the schema cannot say: every row has an entry for each delay of the run and no other, an accuracy with its
    interval and chance, intervals in order."""
    delays = report["args"]["delays"]
    if len(set(delays)) != len(delays):
        fail(f"{what}: args.delays holds a delay twice")
    for i, row in enumerate(report["results"]):
        if set(row["delays"]) != {str(d) for d in delays}:
            fail(f"{what}: results.{i}.delays has the delays {', '.join(row['delays'])}, not those of args.delays")
        for d, entry in row["delays"].items():
            where = f"{what}: results.{i}.delays.{d}"
            if entry["accuracy"] is not None and not {"interval", "chance", "chance_interval"} <= set(entry):
                fail(f"{where} has an accuracy without its interval and chance")
            for key in ("interval", "chance_interval"):
                if key in entry and entry[key][0] > entry[key][1]:
                    fail(f"{where}.{key} is not in order (low, high)")


def write_report(report, out, data):
    """probe.json (`data`), probe.md and probe.png, all made before any is written, then replaced together."""
    table, png = markdown(report).encode(), figure(report)
    replace_together(
        {
            out / "probe.json": lambda f: f.write(data),
            out / "probe.md": lambda f: f.write(table),
            out / "probe.png": lambda f: f.write(png),
        }
    )


def replot(args):
    """--replot: the three files again from a probe.json (its structure checked first), into --out."""
    ignored = [
        arguments.flag(f.name)
        for f in dataclasses.fields(Args)
        if f.name not in ("replot", "out") and getattr(args, f.name) != getattr(Args(), f.name)
    ]
    if ignored:
        fail(f"--replot draws a probe.json again and takes only --out; {' '.join(ignored)} would be ignored")
    out = output_files(args.out, OUTPUTS, "--out")
    report, data = read_json(args.replot, report_schema(), "--replot")
    check_report(report, f"--replot {args.replot}")
    write_report(report, out, data)
    print(f"written to {out}/probe.png, probe.md, probe.json (from {args.replot})")
    return report


def main(args):
    if args.replot:
        return replot(args)
    # every bad argument, the probe's or a script's, fails here, before anything runs
    check_args(args)
    out = output_files(args.out, OUTPUTS, "--out")
    planned = plan(args)
    task, obs_shape = check_task(planned[0][1], args)
    check_fits(args, planned, task, obs_shape)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    lanes = collect(planned[0][1], task, args)
    complete = lanes.episode >= 0
    collected = time.time()
    print(
        f"{args.env_id}: {len(lanes.labels)} episodes ({np.bincount(lanes.labels, minlength=len(lanes.classes))} "
        f"of {', '.join(lanes.classes)}), {lanes.starts.size} frames in {args.num_envs} envs, the cue seen in "
        f"{lanes.cue_seen.sum()}; {collected - started:.0f} s",
        flush=True,
    )

    results, tokens, timing = [], {}, {"collect_s": collected - started}

    def add(script, variant, flags, kind, features, twin_features=None):
        t0 = time.time()
        names = {"memory": "memory read-out", "input": "encoder output at t", "observation": "observation at t"}
        row = {"script": script, "variant": variant, "flags": flags, "kind": kind, "features": names[kind]}
        delays = decode(features, lanes, args)
        if twin_features is not None:
            for d, entry in influence(features, twin_features, lanes, args.delays).items():
                delays[d]["influence"] = entry
        results.append(row | {"delays": delays})
        timing[f"decode {script} {variant if kind == 'memory' else names[kind]}"] = time.time() - t0
        print(f"{script} {variant if kind == 'memory' else names[kind]}: {summary_line(results[-1])}", flush=True)

    for script, module, parsed in planned:
        for group in build_groups(parsed):
            t0 = time.time()
            names = "+".join(name for name, _, _ in group)
            print(
                f"{script} {names}: the frozen pipeline over {lanes.starts.size} frames"
                f"{' and their twins' if lanes.twin_obs is not None else ''}",
                flush=True,
            )
            trxl, vocab, encoder = module.build_memory(group[0][2], device, verbose=False)
            # the twins go through a copy of the frozen models as they are now, unused (HELMv2's encoder keeps
            # statistics and every encoder a cache): as fresh as a second build, without loading the weights again
            fresh = copy.deepcopy((trxl, encoder)) if lanes.twin_obs is not None else None
            settings = [(sargs.memory_reset, sargs.ablate_memory) for _, _, sargs in group]
            readouts, inputs, step_tokens = memory_readouts(
                module, trxl, encoder, lanes.obs, lanes.starts, settings, device
            )
            twin_readouts, twin_inputs = [None] * len(group), None
            if fresh is not None:
                del trxl, encoder
                trxl, encoder = fresh
                twin_readouts, twin_inputs, _ = memory_readouts(
                    module, trxl, encoder, lanes.twin_obs, lanes.starts, settings, device
                )
            timing[f"pipeline {script} {names}"] = time.time() - t0
            for (name, flags, _), features, twin in zip(group, readouts, twin_readouts):
                add(script, name, shlex.join(flags), "memory", features, twin)
            if script not in tokens:  # the encoder is the same in every variant (unless a variant changes it)
                tokens[script] = token_statistics(step_tokens, inputs, lanes, vocab)
                if args.controls:
                    add(script, "control", shlex.join(group[0][1]), "input", inputs, twin_inputs)
            del trxl, encoder, readouts, twin_readouts
    if args.controls:
        pixels = lanes.obs.reshape(*lanes.starts.shape, -1)
        twin_pixels = None if lanes.twin_obs is None else lanes.twin_obs.reshape(*lanes.starts.shape, -1)
        add("-", "control", "", "observation", pixels, twin_pixels)

    for row in results:  # JSON keys are strings
        row["delays"] = {str(d): v for d, v in row["delays"].items()}
    report = {
        "args": dataclasses.asdict(args),
        "device": str(device),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "episodes": {
            "complete": int(len(lanes.labels)),
            "classes": list(lanes.classes),
            "per_class": np.bincount(lanes.labels, minlength=len(lanes.classes)).tolist(),
            "cue_seen": int(lanes.cue_seen.sum()),
            "length_mean": float(lanes.lengths.mean()),
            "length_min": int(lanes.lengths.min()),
            "length_max": int(lanes.lengths.max()),
            "frames": int(lanes.starts.size),
            "frames_of_complete_episodes": int(complete.sum()),
        },
        "results": results,
        "tokens": tokens,
        "timing_s": timing | {"total_s": time.time() - started},
    }
    data = (json.dumps(report, indent=1) + "\n").encode()
    # the new report is checked as a --replot would check it before it replaces the earlier one (a failure is a bug
    # of the probe's: the earlier results stay, the new report is kept beside them)
    try:
        check_report(parse_json(data, report_schema(), "the probe's new report"), "the probe's new report")
    except SystemExit as e:
        kept = write_new(out / "probe-rejected.json", lambda f: f.write(data))
        fail(f"{str(e.code).removeprefix('error: ')}; {out}'s earlier files are kept, the new report is in {kept}")
    write_report(report, out, data)
    print(markdown(report))
    print(f"written to {out}/probe.png, probe.md, probe.json ({time.time() - started:.0f} s)")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
