"""The suites beside MiniGrid (docs/environments.md): MiniWorld rendered headless, Memory Gym with its
MultiDiscrete actions, and the action heads that serve both."""

import ctypes.util
import importlib.util
import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import helm_ppo
import shelm_ppo
from conftest import QUICK, ROOT, offline_env, run_script, tiny_args
from helm_utils import env_suites

CONFIGS = json.loads((ROOT / "benchmark" / "configs.json").read_text())["configs"]
MINIWORLD = sorted(env_id for env_id in CONFIGS if env_id.startswith("MiniWorld-"))
# what pyglet loads to render headless (EGL, GL, GLU) and to draw MiniWorld's text (freetype, fontconfig)
GL_LIBRARIES = ["EGL", "GL", "GLU", "freetype", "fontconfig"]
missing_gl = [name for name in GL_LIBRARIES if ctypes.util.find_library(name) is None]
needs_gl = pytest.mark.skipif(
    bool(missing_gl), reason=f"no system library {', '.join(missing_gl)} for MiniWorld: {env_suites.GL_HELP}"
)
needs_memory_gym = pytest.mark.skipif(
    importlib.util.find_spec("memory_gym") is None,
    reason="memory-gym is not installed (pip install --no-deps -r requirements/memory-gym.txt)",
)
# two updates of 2 envs x 8 steps, one epoch of two minibatches: the machinery, not learning
SHORT = [*QUICK, "--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--save-model"]


def test_the_original_miniworld_configs_are_in_the_benchmark():
    # configs/MiniWorld/* of the original code; PickupObjs is called PickupObjects in miniworld 2.x
    names = ["CollectHealth", "FourRooms", "MazeS3Fast", "PickupObjects", "PutNext", "Sign", "TMaze", "YMaze"]
    assert [f"MiniWorld-{name}-v0" for name in names] == MINIWORLD


@needs_gl
@pytest.mark.parametrize("env_id", MINIWORLD)
def test_miniworld_envs_observe_what_the_env_renders(env_id):
    """Every MiniWorld env of the original configs makes an env of 60x80 RGB frames, headless; Sign's
    frame is the `obs` of its Dict observation, as the original's wrapper took it."""
    env = shelm_ppo.make_env(env_id, 0, False, "test")()
    raw = gym.make(env_id)
    try:
        assert env.observation_space == gym.spaces.Box(0, 255, (60, 80, 3), np.uint8)
        assert env_suites.action_dims(env.action_space) == (raw.action_space.n,)
        obs, _ = env.reset(seed=3)
        expected, _ = raw.reset(seed=3)
        for action in [2, 0, 2]:  # 2 moves forward, 0 turns left in every MiniWorld env
            obs, *_ = env.step(action)
            expected, *_ = raw.step(action)
        if isinstance(expected, dict):
            assert set(expected) == {"obs", "goal"} and expected["goal"] == 0  # fixed when the env is made
            expected = expected["obs"]
        np.testing.assert_array_equal(obs, expected)
        assert obs.std() > 0  # a rendered scene, not a blank frame
    finally:
        env.close()
        raw.close()


