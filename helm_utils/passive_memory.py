"""HELM-PassiveMemoryS{7,9,11,13}-v0: MiniGrid-Memory with the cue in the first observation (docs/environments.md).

In MiniGrid-Memory the agent starts somewhere in the start room facing east, and the cue (a key or a ball) lies in
the room's west end, behind it: in most episodes the agent sees the cue only if it turns round to look. Whether a
memory helps is then tangled with whether the agent learns to look, and looking pays only once the memory is
used (a chicken and egg problem of exploration). The passive version, as the passive T-maze of Ni et al. (2023,
"When do transformers shine in RL? Decoupling memory from credit assignment"), removes the looking: the agent
always starts in the room's west end, next to the cue, which is in view in its first observation. Everything else
is MiniGrid-Memory's: the corridor, the two objects at its end, the reward (1 - 0.9 t / max_steps for stepping
next to the matching object, 0 for the other) and the time limit. A memoryless agent succeeds in half of the
episodes; every episode rewards remembering the first frame until the end of the corridor (S7: 6 steps)."""

import gymnasium as gym
import numpy as np
from minigrid.envs import MemoryEnv


class PassiveMemoryEnv(MemoryEnv):
    def _gen_grid(self, width, height):
        super()._gen_grid(width, height)
        self.agent_pos = np.array((1, height // 2))  # below the cue at (1, height // 2 - 1), facing east
        self.agent_dir = 0


for size in (7, 9, 11, 13):
    env_id = f"HELM-PassiveMemoryS{size}-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=PassiveMemoryEnv, kwargs={"size": size})
