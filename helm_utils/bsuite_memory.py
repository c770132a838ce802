"""bsuite's memory experiments as pixels: `--env-id bsuite/memory_len/<i>` and `bsuite/memory_size/<i>`
(docs/environments.md, "bsuite's memory experiments").

DeepMind's Behaviour Suite (Osband et al. 2020) measures memory with its MemoryChain env: the first
observation shows a context of N bits (+1 or -1 each), the last one asks for one of them (the query), and
only the action at the last step is rewarded: +1 if it equals the queried bit, -1 otherwise; the actions
before it change nothing. `memory_len` asks for 1 bit after a growing delay, `memory_size` for one of a
growing number of bits after a delay of 2. A setting is named as bsuite names it, by its index in bsuite's
sweep, not by its length: `memory_len/9` is length 10, `memory_len/12` length 17, `memory_size/2` 3 bits
(bsuite.sweep.SETTINGS; `describe` says which).

The env is bsuite's own, through Farama's shimmy bindings (`bsuite/memory_len-v0`); only its observation,
a vector [time left, query, context bits], is drawn as an RGB frame the agents' CNN and frozen encoders
take (`draw`), each value visible exactly on the steps bsuite shows it: the time left on every step, the
context on the steps whose vector holds it, the query on the last decision. Measured from bsuite's env (not
its docstring; tests/test_bsuite_memory.py): an episode of length L is L + 1 decisions, the context shows
in the first two observations (the reset's and the first step's) and the query in the observation before
the last decision; rewards and episode ends are bsuite's, unchanged.

Why our own drawing and not bsuite's `wrappers.ImageObservation`: that one fills quadrants of a float
image with up to 4 values and blurs longer vectors by interpolation (so a bit among 5 or more is no longer
readable); the agents take uint8 RGB, and every value must stay exactly readable (`read` inverts `draw`).
"""

import re

import gymnasium as gym
import numpy as np

from helm_utils import fail

PREFIX = "bsuite/"
EXPERIMENTS = ("memory_len", "memory_size")
SIZE = 32  # the frame is SIZE x SIZE pixels: enough for bsuite's 40 bits as 4x4 tiles, small for the CPU
TIME_ROWS = 4  # the time-left bar's height, at the top
# A context bit lights one of two lamps, the left one white for +1, the right one red for -1; the query is blue.
# +1 and -1 differ in place, not only in colour or brightness: HELM's encoder averages the colour channels (red and
# green would both be grey 85 to it) and compares directions (cosine), to which a brighter copy of the same pattern
# is the same.
ONE, ZERO, QUERY = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def settings(bsuite_id):
    """bsuite's keyword arguments of a setting id ('memory_len/9' -> {'memory_length': 10}); one error line for an
    id outside bsuite's memory sweeps."""
    from bsuite import sweep

    experiment, _, index = bsuite_id.partition("/")
    if experiment not in EXPERIMENTS or not re.fullmatch(r"0|[1-9][0-9]*", index) or bsuite_id not in sweep.SETTINGS:
        sizes = {e: len(getattr(sweep, e.upper())) for e in EXPERIMENTS}
        fail(
            f"{PREFIX}{bsuite_id} is not a setting of bsuite's memory sweeps: use bsuite/memory_len/<i> "
            f"(i from 0 to {sizes['memory_len'] - 1}) or bsuite/memory_size/<i> (i from 0 to "
            f"{sizes['memory_size'] - 1}), bsuite's own setting ids (docs/environments.md)"
        )
    return dict(sweep.SETTINGS[bsuite_id])


def memory_length_and_bits(bsuite_id):
    """(memory length, number of bits) of a setting: memory_size asks at bsuite's length 2
    (bsuite.experiments.memory_size.load)."""
    kwargs = settings(bsuite_id)
    return kwargs.get("memory_length", 2), kwargs.get("num_bits", 1)


def describe(env_id):
    """What a setting is, in words, for run names and logs: 'memory_len/9' is 'length10', 'memory_size/2' '3bits'."""
    bsuite_id = env_id.removeprefix(PREFIX)
    length, bits = memory_length_and_bits(bsuite_id)
    return f"length{length}" if bsuite_id.startswith("memory_len/") else f"{bits}bits"


