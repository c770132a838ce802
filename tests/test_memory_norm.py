"""--memory-norm: the default (none) is the papers' agent, unchanged; running standardises the memory read-out."""

import pytest
import torch
import torch.nn as nn

import helm_ppo
import helmv2_ppo
import shelm_ppo
from conftest import QUICK, run_script, tiny_args
from helm_utils.running_norm import RunningNorm

MODULES = {"shelm_ppo.py": shelm_ppo, "helm_ppo.py": helm_ppo, "helmv2_ppo.py": helmv2_ppo}
SHAPE, DIMS, D = (56, 56, 3), (7,), 16


def agent(module, memory_norm=None, seed=0):
    torch.manual_seed(seed)
    if memory_norm is None:  # as every caller built it before the flag
        return module.Agent(SHAPE, DIMS, D)
    return module.Agent(SHAPE, DIMS, D, memory_norm)


def inputs(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)
    return 3 * torch.randn(n, D, generator=g) + 1, obs


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES.keys())
def test_default_is_the_papers_agent(module):
    """Default: the same weights as with either flag value (the flag draws nothing), no state of its own, and
    the actor and critic read [Transformer-XL output, CNN query] as before the flag."""
    default, running = agent(module), agent(module, "running")
    state = default.state_dict()
    assert not [k for k in state if not k.startswith(("query.", "actor.", "critic."))]
    assert {k: v for k, v in running.state_dict().items() if not k.startswith("memory_")}.keys() == state.keys()
    assert all(torch.equal(v, running.state_dict()[k]) for k, v in state.items())
    trxl_out, obs = inputs()
    x = torch.cat([trxl_out, default.query(obs.permute(0, 3, 1, 2).float() / 255.0)], dim=-1)
    assert torch.equal(default.features(trxl_out, obs), x)
    action = torch.zeros(len(obs), 1, dtype=torch.long)
    _, logprob, _, value = default.get_action_and_value(trxl_out, obs, action)
    logits = default.actor(x)
    assert torch.equal(logprob[:, 0], torch.distributions.Categorical(logits=logits).log_prob(action[:, 0]))
    assert torch.equal(value, default.critic(x))
    assert isinstance(default.memory_norm, nn.Identity)


def test_running_norm_standardises_with_the_statistics_of_all_it_observed():
    """helm_utils.running_norm against the mean and variance of everything observed, computed at once."""
    norm = RunningNorm(D)
    x = inputs()[0]
    assert torch.equal(norm(x), x.clamp(-10, 10))  # before the first observe: mean 0, variance 1 (and the clip)
    first, second = torch.randn(5, 4, D) * 2 + 3, torch.randn(7, 4, D) * 0.5 - 1
    norm.observe(first)
    norm.observe(second)  # two rollouts merged: the statistics of both at once
    both = torch.cat([first.reshape(-1, D), second.reshape(-1, D)]).double()
    assert norm.count.item() == len(both)
    torch.testing.assert_close(norm.mean, both.mean(0).float())
    torch.testing.assert_close(norm.var, both.var(0, unbiased=False).float())
    read = norm(both.float())
    torch.testing.assert_close(read.mean(0), torch.zeros(D), atol=1e-5, rtol=0)
    torch.testing.assert_close(read.std(0, unbiased=False), torch.ones(D), atol=1e-4, rtol=0)
    assert norm(torch.full((1, D), 1e6)).max() == 10.0  # clipped, as observation normalisation
    zeros = RunningNorm(D)  # --ablate-memory: the read-out stays zeros
    zeros.observe(torch.zeros(3, 2, D))
    assert not zeros(torch.zeros(2, D)).any()


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES.keys())
def test_running_agent_reads_the_standardised_readout(module):
    norm = agent(module, "running")
    trxl_out, obs = inputs()
    norm.memory_norm.observe(torch.randn(5, 4, D) * 2 + 3)
    stats = norm.memory_norm
    expected = ((trxl_out - stats.mean) / (stats.var + 1e-8).sqrt()).clamp(-10, 10)
    torch.testing.assert_close(norm.features(trxl_out, obs)[:, :D], expected)
    assert {"memory_norm.count", "memory_norm.mean", "memory_norm.var"} <= norm.state_dict().keys()


def test_running_in_a_run_is_saved_and_played(tmp_path):
    """A run with --memory-norm running: its checkpoint holds the statistics of every rollout (the count is the
    number of steps), and the evaluation (enjoy.py's) rebuilds the agent with them."""
    from helm_utils import evaluation

    argv = [*tiny_args("helmv2_ppo.py", tmp_path), *QUICK, "--memory-norm", "running"]
    proc = run_script("helmv2_ppo.py", argv, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (ckpt_path,) = tmp_path.glob("runs/*/checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["args"]["memory_norm"] == "running"
    assert ckpt["agent"]["memory_norm.count"].item() == 128  # QUICK: 2 updates of 4 envs x 16 steps
    assert ckpt["agent"]["memory_norm.var"].min() > 0
    loaded = evaluation.load(ckpt_path, cuda=False)
    assert isinstance(loaded.agent.memory_norm, RunningNorm)
    assert torch.equal(loaded.agent.memory_norm.mean, ckpt["agent"]["memory_norm.mean"])
