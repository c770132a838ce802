"""benchmark/cue_use.py: a trained agent's own MiniGrid-Memory episodes, split by whether it saw the cue. Checked
against a replay of the same actions in a fresh env, where the cue's visibility is read before every step."""

import importlib.util
import shutil

import numpy as np
import pytest
import torch

import helm_ppo
from conftest import QUICK, ROOT, run_in_process, tiny_args

spec = importlib.util.spec_from_file_location("cue_use", ROOT / "benchmark" / "cue_use.py")
cue_use = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cue_use)


class Actions:
    """An output of evaluation.play that keeps env 0's actions, episode by episode."""

    def __init__(self):
        self.episodes = {}

    def step(self, record):
        self.episodes.setdefault(record.episode, []).append(record.action)

    def end_episode(self, episode):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    """A tiny HELM run on MiniGrid-MemoryS7-v0 (it learns nothing: its episodes are long and varied)."""
    cwd = tmp_path_factory.mktemp("cue")
    argv = [
        *tiny_args("helm_ppo.py", cwd),
        *QUICK,
        "--env-id",
        "MiniGrid-MemoryS7-v0",
        "--exp-name",
        "helm_ppo-memory-0123abcd",
    ]
    proc = run_in_process("helm_ppo.py", argv, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def test_episodes_agree_with_a_replay_of_the_same_actions(memory_run):
    actions = Actions()
    loaded, episodes = cue_use.play_run(memory_run / "checkpoint.pt", 6, seed=3, outputs=[actions])
    assert [e["episode"] for e in episodes] == [2, 3, 4, 5, 6, 7]  # the first left out
    env = helm_ppo.make_env(loaded.args.env_id, 0, False, "replay")()
    env.reset(seed=loaded.args.seed + 10_000 + 3)
    u = env.unwrapped
    replayed = {}
    for number in range(1, 8):
        seen, success, cue = [], False, u.grid.get(1, u.height // 2 - 1).type
        for t, action in enumerate(actions.episodes[number]):
            if u.agent_sees(1, u.height // 2 - 1):  # before the step: what the observation of step t shows
                seen.append(t)
            _, reward, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                success = reward > 0
                assert t == len(actions.episodes[number]) - 1
        env.reset()
        replayed[number] = (seen, success, len(actions.episodes[number]), cue)
    for e in episodes:
        assert (e["seen_at"], e["success"], e["length"], e["cue"]) == replayed[e["episode"]]
        assert e["readout_at_choice"].shape == (loaded.trxl.d_model,)
    assert any(0 < len(e["seen_at"]) < e["length"] for e in episodes)  # the cue in and out of view: the timing checked


def test_summary_and_table(memory_run, tmp_path, capsys):
    out = tmp_path / "out"
    cue_use.main(cue_use.Args(runs=str(memory_run.parent), out=str(out), episodes=5))
    table = (out / "cue_use.md").read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| helm_ppo | memory | 1 |")]
    report = __import__("json").loads((out / "cue_use.json").read_text())
    (run,) = report["runs"]
    episodes = run["episode_list"]
    assert run["episodes"] == len(episodes) == 5
    seen = [e for e in episodes if e["seen_at"]]
    assert run["saw_cue"] == len(seen) / 5
    assert run["success"] == np.mean([e["success"] for e in episodes])
    assert f"{run['saw_cue']:.2f}" in row
    assert run["cue_decodable_at_choice"] is None or 0 <= run["cue_decodable_at_choice"] <= 1


def test_decoding_at_the_choice_finds_a_planted_cue_and_none_when_ablated():
    """decode_at_choice on synthetic episodes: the cue planted in one feature of noise is found; the same
    episodes read by an ablated agent (zeros) give chance (the majority class of the training folds)."""
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(60):
        cue = "key" if i % 2 else "ball"
        readout = rng.normal(size=16)
        readout[3] += 3.0 if cue == "key" else -3.0
        episodes.append({"seen_at": [0], "cue": cue, "readout_at_choice": readout})
    accuracy, chance = cue_use.decode_at_choice(episodes, ablated=False)
    assert accuracy >= 0.95 and chance == 0.5  # 30 of each cue, stratified folds: the majority is a tie
    assert cue_use.decode_at_choice(episodes, ablated=True) == (chance, chance)
    assert cue_use.decode_at_choice(episodes[:3], ablated=False) == (None, None)  # too few to hold any out


@pytest.fixture
def no_play(monkeypatch):
    """cue_use.py's work, playing a run's episodes, failing the test if it starts."""

    def played(*args, **kwargs):
        raise AssertionError("an agent was played")

    monkeypatch.setattr(cue_use, "play_run", played)


def error_of(argv):
    with pytest.raises(SystemExit) as stop:
        cue_use.main(cue_use.tyro.cli(cue_use.Args, args=argv))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--episodes", "0"], "--episodes must be in [1, 100000]"),
        (["--episodes", str(10**12)], "--episodes must be in [1, 100000]"),
        (["--seed", "-1"], "--seed must be >= 0 and < 2**32"),
        (["--runs", "{missing}"], "is not a directory"),
        (["--out", "{file}"], "is not a folder"),
        (["--out", "{file}/sub"], "lies inside"),
        (["--out", "/proc/cue"], "cannot write into /proc"),
    ],
)
def test_bad_arguments_before_any_play(argv, phrase, memory_run, tmp_path, no_play):
    (tmp_path / "file").write_text("mine")
    argv = [a.replace("{missing}", str(tmp_path / "missing")).replace("{file}", str(tmp_path / "file")) for a in argv]
    assert phrase in error_of(["--runs", str(memory_run.parent), "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "mine"


def test_a_bad_out_or_run_is_refused_before_any_run_is_played(memory_run, tmp_path, no_play):
    """--out with a link or a folder at one of its names, or a run of another env among the runs: one line before any
    agent plays (they were found after every run before had played its episodes), the good earlier table and the
    link's target untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "cue_use.md").write_text("the earlier table")
    (out / "cue_use.json").mkdir()  # the second file of the set: the first was replaced before it failed
    runs = [str(memory_run.parent), "--out", str(out)]
    assert "cue_use.json is not a plain file" in error_of(["--runs", *runs])
    (out / "cue_use.json").rmdir()
    (tmp_path / "target").write_text("someone's file")
    (out / "cue_use.json").symlink_to(tmp_path / "target")
    assert "cue_use.json is a link, which an output never replaces" in error_of(["--runs", *runs])
    assert (tmp_path / "target").read_text() == "someone's file" and (
        out / "cue_use.md"
    ).read_text() == "the earlier table"
    (out / "cue_use.json").unlink()
    # a good run first, then one of DoorKey: refused before the first is played
    mixed = tmp_path / "runs"
    shutil.copytree(memory_run, mixed / "a-memory")
    ckpt = torch.load(memory_run / "checkpoint.pt", weights_only=True)
    ckpt["args"]["env_id"] = "MiniGrid-DoorKey-5x5-v0"
    (mixed / "b-doorkey").mkdir()
    torch.save(ckpt, mixed / "b-doorkey" / "checkpoint.pt")
    message = error_of(["--runs", str(mixed), "--out", str(out)])
    assert "b-doorkey/checkpoint.pt was trained on MiniGrid-DoorKey-5x5-v0" in message
    assert (
        sorted(p.name for p in out.iterdir()) == ["cue_use.md"]
        and (out / "cue_use.md").read_text() == "the earlier table"
    )


def test_passive_memory_shows_the_cue_only_in_the_first_observation():
    """HELM-PassiveMemoryS7-v0: every episode starts next to the cue (in view), facing east, as MiniGrid-MemoryS7
    otherwise; walking to the end of the corridor, the cue is out of view from the first step on, and stepping
    next to the matching object pays as in MiniGrid-Memory."""
    env = helm_ppo.make_env("HELM-PassiveMemoryS7-v0", 0, False, "test")()
    cues = set()
    for seed in range(12):
        env.reset(seed=seed)
        u = env.unwrapped
        assert tuple(u.agent_pos) == (1, 3) and u.agent_dir == 0 and u.agent_sees(1, 2)
        cues.add(u.grid.get(1, 2).type)
        for _ in range(4):  # east to the junction
            env.step(2)
            assert not u.agent_sees(1, 2)
        up = u.success_pos[1] < 3
        env.step(0 if up else 1)  # turn towards the matching object
        _, reward, terminated, _, _ = env.step(2)
        assert terminated and reward == pytest.approx(1 - 0.9 * 6 / u.max_steps)
    assert cues == {"key", "ball"}