def layout(num_bits):
    """The tile of each bit: (rows, columns, tile height, tile width) of the grid below the time bar, as square as
    bsuite's largest setting (40 bits) allows."""
    columns = int(np.ceil(np.sqrt(num_bits)))
    rows = int(np.ceil(num_bits / columns))
    return rows, columns, (SIZE - TIME_ROWS) // rows, SIZE // columns


def draw(observation, memory_length, num_bits):
    """bsuite's observation (1, 2 + num_bits): [time left, query, context] -> an RGB frame (SIZE, SIZE, 3) of uint8.

    - top TIME_ROWS rows: the time left t as a bar of round(t * SIZE) columns, of grey round(255 * t);
    - below, a tile per bit, row by row: its upper half shows the context bit, as a white lamp on its left for +1
      or a red lamp on its right for -1 (black while bsuite shows no context), its lower half is blue where that
      bit is queried. bsuite shows the query only in
      the observation of its timestep L - 1 (time left 1/L), as the queried bit's index; it shows 0 elsewhere, so
      the query's value alone cannot say whether it is shown: the time left says it."""
    time_left, query, context = float(observation[0, 0]), int(observation[0, 1]), observation[0, 2:]
    frame = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    frame[:TIME_ROWS, : int(round(time_left * SIZE))] = int(round(255 * time_left))
    rows, columns, height, width = layout(num_bits)
    query_shown = np.isclose(time_left, 1 / memory_length)
    for bit in range(num_bits):
        top, left = TIME_ROWS + (bit // columns) * height, (bit % columns) * width
        if context[bit] > 0:
            frame[top : top + height // 2, left : left + width // 2] = ONE
        elif context[bit] < 0:
            frame[top : top + height // 2, left + width // 2 : left + width] = ZERO
        if query_shown and bit == query:
            frame[top + height // 2 : top + height, left : left + width] = QUERY
    return frame


def read(frame, memory_length, num_bits):
    """The observation bsuite gave, read back from a drawn frame (the inverse of draw: nothing added or hidden)."""
    time_left = frame[0, 0, 0] / 255.0 if frame[0, 0].any() else 0.0
    time_left = round(time_left * memory_length) / memory_length  # bsuite's values are multiples of 1/L
    rows, columns, height, width = layout(num_bits)
    observation = np.zeros((1, 2 + num_bits), dtype=np.float32)
    observation[0, 0] = time_left
    for bit in range(num_bits):
        top, left = TIME_ROWS + (bit // columns) * height, (bit % columns) * width
        if tuple(frame[top, left]) == ONE:
            observation[0, 2 + bit] = 1.0
        elif tuple(frame[top, left + width - 1]) == ZERO:
            observation[0, 2 + bit] = -1.0
        if tuple(frame[top + height // 2, left]) == QUERY:
            observation[0, 1] = bit
    return observation


class PixelObservation(gym.ObservationWrapper):
    """bsuite's MemoryChain (through shimmy) observing the frames of `draw`; everything else is bsuite's. With
    render_mode rgb_array, render() gives the last frame (videos, enjoy.py)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(self, env, memory_length, num_bits, render_mode=None):
        super().__init__(env)
        self.memory_length, self.num_bits = memory_length, num_bits
        self.observation_space = gym.spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
        self._render_mode, self.frame = render_mode, None

    @property
    def render_mode(self):
        return self._render_mode

    def observation(self, observation):
        self.frame = draw(observation, self.memory_length, self.num_bits)
        return self.frame

    def render(self):
        return None if self.frame is None else self.frame.copy()


def make(env_id, render_mode=None):
    """The env of `bsuite/<experiment>/<index>`: bsuite's MemoryChain of that setting, seeded by reset(seed=...)
    as shimmy seeds it, observing frames."""
    bsuite_id = env_id.removeprefix(PREFIX)
    kwargs = settings(bsuite_id)
    if render_mode not in (None, "rgb_array"):
        fail(f"{env_id} renders only as rgb_array frames, not {render_mode!r}")
    import shimmy  # noqa: F401 - registers bsuite's envs in gymnasium (bsuite/memory_len-v0, bsuite/memory_size-v0)

    memory_length, num_bits = memory_length_and_bits(bsuite_id)
    env = gym.make(f"{PREFIX}{bsuite_id.partition('/')[0]}-v0", **kwargs)
    return PixelObservation(env, memory_length, num_bits, render_mode)
