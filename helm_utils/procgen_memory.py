"""Procgen in memory mode, as the original HELM ran it, as gymnasium envs for the three scripts.

    python3 -m venv .venv-procgen && .venv-procgen/bin/pip install -r requirements/procgen.txt
    .venv-procgen/bin/python helm_ppo.py --env-id procgen-memory-miner-v0

Registers procgen-memory-{caveflyer,dodgeball,heist,jumper,maze,miner}-v0: 64x64 RGB frames, 15 actions,
distribution_mode "memory", unlimited levels (num_levels 0, start_level 0), as the original's
make_procgen_env (github ml-jku/helm, utils.py). procgen speaks gym3 and needs numpy < 2, hence its own
virtualenv (docs/environments.md); this adapter is the only code of ours that knows gym3.
"""

import gymnasium as gym
import numpy as np
from procgen import ProcgenGym3Env

GAMES = ["caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"]  # the original's procgen_envs


class ProcgenMemory(gym.Env):
    """One procgen game through gym3's act/observe. Procgen starts the next episode by itself: the step
    that ends an episode returns the next episode's first frame (gymnasium's vector envs keep it, in
    their same-step autoreset, as the first observation), and reset() without a seed returns it."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, game, num_levels=0, start_level=0, render_mode=None):
        self.game, self.num_levels, self.start_level, self.render_mode = game, num_levels, start_level, render_mode
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(15)
        self.procgen, self.frame = None, None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None or self.procgen is None:  # procgen draws its levels from a seed given at creation
            self.procgen = ProcgenGym3Env(
                num=1,
                env_name=self.game,
                distribution_mode="memory",
                num_levels=self.num_levels,
                start_level=self.start_level,
                rand_seed=int(self.np_random.integers(2**31 - 1)),
            )
            self.frame = self.procgen.observe()[1]["rgb"][0]
        return self.frame.copy(), {}

    def step(self, action):
        self.procgen.act(np.array([action], dtype=np.int32))
        reward, obs, first = self.procgen.observe()
        self.frame = obs["rgb"][0]
        # procgen has no separate time limit signal: an episode cut at its step limit ends as any other
        return self.frame.copy(), float(reward[0]), bool(first[0]), False, {}

    def render(self):
        return self.frame.copy()


for _game in GAMES:
    gym.register(f"procgen-memory-{_game}-v0", entry_point=ProcgenMemory, kwargs={"game": _game})