@needs_gl
def test_miniworld_trains_without_a_display(tmp_path):
    """TMaze segfaulted when triton was loaded after the env's GL context; nothing is to be set by the user."""
    env = {k: v for k, v in offline_env().items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYGLET_HEADLESS")}
    args = [*SHORT, "--env-id", "MiniWorld-TMaze-v0", *tiny_args("shelm_ppo.py", tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "shelm_ppo.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    agent = torch.load(run / "model_final.pt", weights_only=True)["agent"]
    assert agent["actor.3.weight"].shape[0] == 3  # TMaze: turn left, turn right, move forward


@needs_memory_gym
def test_memory_gym_multidiscrete_trains(tmp_path):
    """MysteryPath-v0 acts with MultiDiscrete([3, 3]): two categoricals, one per dimension (HELM's probe env
    must not close pygame under the running envs)."""
    args = [*SHORT, "--env-id", "MysteryPath-v0", *tiny_args("helm_ppo.py", tmp_path)]
    proc = run_script("helm_ppo.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALSA" not in proc.stderr  # no sound card is opened
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run / "model_final.pt", weights_only=True)
    assert ckpt["agent"]["actor.3.weight"].shape[0] == 3 + 3
    assert ckpt["global_step"] == 32


@needs_memory_gym
def test_memory_gym_vector_observations_are_refused():
    with pytest.raises(SystemExit, match="MortarMayhemB-v0 does not observe RGB images"):
        shelm_ppo.make_env("MortarMayhemB-v0", 0, False, "test")()


def test_an_uninstalled_suite_is_named(monkeypatch):
    monkeypatch.setitem(env_suites.ENV_SUITES, "NoSuchSuite-", ("no_such_suite_module", "pip install it"))
    with pytest.raises(SystemExit, match="NoSuchSuite-Env-v0 needs the module no_such_suite_module.*pip install it"):
        env_suites.import_env_suite("NoSuchSuite-Env-v0")


def reference_heads(logits, action_dims, action):
    """Log-probabilities and entropies of each action dimension, computed by hand from the logits."""
    logprob, entropy, start = [], 0.0, 0
    for i, n in enumerate(action_dims):
        log_p = logits[:, start : start + n] - logits[:, start : start + n].logsumexp(-1, keepdim=True)
        logprob.append(log_p.gather(1, action[:, i : i + 1])[:, 0])
        entropy = entropy - (log_p.exp() * log_p).sum(-1)
        start += n
    return torch.stack(logprob, -1), entropy


@pytest.mark.parametrize("action_dims", [(7,), (3, 3), (2, 5, 4)])
def test_action_heads(action_dims):
    torch.manual_seed(0)
    agent = helm_ppo.Agent((8, 8, 3), action_dims, 16)
    trxl_out, obs = torch.randn(64, 16), torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    action, logprob, entropy, value = agent.get_action_and_value(trxl_out, obs)
    assert action.shape == logprob.shape == (64, len(action_dims)) and entropy.shape == (64,)
    assert all(a.min() >= 0 and a.max() < n for a, n in zip(action.T, action_dims))
    logits = agent.actor(agent.features(trxl_out, obs))
    want_logprob, want_entropy = reference_heads(logits, action_dims, action)
    torch.testing.assert_close(logprob, want_logprob)
    torch.testing.assert_close(entropy, want_entropy)
    # given the actions (the PPO update), the same numbers come back
    again = agent.get_action_and_value(trxl_out, obs, action)
    assert torch.equal(again[0], action) and torch.equal(again[1], logprob) and torch.equal(again[3], value)


def test_discrete_actions_are_sampled_as_one_categorical():
    """A Discrete space keeps the single categorical of before: the same draws from the same seed."""
    torch.manual_seed(0)
    agent = shelm_ppo.Agent((8, 8, 3), (7,), 16)
    trxl_out, obs = torch.randn(256, 16), torch.randint(0, 256, (256, 8, 8, 3), dtype=torch.uint8)
    logits = agent.actor(agent.features(trxl_out, obs))
    torch.manual_seed(5)
    action, logprob, entropy, _ = agent.get_action_and_value(trxl_out, obs)
    torch.manual_seed(5)
    single = torch.distributions.Categorical(logits=logits)
    want = single.sample()
    assert torch.equal(action[:, 0], want)
    assert torch.equal(logprob[:, 0], single.log_prob(want)) and torch.equal(entropy, single.entropy())
    space = gym.spaces.Discrete(7)
    assert env_suites.env_actions(action, space).shape == (256,)
    assert env_suites.env_actions(action, gym.spaces.MultiDiscrete([7])).shape == (256, 1)


needs_procgen = pytest.mark.skipif(
    importlib.util.find_spec("procgen") is None,
    reason="procgen runs in a virtualenv of its own (requirements/procgen.txt, docs/environments.md)",
)


@needs_procgen
def test_procgen_memory_adapter_replays_gym3():
    """The adapter's frames, rewards and episode ends are those of procgen's own gym3 env, seeded alike."""
    from procgen import ProcgenGym3Env

    from helm_utils import procgen_memory

    env = gym.make("procgen-memory-maze-v0")
    obs, _ = env.reset(seed=7)
    seed = int(gym.utils.seeding.np_random(7)[0].integers(2**31 - 1))
    raw = ProcgenGym3Env(
        num=1, env_name="maze", distribution_mode="memory", num_levels=0, start_level=0, rand_seed=seed
    )
    assert env.observation_space.contains(obs) and procgen_memory.GAMES[4] == "maze"
    np.testing.assert_array_equal(obs, raw.observe()[1]["rgb"][0])
    rng, ends = np.random.default_rng(0), 0
    for _ in range(600):
        action = int(rng.integers(15))
        obs, reward, terminated, truncated, _ = env.step(action)
        raw.act(np.array([action], dtype=np.int32))
        raw_reward, raw_obs, first = raw.observe()
        np.testing.assert_array_equal(obs, raw_obs["rgb"][0])
        assert (reward, terminated, truncated) == (float(raw_reward[0]), bool(first[0]), False)
        ends += terminated
    assert ends >= 1  # maze's episodes end within 500 steps


@needs_procgen
def test_procgen_memory_trains(tmp_path):
    args = [*SHORT, "--env-id", "procgen-memory-heist-v0", *tiny_args("helm_ppo.py", tmp_path)]
    proc = run_script("helm_ppo.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert torch.load(run / "model_final.pt", weights_only=True)["agent"]["actor.3.weight"].shape[0] == 15
