"""benchmark/: the published configurations, the memory ablation, the launcher and the plots."""

import json
import subprocess
import sys

import pytest
import torch
import tyro

import helm_ppo
import helmv2_ppo
import shelm_ppo
from conftest import QUICK, ROOT, SCRIPTS, offline_env, tiny_args

MODULES = {"shelm_ppo.py": shelm_ppo, "helm_ppo.py": helm_ppo, "helmv2_ppo.py": helmv2_ppo}
CONFIGS = json.loads((ROOT / "benchmark" / "configs.json").read_text())["configs"]
MINIGRID = [
    "MiniGrid-DoorKey-5x5-v0",
    "MiniGrid-DoorKey-6x6-v0",
    "MiniGrid-Dynamic-Obstacles-5x5-v0",
    "MiniGrid-KeyCorridorS3R1-v0",
    "MiniGrid-MemoryS11-v0",
    "MiniGrid-RedBlueDoors-6x6-v0",
    "MiniGrid-Unlock-v0",
]


def as_argv(flags):
    """{"--flag": value} -> ["--flag", "value"]; true stands for a flag without a value."""
    argv = []
    for flag, value in flags.items():
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def test_configs_cover_every_script_and_minigrid_env():
    for env_id in MINIGRID:
        assert sorted(CONFIGS[env_id]) == sorted(SCRIPTS), env_id


@pytest.mark.parametrize("env_id", sorted(CONFIGS))
def test_configs_parse_with_the_scripts_args(env_id):
    for script, entry in CONFIGS[env_id].items():
        module = MODULES[script]
        args = tyro.cli(module.Args, args=as_argv(entry["flags"]))
        module.check_args(args)  # in range: a bad value would exit with one error line
        for flag, value in entry["flags"].items():
            name = flag.removeprefix("--").replace("-", "_")
            if name.startswith("no_"):
                assert getattr(args, name[3:]) is False, (script, flag)
            else:
                assert getattr(args, name) == value, (script, flag)
        # what has no flag is what the scripts always do
        assert entry["not_flags"]["optimizer"] == "AdamW" and entry["not_flags"]["lr_decay"] == "none"


def test_scripts_defaults_are_the_published_memory_configs():
    """The scripts' defaults were taken from the MiniGrid-Memory configurations: the two sources agree."""
    for script, entry in CONFIGS["MiniGrid-MemoryS11-v0"].items():
        defaults = MODULES[script].Args()
        assert defaults.env_id == "MiniGrid-MemoryS11-v0"
        assert tyro.cli(MODULES[script].Args, args=as_argv(entry["flags"])) == defaults, script


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES.keys())
def test_memory_readout_ablated_is_zero(module):
    trxl_out = torch.randn(3, 5, 8)  # (tokens per step, envs, d_model)
    assert torch.equal(module.memory_readout(trxl_out, False), trxl_out[-1])
    ablated = module.memory_readout(trxl_out, True)
    assert ablated.shape == trxl_out[-1].shape and not ablated.any()


def test_ablated_agent_does_not_depend_on_the_memory(tmp_path):
    """With --ablate-memory the trained agent is bit-identical whatever the Transformer-XL computes
    (1 or 2 layers); without it, the number of layers changes the agent: its memory input is used."""
    procs = {}
    for ablate in (True, False):
        for n_layer in (1, 2):
            cwd = tmp_path / f"{ablate}-{n_layer}"
            cwd.mkdir()
            argv = [*tiny_args("shelm_ppo.py", tmp_path), *QUICK, "--n-layer", str(n_layer), "--seed", "3"]
            argv += ["--ablate-memory"] if ablate else []
            procs[ablate, n_layer] = (
                cwd,
                subprocess.Popen(
                    [sys.executable, str(ROOT / "shelm_ppo.py"), *argv],
                    cwd=cwd,
                    env=offline_env() | {"OMP_NUM_THREADS": "1"},
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                ),
            )
    agents = {}
    for key, (cwd, proc) in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        (ckpt,) = cwd.glob("runs/*/checkpoint.pt")
        agents[key] = torch.load(ckpt, weights_only=True)["agent"]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(agents[True, 1], agents[True, 2])
    assert not same(agents[False, 1], agents[False, 2])
