"""The papers' baselines, benchmark/baselines/lstm_ppo.py: LSTM-PPO and CNN-PPO (--no-lstm).

The recurrent update re-runs the LSTM over the rollout exactly as the rollout ran it; the CNN is the memory
scripts' query encoder; runs resume exactly and train; the launcher and plot.py know the baselines; the
published configurations parse. The runs are made in this process (runpy: no interpreter start), each a few
updates of a small agent."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tyro
from test_reliability import assert_same, load, scalars

import shelm_ppo
from conftest import ROOT, error_line, offline_env, run_in_process
from helm_utils import arguments, env_suites, frozen_models

sys.path.insert(0, str(ROOT / "benchmark"))
sys.path.insert(0, str(ROOT / "benchmark" / "baselines"))
import lstm_ppo  # noqa: E402
import plot  # noqa: E402
import throughput  # noqa: E402

BASELINE = ROOT / "benchmark" / "baselines" / "lstm_ppo.py"
CONFIGS = json.loads((ROOT / "benchmark" / "configs.json").read_text())["configs"]

# episodes of a few dozen steps (the agent bumps into an obstacle): the rollouts hold episode ends
ENV = "MiniGrid-Dynamic-Obstacles-5x5-v0"
NUM_ENVS, NUM_STEPS, UPDATES = 4, 16, 4
BATCH = NUM_ENVS * NUM_STEPS
# one minibatch of all envs, one epoch: the update's forward comes before any optimizer step, so it must give
# the rollout's log-probabilities back (ratio 1), which the logged approx_kl and clipfrac show
SMALL = ["--env-id", ENV, "--num-envs", NUM_ENVS, "--num-steps", NUM_STEPS, "--num-minibatches", 1]
SMALL += ["--update-epochs", 1, "--total-timesteps", UPDATES * BATCH, "--d-model", 32, "--lstm-hidden-size", 16]
SMALL += ["--checkpoint-every", 1, "--no-progress-bar", "--no-cuda"]


def obs_shape_and_actions(env_id=ENV):
    env = shelm_ppo.make_env(env_id, 0, False, "test")()
    shape, dims = env.observation_space.shape, env_suites.action_dims(env.action_space)
    env.close()
    return shape, dims


# ---------------------------------------------------------------------------------------------
# The network and the recurrent update
# ---------------------------------------------------------------------------------------------


def test_the_cnn_is_the_memory_scripts_query_encoder():
    """The same layers, drawn in the same order: with one seed, the baseline's CNN is the scripts' query
    encoder weight for weight; the actor and critic read the LSTM's output (the CNN's without it)."""
    shape, dims = obs_shape_and_actions()
    torch.manual_seed(0)
    memory_agent = shelm_ppo.Agent(shape, dims, 32)
    for lstm_size in (16, None):
        torch.manual_seed(0)
        agent = lstm_ppo.Agent(shape, dims, 32, lstm_size)
        assert_same(agent.cnn.state_dict(), memory_agent.query.state_dict(), "cnn")
        width = lstm_size or 32
        assert agent.actor[0].in_features == agent.critic[0].in_features == width
        assert [type(m) for m in agent.actor] == [type(m) for m in memory_agent.actor]
        assert [type(m) for m in agent.critic] == [type(m) for m in memory_agent.critic]
        assert (agent.lstm is None) == (lstm_size is None)


def between(text, first, last):
    """The lines of text from the one holding `first` to the one holding `last`, both included."""
    start = text.index(first)
    start = text.rindex("\n", 0, start) + 1
    return text[start : text.index("\n", text.index(last, start)) + 1]


@pytest.mark.parametrize(
    "first, last",
    [
        ("advantages = torch.zeros_like(rewards)", "returns = advantages + values"),  # GAE
        ("logratio = newlogprob - b_logprobs[mb_inds]", "optimizer.step()"),  # the clipped loss and the step
        ("if args.target_kl is not None", "timing.log_perf("),  # early stop and logging
        ('if "episode" in infos:', 'writer.add_scalar("charts/episodic_length"'),  # returns
    ],
)
def test_the_ppo_loop_is_the_memory_scripts(first, last):
    """Same PPO settings, same logging: the baseline's copies of the scripts' PPO code are equal to theirs
    (tests/test_drift.py keeps the three scripts equal to one another)."""
    baseline, script = BASELINE.read_text(), (ROOT / "shelm_ppo.py").read_text()
    assert between(baseline, first, last) == between(script, first, last)
    assert len(between(baseline, first, last).splitlines()) >= 3


def rollout_and_update_args(num_envs, num_steps, num_minibatches, lstm=True):
    args = lstm_ppo.Args(num_envs=num_envs, num_steps=num_steps, num_minibatches=num_minibatches, lstm=lstm)
    args.batch_size = num_envs * num_steps
    args.minibatch_size = args.batch_size // num_minibatches
    return args


def test_recurrent_update_equals_the_step_by_step_rollout():
    """A rollout of 8 steps of 4 envs, stepped one step at a time as the training loop steps it (the LSTM's state
    carried from a previous rollout, zeroed where episodes start: at step 0, in the middle, twice in a row, never),
    then recomputed as the update does: over the minibatches of whole envs, each from the state its envs had at
    the rollout's start. The same LSTM outputs, log-probabilities, entropies and values, step by step; and the
    same LSTM outputs from nn.LSTM run over each episode in one call, from zeros (from the carried state for the
    episode under way at the start)."""
    shape, dims = obs_shape_and_actions()
    T, B = 8, 4
    torch.manual_seed(1)
    agent = lstm_ppo.Agent(shape, dims, 32, 16)
    obs = torch.randint(0, 256, (T, B, *shape), dtype=torch.uint8)
    dones = torch.zeros(T, B)
    dones[0, 0] = dones[3, 0] = 1  # env 0: new episodes at the start and in the middle
    dones[4, 1] = dones[5, 1] = 1  # env 1: a one-step episode
    dones[7, 2] = 1  # env 2: a new episode at the last step; env 3: none
    initial = (torch.randn(1, B, 16), torch.randn(1, B, 16))  # carried over from an earlier rollout

    # the rollout, one step at a time
    state, features, actions, logprobs, entropies, values = initial, [], [], [], [], []
    with torch.no_grad():
        for t in range(T):
            x, _ = agent.get_states(obs[t], state, dones[t])
            action, logprob, entropy, value, state = agent.get_action_and_value(obs[t], state, dones[t])
            features.append(x)
            actions.append(action)
            logprobs.append(logprob)
            entropies.append(entropy)
            values.append(value)
    features, actions, logprobs = torch.stack(features), torch.stack(actions), torch.stack(logprobs)
    entropies, values = torch.stack(entropies), torch.stack(values)

    # the update: flattened step-major, minibatches of whole envs, each from its envs' initial states
    args = rollout_and_update_args(B, T, num_minibatches=2)
    b_obs, b_dones, b_actions = obs.reshape(-1, *shape), dones.reshape(-1), actions.reshape(-1, len(dims))
    covered = []
    for mb_inds, mb_envs in lstm_ppo.minibatches(args, "cpu"):
        assert len(mb_envs) == 2 and torch.equal(mb_inds, (torch.arange(T)[:, None] * B + mb_envs).reshape(-1))
        covered += mb_envs.tolist()
        mb_state = tuple(s[:, mb_envs] for s in initial)
        x, _ = agent.get_states(b_obs[mb_inds], mb_state, b_dones[mb_inds])
        _, logprob, entropy, value, _ = agent.get_action_and_value(
            b_obs[mb_inds], mb_state, b_dones[mb_inds], b_actions[mb_inds]
        )
        tol = {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(x, features[:, mb_envs].reshape(len(mb_inds), -1), **tol)
        torch.testing.assert_close(logprob, logprobs[:, mb_envs].reshape(len(mb_inds), -1), **tol)
        torch.testing.assert_close(entropy, entropies[:, mb_envs].reshape(-1), **tol)
        torch.testing.assert_close(value, values[:, mb_envs].reshape(len(mb_inds), 1), **tol)
    assert sorted(covered) == list(range(B))

    # an independent recomputation: the LSTM over each episode in one call
    with torch.no_grad():
        cnn = agent.cnn(obs.reshape(-1, *shape).permute(0, 3, 1, 2).float() / 255.0).reshape(T, B, -1)
        for env in range(B):
            starts = [0] + [t for t in range(T) if dones[t, env]] + [T]
            for begin, end in zip(starts, starts[1:]):
                if begin == end:
                    continue
                carried = begin == 0 and not dones[0, env]
                h0 = tuple(s[:, env : env + 1] if carried else torch.zeros(1, 1, 16) for s in initial)
                out, _ = agent.lstm(cnn[begin:end, env : env + 1], h0)
                torch.testing.assert_close(out[:, 0], features[begin:end, env], rtol=1e-5, atol=1e-6)
        # and the check can fail: without the resets, env 0's second episode would differ
        unreset, _ = agent.lstm(cnn[:, 0:1], tuple(s[:, 0:1] for s in initial))
        assert not torch.allclose(unreset[3:, 0], features[3:, 0], atol=1e-3)


def lstm_step_by_step(lstm, x, state, done):
    """The brute force: nn.LSTM's equations (its documentation's) from its weights, one step at a time, the state
    zeroed before each step that starts an episode. x (T, B, input), done (T, B), state ((1, B, H), (1, B, H))."""
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    h, c, outputs = state[0][0], state[1][0], []
    for x_t, done_t in zip(x, done):
        h, c = (1 - done_t)[:, None] * h, (1 - done_t)[:, None] * c
        i, f, g, o = (x_t @ lstm.weight_ih_l0.T + h @ lstm.weight_hh_l0.T + bias).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h[None], c[None])


def done_patterns():
    """(T, B) episode starts: the chosen cases, then random ones of several densities and shapes (one step of
    several envs, as the rollout runs it; one env)."""
    T, B = 9, 6
    done = torch.zeros(T, B)
    done[0, 0] = done[4, 0] = 1  # env 0: an episode starts at the first step, another in the middle
    done[2:5, 1] = 1  # env 1: consecutive starts (one-step episodes)
    # env 2: no start, one stretch from the carried state
    done[:, 3] = 1  # env 3: every step starts an episode
    done[T - 1, 4] = 1  # env 4: a start at the last step
    done[1::2, 5] = 1  # env 5: every other step
    yield done
    gen = torch.Generator().manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        for T, B in [(1, 5), (12, 4), (7, 1)]:
            yield (torch.rand(T, B, generator=gen) < p).float()


def test_lstm_over_episodes_equals_a_step_by_step_loop():
    """The LSTM run over the segments between episode starts in one packed nn.LSTM call gives, for every done
    pattern, the outputs, final states and gradients (inputs, initial state, every LSTM weight) of the LSTM's
    equations stepped one step at a time with the state zeroed before each episode's first step. In float64, so
    that the two paths' kernels differ only by rounding."""
    shape, dims = obs_shape_and_actions()
    torch.manual_seed(2)
    agent = lstm_ppo.Agent(shape, dims, 5, 4).double()
    params = dict(agent.lstm.named_parameters())
    for done in done_patterns():
        T, B = done.shape
        x = torch.randn(T, B, 5, dtype=torch.float64, requires_grad=True)
        state = tuple(torch.randn(1, B, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
        out, final = agent.lstm_over_episodes(x.reshape(T * B, 5), state, done.reshape(-1).double())
        expected, expected_final = lstm_step_by_step(agent.lstm, x, state, done.double())
        torch.testing.assert_close(out, expected.reshape(T * B, 4))
        torch.testing.assert_close(final, expected_final)
        # gradients of one random function of everything returned
        weights = [torch.randn_like(t) for t in (expected, *expected_final)]
        grads = []
        for outputs in [(out.reshape(T, B, 4), *final), (expected, *expected_final)]:
            loss = sum((w * t).sum() for w, t in zip(weights, outputs))
            grads.append(torch.autograd.grad(loss, [x, *state, *params.values()]))
        for name, new, reference in zip(["x", "hidden", "cell", *params], *grads):
            torch.testing.assert_close(new, reference, msg=f"{name}, done {done.tolist()}")
    # the patterns exercise the resets: without them the outputs would differ
    first = next(done_patterns())
    x = torch.randn(*first.shape, 5, dtype=torch.float64)
    state = tuple(torch.randn(1, first.shape[1], 4, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        out, _ = agent.lstm_over_episodes(x.reshape(-1, 5), state, first.reshape(-1).double())
        unreset, _ = lstm_step_by_step(agent.lstm, x, state, torch.zeros_like(first, dtype=torch.float64))
    differs = ~torch.isclose(out.reshape(*first.shape, 4), unreset).all(-1)
    assert differs[:, [0, 1, 3, 4, 5]].any(0).all() and not differs[:, 2].any()


def test_minibatches():
    """LSTM: each epoch, the envs shuffled into num_minibatches groups, every step of each; CNN-PPO: single steps
    shuffled into minibatches of minibatch_size, as the memory scripts."""
    for lstm in (True, False):
        args = rollout_and_update_args(num_envs=6, num_steps=5, num_minibatches=3, lstm=lstm)
        torch.manual_seed(0)
        epochs = [lstm_ppo.minibatches(args, "cpu") for _ in range(2)]
        for batches in epochs:
            inds = torch.cat([mb_inds for mb_inds, _ in batches])
            assert sorted(inds.tolist()) == list(range(30)) and [len(mb) for mb, _ in batches] == [10, 10, 10]
            for mb_inds, mb_envs in batches:
                assert (mb_envs is None) == (not lstm)
                if lstm:
                    assert sorted(set((mb_inds % 6).tolist())) == sorted(mb_envs.tolist())
        assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(*epochs))  # shuffled anew each epoch


# ---------------------------------------------------------------------------------------------
# Runs: in this process, a few updates each
# ---------------------------------------------------------------------------------------------


def train(cwd, *argv, stop_after=None):
    """`python benchmark/baselines/lstm_ppo.py *argv` in this process (conftest.run_in_process), in cwd (created):
    its exit status, or the `error:` line it stopped with. stop_after: SIGTERM after that update."""
    proc = run_in_process(BASELINE.relative_to(ROOT), argv, cwd, stop_after=stop_after)
    return error_line(proc) if proc.returncode == 1 and error_line(proc).startswith("error: ") else proc.returncode


def run_dir_of(cwd):
    (run_dir,) = [p for p in (cwd / "runs").iterdir() if p.is_dir()]
    return run_dir


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """LSTM-PPO uninterrupted; LSTM-PPO stopped by SIGTERM after update 2 and resumed twice, from two copies of
    what it saved; CNN-PPO uninterrupted. Same seed and arguments."""
    base = tmp_path_factory.mktemp("baselines")
    out = SimpleNamespace()
    assert train(base / "lstm", *SMALL, "--save-model") == 0
    out.lstm = run_dir_of(base / "lstm")
    out.stop_code = train(base / "stopped", *SMALL, stop_after=2)
    out.stopped = run_dir_of(base / "stopped")
    out.saved = load(out.stopped / "checkpoint.pt")
    shutil.copytree(base / "stopped", base / "again")
    resume = ["--resume", Path("runs") / out.stopped.name / "checkpoint.pt", "--no-progress-bar"]
    out.resume_codes = [train(base / "stopped", *resume), train(base / "again", *resume)]
    out.resumed, out.again = load(out.stopped / "checkpoint.pt"), load(run_dir_of(base / "again") / "checkpoint.pt")
    assert train(base / "cnn", *SMALL, "--no-lstm") == 0
    out.cnn = run_dir_of(base / "cnn")
    return out


def test_lstm_ppo_trains(made):
    ckpt = load(made.lstm / "checkpoint.pt")
    assert (ckpt["iteration"], ckpt["global_step"], ckpt["algorithm"]) == (UPDATES, UPDATES * BATCH, "lstm")
    assert ckpt["args"]["lstm"] and ckpt["encoder"] == {} and any("lstm" in k for k in ckpt["agent"])
    assert made.lstm.name.startswith(f"{ENV}__lstm_ppo__1__")
    logged = scalars(made.lstm)
    assert [s for s, _ in logged["losses/value_loss"]] == [i * BATCH for i in range(1, UPDATES + 1)]
    assert logged["charts/episodic_return"], "no episode ended: the resets were not exercised"
    # the update re-ran the LSTM over the rollout exactly: before its only optimizer step, ratio 1
    assert all(abs(kl) < 1e-6 for _, kl in logged["losses/approx_kl"]), logged["losses/approx_kl"]
    assert all(clipfrac == 0 for _, clipfrac in logged["losses/clipfrac"])
    # its own timers, as the memory scripts' (benchmark/throughput.py reads them)
    perf = throughput.read_perf(made.lstm)
    assert all(len(perf[f"perf/{p}_s"]) == UPDATES for p in ["env", "agent", "rollout_other", "update", "cpu"])


def test_cnn_ppo_trains(made):
    ckpt = load(made.cnn / "checkpoint.pt")
    assert (ckpt["iteration"], ckpt["global_step"]) == (UPDATES, UPDATES * BATCH)
    assert not ckpt["args"]["lstm"] and not any("lstm" in k for k in ckpt["agent"])
    assert made.cnn.name.startswith(f"{ENV}__cnn_ppo__1__")
    steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {UPDATES}  # one minibatch, one epoch, every update
    shape, dims = obs_shape_and_actions()
    torch.manual_seed(1)  # the run's seed: its initial weights
    initial = lstm_ppo.Agent(shape, dims, 32, None).state_dict()
    assert all(not torch.equal(initial[k], v) for k, v in ckpt["agent"].items() if k.endswith("weight"))
    logged = scalars(made.cnn)
    assert [s for s, _ in logged["losses/policy_loss"]] == [i * BATCH for i in range(1, UPDATES + 1)]
    assert all(np.isfinite(v) for _, v in logged["losses/value_loss"])


def test_stopped_run_resumes_to_the_end(made):
    assert made.stop_code == 128 + signal.SIGTERM
    assert (made.saved["iteration"], made.saved["global_step"]) == (2, 2 * BATCH)
    assert made.resume_codes == [0, 0]
    assert (made.resumed["iteration"], made.resumed["global_step"]) == (UPDATES, UPDATES * BATCH)
    assert made.resumed["run_name"] == made.stopped.name  # the same run directory, continued
    assert [s for s, _ in scalars(made.stopped)["losses/value_loss"]] == [i * BATCH for i in range(1, UPDATES + 1)]
    # what the continuation does depends on the checkpoint alone: two resumptions end bitwise equal
    assert_same(made.resumed, made.again)


def test_resuming_a_finished_run_changes_nothing(made, tmp_path):
    """As tests/test_reliability.py for the scripts: no update is left, so the run restores everything and saves
    it again; every restored part (weights, optimizer, reward normalisation, RNG states, counters, best return)
    must come back bitwise as saved."""
    shutil.copytree(made.lstm.parent, tmp_path / "runs")
    run_dir = tmp_path / "runs" / made.lstm.name
    before, logged = load(run_dir / "checkpoint.pt"), scalars(run_dir)
    resume = Path("runs") / made.lstm.name / "checkpoint.pt"
    assert train(tmp_path, "--resume", resume, "--no-progress-bar", "--checkpoint-every", "1") == 0
    after = load(run_dir / "checkpoint.pt")
    assert after["args"].pop("resume") == str(resume) and before["args"].pop("resume") is None
    assert_same(before, after)
    assert_same(load(run_dir / "model_final.pt")["agent"], before["agent"])
    assert scalars(run_dir) == logged


def test_upload_is_refused_in_one_line(tmp_path):
    assert train(tmp_path, *SMALL, "--upload-model") == (
        "error: --upload-model: the baselines cannot be evaluated for an upload (helm_utils.evaluation plays the "
        "memory agents only); --save-model keeps the weights"
    )
    code = train(tmp_path, *SMALL, "--num-minibatches", 3)
    assert code == "error: --num-minibatches 3 must divide --num-envs 4: the LSTM's minibatches are whole envs"
    assert os.listdir(tmp_path) == []  # nothing written


def test_an_encoder_state_is_refused(made, tmp_path):
    """A baseline has no frozen encoder: its checkpoints hold an empty encoder state, and a checkpoint holding
    one (another script's, or crafted) is refused in one line before anything is written."""
    ckpt = load(made.lstm / "checkpoint.pt")
    ckpt["encoder"] = {"running_mean": torch.zeros(3)}
    torch.save(ckpt, tmp_path / "crafted.pt")
    code = train(tmp_path, "--resume", "crafted.pt", "--no-progress-bar")
    assert code == (
        "error: checkpoint crafted.pt does not match this model (a baseline has no encoder state, this one holds "
        "running_mean)"
    )
    assert os.listdir(tmp_path) == ["crafted.pt"]


# a --d-model whose agent (the CNN's last layer on 56x56 pixels, the LSTM or the actor and critic, with gradients and
# AdamW's moments) takes 10-12 GB against a memory limit of 8 GB; the estimate kept by hand beside the model counted
# the CNN's last layer as 128 inputs wide and no actor or critic, less than 1 GB, and let it be built
HUGE_D_MODEL, MEMORY_LIMIT = 200_000, 8 * 10**9


@pytest.mark.parametrize("network", ["lstm", "cnn"])
def test_a_d_model_beyond_memory_is_refused_before_anything_is_built(network, made, tmp_path, monkeypatch):
    """--d-model from the command line and from a crafted checkpoint, for LSTM-PPO and CNN-PPO: one line naming it
    (and where it came from), before the envs are made, in well under a second."""
    monkeypatch.setattr(arguments, "memory_limit", lambda: MEMORY_LIMIT)
    built = []
    monkeypatch.setattr(shelm_ppo, "make_envs", lambda *a: built.append(a))  # the baseline's envs come from here
    lstm = [] if network == "lstm" else ["--no-lstm"]
    arguments.estimate(lstm_ppo.Args(d_model=32))  # torch's meta kernels load once per process (about a second)
    start = time.perf_counter()
    code = train(tmp_path / "cli", *SMALL, *lstm, "--d-model", HUGE_D_MODEL)
    elapsed = time.perf_counter() - start
    flags = f"--d-model {HUGE_D_MODEL}" + (", --lstm-hidden-size 16" if network == "lstm" else "")
    assert code.startswith(f"error: {flags}: the agent's weights, gradients and AdamW moments alone take at least")
    assert code.endswith("more than the 8.0 GB of memory here; choose smaller values")
    assert elapsed < 5, elapsed  # milliseconds of estimate; the rest is tyro (seconds only on a crowded machine)
    code = train(tmp_path / "cli", *SMALL, *lstm, "--d-model", 10**17)  # a layer whose size overflows int64
    assert code.startswith(f"error: --d-model {10**17}") and code.endswith(
        "more than the 8.0 GB of memory here; choose smaller values"
    )

    ckpt = load(getattr(made, network) / "checkpoint.pt")
    ckpt["args"]["d_model"] = HUGE_D_MODEL  # the weights stay 32 wide: loading them would fail only after the build
    torch.save(ckpt, tmp_path / "crafted.pt")
    code = train(tmp_path, "--resume", "crafted.pt", "--no-progress-bar")
    assert code.startswith(f"error: checkpoint crafted.pt holds an argument out of range: {flags}: the agent's")
    assert built == [] and sorted(os.listdir(tmp_path)) == ["cli", "crafted.pt"] and os.listdir(tmp_path / "cli") == []


def test_the_estimate_counts_the_real_networks():
    """The size estimate's networks are the scripts' own: its trained agent is 16 bytes (float32 weights, gradients
    and AdamW's two moments) per parameter of the Agent the script builds for the env, and the memory scripts'
    frozen Transformer-XL 4 bytes (it is built in float32) per parameter of the script's, built on the CPU."""
    shape, dims = obs_shape_and_actions()
    for d_model, lstm_size in [(32, 16), (48, None)]:
        args = lstm_ppo.Args(env_id=ENV, d_model=d_model, lstm_hidden_size=lstm_size or 8, lstm=lstm_size is not None)
        parts = {what: nbytes for nbytes, what, _ in arguments.estimate(args)}
        agent = lstm_ppo.Agent(shape, dims, d_model, lstm_size)
        assert parts["the agent's weights, gradients and AdamW moments"] == 16 * sum(
            p.numel() for p in agent.parameters()
        )
    args = shelm_ppo.Args(
        env_id=ENV, trxl_model="tiny-random", clip_model="tiny-random", n_layer=2, mem_len=7, cuda=False
    )
    parts = {what: nbytes for nbytes, what, _ in arguments.estimate(args)}
    trxl = shelm_ppo.TransformerXL(frozen_models.TINY_TRXL_CONFIG, 2, 7)  # build_trxl's for tiny-random, on the CPU
    assert parts["the frozen Transformer-XL"] == 4 * sum(p.numel() for p in trxl.parameters())
    agent = shelm_ppo.Agent(shape, dims, trxl.d_model)
    assert parts["the agent's weights, gradients and AdamW moments"] == 16 * sum(p.numel() for p in agent.parameters())
    trxl.to(frozen_models.resolve_frozen_dtype(args.frozen_dtype, "cpu"))  # as build_memory does
    mems, _ = shelm_ppo.init_memory(trxl, args.num_envs, "mask", "cpu")
    assert parts["the Transformer-XL memories"] == 2 * mems.numel() * mems.element_size()  # kept, and written anew


def test_the_baseline_leaves_the_run_infrastructure_to_the_package():
    text = BASELINE.read_text()  # as tests/test_layout.py checks the memory scripts
    for name in ["torch.load", "signal.signal", "wandb.init", "SummaryWriter(", "fcntl"]:
        assert name not in text, f"lstm_ppo.py has {name}: it belongs in helm_utils/"
    calls = ["runs.parse(", "runs.Run(", "run.start(", "run.update_starts(", "run.exit_if_stopped()"]
    calls += ["run.nonfinite(", "run.update_done(", "run.finish("]
    assert [call for call in calls if call not in text] == []


# ---------------------------------------------------------------------------------------------
# The published configurations, the launcher and the plots
# ---------------------------------------------------------------------------------------------


def test_published_configs_parse():
    """Every environment of configs.json has the published LSTM and PPO configurations, in lstm_ppo.py's flags;
    its defaults are the LSTM configuration of MiniGrid-Memory."""
    for env_id, entries in CONFIGS.items():
        for name, section, lstm in [("lstm_ppo.py", "LSTM", True), ("cnn_ppo.py", "PPO", False)]:
            entry = entries[name]
            assert entry["section"] == section and entry["source"] == entries["shelm_ppo.py"]["source"]
            argv = []
            for flag, value in entry["flags"].items():
                argv += [flag] if value is True else [flag, str(value)]
            args = tyro.cli(lstm_ppo.Args, args=argv)
            lstm_ppo.check_args(args)
            assert args.lstm is lstm and args.anneal_lr is False, (env_id, name)
            assert args.learning_rate == entry["flags"]["--learning-rate"] and args.num_minibatches == 8
            assert "mem_len" in entry["not_flags"] and entry["not_flags"]["optimizer"] == "AdamW"
    memory = CONFIGS["MiniGrid-MemoryS11-v0"]["lstm_ppo.py"]["flags"]
    argv = [a for flag, value in memory.items() for a in ([flag] if value is True else [flag, str(value)])]
    assert tyro.cli(lstm_ppo.Args, args=argv) == lstm_ppo.Args()


def test_launcher_lists_baseline_cells(tmp_path):
    argv = ["--scripts", "shelm_ppo.py", "lstm_ppo.py", "cnn_ppo.py", "--env-ids", "MiniGrid-DoorKey-5x5-v0"]
    argv += ["--seeds", "1", "--published", "--tiny", "--variants", "memory:", "ablated:--ablate-memory"]
    argv += ["--n-layer", "2", "--dry-run", "--workdir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "launch.py"), *argv],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cells = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line and not line.startswith("#")]
    by_name = {c[c.index("--exp-name") + 1].rsplit("-", 1)[0]: c for c in cells}
    assert sorted(by_name) == ["cnn_ppo-memory", "lstm_ppo-memory", "shelm_ppo-ablated", "shelm_ppo-memory"]
    assert "# lstm_ppo.py has no --ablate-memory: no variant ablated of it" in proc.stdout
    published = CONFIGS["MiniGrid-DoorKey-5x5-v0"]
    for name, key in [("lstm_ppo-memory", "lstm_ppo.py"), ("cnn_ppo-memory", "cnn_ppo.py")]:
        cmd = by_name[name]
        assert cmd[1] == str(BASELINE) and "--n-layer" not in cmd and "--trxl-model" not in cmd
        args = tyro.cli(lstm_ppo.Args, args=cmd[2:])  # the command is the baseline's
        assert args.lstm is (key == "lstm_ppo.py") and args.d_model == 64  # --tiny: the tiny models' width
        assert args.learning_rate == published[key]["flags"]["--learning-rate"]
        assert args.num_steps == published[key]["flags"]["--num-steps"]
    assert by_name["shelm_ppo-memory"][by_name["shelm_ppo-memory"].index("--n-layer") + 1] == "2"


def test_plot_groups_the_baselines_apart(made):
    """plot.py reads a baseline's run as lstm_ppo or cnn_ppo, a curve (and a table row) of its own, labelled
    apart from the memory scripts' --ablate-memory runs."""
    lstm, cnn = plot.load_run(made.lstm, 0.5), plot.load_run(made.cnn, 0.5)
    assert (lstm.script, cnn.script) == ("lstm_ppo", "cnn_ppo")

    def memory_run(ablate):
        args = {"env_id": ENV, "topk": "1", "n_layer": "2", "ablate_memory": str(ablate), "num_envs": "4"}
        return plot.Run(Path("x"), "shelm_ppo", args, np.array([64]), np.array([0.5]), np.array([1.0]), 64, 1.0, 0.5)

    groups, varying = plot.group_runs([lstm, cnn, memory_run(True), memory_run(False)])
    assert varying == ["ablate_memory"]
    labels = sorted(plot.curve_label(script, label) for script, _, label in groups)
    assert labels == ["cnn_ppo", "lstm_ppo", "shelm_ppo ablate_memory=False", "shelm_ppo ablate_memory=True"]
    rows = [line.split(" | ")[0:3] for line in plot.final_table(groups).splitlines()[2:]]
    assert ["| cnn_ppo", ENV, "-"] in rows and ["| lstm_ppo", ENV, "-"] in rows
    assert plot.plot_pruning(groups, Path("unused"), np.random.default_rng(0), 10) is False  # no n_layer to vary
