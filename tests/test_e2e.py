"""One whole training run of shelm_ppo.py with the tiny models: what it logs and what it saves."""

import importlib.metadata
import subprocess
import sys

import pytest
import torch

import shelm_ppo
from conftest import ROOT, SHELM_RUN_ENV, offline_env
from helm_utils import checkpoints, frozen_models

ENV_ID = SHELM_RUN_ENV
STEPS = [128, 256]  # global step at the end of each update
SCALARS = [
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "charts/learning_rate",
    "charts/observation_cache_hit_rate",
    "perf/env_s",
    "perf/encoder_s",
    "perf/trxl_s",
    "perf/agent_s",
    "perf/update_s",
    "perf/rollout_s",
    "perf/update_sps",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
]


@pytest.fixture(scope="module")
def run(shelm_run):
    return shelm_run  # trained once for this file and tests/test_enjoy.py (conftest.py)


@pytest.fixture(scope="module")
def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_logged(events):
    assert set(SCALARS) <= set(events.Tags()["scalars"])
    for tag in SCALARS:
        if not tag.startswith("charts/episodic"):
            assert [e.step for e in events.Scalars(tag)] == STEPS, tag
    assert [e.value for e in events.Scalars("charts/learning_rate")] == pytest.approx([5e-4, 5e-4])
    assert all(e.value > 0 for e in events.Scalars("charts/SPS"))
    rates = [e.value for e in events.Scalars("charts/observation_cache_hit_rate")]
    # the first observation of each env is new; the empty room repeats its views a lot
    assert 0 < rates[0] < 1 and all(0 <= r <= 1 for r in rates)
    assert all(e.value >= 0 for e in events.Scalars("losses/entropy"))
    assert all(0 <= e.value <= 1 for e in events.Scalars("losses/clipfrac"))


def test_episodes_logged_raw(events):
    returns = [e.value for e in events.Scalars("charts/episodic_return")]
    lengths = [e.value for e in events.Scalars("charts/episodic_length")]
    assert len(returns) == len(lengths) >= 2
    # MiniGrid's own returns, not the normalised and clipped training rewards
    assert all(0 <= r < 1 for r in returns) and all(1 <= n <= 100 and n == int(n) for n in lengths)
    assert all(r > 0 for r, n in zip(returns, lengths) if n < 100)  # ended early only at the goal


def test_episode_tokens_text(events):
    vocab = set(frozen_models.tiny_vocab())
    tag = "memory/episode_tokens/text_summary"
    assert tag in events.Tags()["tensors"]
    texts = events.Tensors(tag)
    text = texts[-1].tensor_proto.string_val[0].decode()
    lines = text.split("  \n")
    assert [int(line.split(":")[0]) for line in lines] == list(range(len(lines)))
    for line in lines:
        words = line.split(": ", 1)[1].split(" ")
        assert len(words) == 2 and all(w in vocab and w not in ("<eos>", "<unk>") for w in words), line
    # one line per step of the episode env 0 finished
    assert len(lines) in [e.value for e in events.Scalars("charts/episodic_length")]


@pytest.mark.parametrize("name", ["model_final.pt", "checkpoint.pt", "model_best.pt"])
def test_saved_checkpoints(run, name):
    ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
    assert ckpt["format"] == checkpoints.FORMAT and ckpt["algorithm"] == "shelm"
    assert ckpt["meta"]["algorithm"] == "shelm" and ckpt["meta"]["env_id"] == ENV_ID
    installed = {p: importlib.metadata.version(p) for p in ["torch", "gymnasium", "minigrid", "open_clip_torch"]}
    assert ckpt["meta"]["versions"] == installed | {"python": sys.version.split()[0]}
    args = ckpt["args"]
    assert (args["env_id"], args["num_envs"], args["num_steps"], args["topk"], args["n_layer"]) == (ENV_ID, 2, 64, 2, 2)
    assert (args["trxl_model"], args["clip_model"]) == ("tiny-random", "tiny-random")
    assert ckpt["run_name"] == run.name
    if name != "model_best.pt":
        assert ckpt["iteration"] == 2 and ckpt["global_step"] == 256

    # the trainable agent only: no tensor of the frozen Transformer-XL or CLIP anywhere in the file
    assert ckpt["encoder"] == {}
    trxl, _ = shelm_ppo.build_trxl("tiny-random", 2, 15, "cpu")
    clip = frozen_models.load_clip("tiny-random", "openai", "cpu")
    frozen_names = {*trxl.state_dict(), *clip.state_dict()}
    assert not frozen_names & set(names_in(ckpt))
    elsewhere = {k: v for k, v in ckpt.items() if k not in ("agent", "optimizer", "rng")}
    assert not list(tensors_in(elsewhere))
    agent_shapes = {tuple(t.shape) for t in ckpt["agent"].values()}
    assert all(t.numel() == 1 or tuple(t.shape) in agent_shapes for t in tensors_in(ckpt["optimizer"]))
    assert sum(t.numel() for t in tensors_in(ckpt["rng"])) < 10_000

    # same seed, same initial weights (the frozen models draw nothing from the global generator);
    # training moved every tensor, but only as far as 4 AdamW steps (2 updates x 2 minibatches) of
    # about lr each go: so these are the trained initial weights, not other ones
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        fresh = shelm_ppo.Agent((56, 56, 3), (7,), 64).state_dict()
    assert ckpt["agent"].keys() == fresh.keys()
    for key, value in fresh.items():
        moved = (ckpt["agent"][key] - value).abs().max().item()
        assert 0 < moved < 4 * 5e-4 * 3, (key, moved)


def names_in(obj):
    """Every dict key, at any depth."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from names_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from names_in(value)


def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)


def test_enjoy_replays_the_trained_agent(run):
    # enjoy.py rebuilds the frozen models from the checkpoint's arguments (the embeddings file the
    # run built included) and prints each step's memory words, which must be tiny-vocabulary words
    proc = subprocess.run(
        [sys.executable, str(ROOT / "enjoy.py"), str(run / "model_final.pt"), "--episodes", "1", "--show-memory"],
        cwd=run.parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=offline_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    memory = [line.split("memory <- ")[1].split() for line in lines if "memory <- " in line]
    vocab = set(frozen_models.tiny_vocab())
    assert memory and all(len(words) == 2 and set(words) <= vocab for words in memory)  # --topk 2 as trained
    episode = [line for line in lines if line.startswith("episode 1: return")]
    assert len(episode) == 1 and int(episode[0].rsplit("length ", 1)[1]) == len(memory)
    assert lines[-1].startswith("mean return over 1 episodes:")
