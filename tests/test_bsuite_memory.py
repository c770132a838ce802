"""bsuite's memory experiments as pixels (helm_utils/bsuite_memory.py): the setting ids, the frames, and the
semantics measured against bsuite's own MemoryChain, stepped beside ours."""

import importlib
import json

import numpy as np
import pytest
from bsuite.environments.memory_chain import MemoryChain
from bsuite.experiments.memory_len import sweep as memory_len_sweep
from bsuite.experiments.memory_size import sweep as memory_size_sweep

import shelm_ppo
from conftest import ROOT, error_line, run_script
from helm_utils import InputError, arguments, bsuite_memory, env_suites

# short and long settings of both experiments; memory_size/16 is bsuite's largest, 40 bits
SETTINGS = ["memory_len/0", "memory_len/2", "memory_len/9", "memory_len/16", "memory_size/2", "memory_size/16"]


def test_setting_ids_are_bsuites_sweep_indices():
    # bsuite numbers its sweep: the index is not the length (memory_len/9 is length 10, memory_size/2 three bits)
    assert bsuite_memory.settings("memory_len/9") == {"memory_length": memory_len_sweep.SETTINGS[9]["memory_length"]}
    assert bsuite_memory.memory_length_and_bits("memory_len/2") == (3, 1)
    assert bsuite_memory.memory_length_and_bits("memory_len/12") == (17, 1)
    assert bsuite_memory.memory_length_and_bits("memory_size/2") == (2, 3)  # asked at bsuite's length 2
    assert bsuite_memory.memory_length_and_bits("memory_size/16") == (2, memory_size_sweep.SETTINGS[16]["num_bits"])
    assert bsuite_memory.describe("bsuite/memory_len/9") == "length10"
    assert bsuite_memory.describe("bsuite/memory_size/2") == "3bits"
    assert env_suites.run_label("bsuite/memory_len/9") == "bsuite-memory_len-9-length10"
    assert env_suites.run_label("MiniGrid-MemoryS7-v0") == "MiniGrid-MemoryS7-v0"


class Args:
    env_id, exp_name, seed = "bsuite/memory_size/3", "shelm_ppo", 1


def test_a_run_is_named_by_what_its_setting_is():
    name = arguments.new_run_name(Args)
    assert name.startswith("bsuite-memory_size-3-4bits__shelm_ppo__1__") and "/" not in name


@pytest.mark.parametrize(
    "bsuite_id",
    [
        "memory_len/23",
        "memory_len/-1",
        "memory_len/01",
        "memory_len/x",
        "memory_len/",
        "memory_len",
        "catch/0",
        "memory_size/17",
        "memory_len/9/1",
        "",
    ],
)
def test_an_id_outside_bsuites_sweep_is_refused_in_one_line(bsuite_id):
    with pytest.raises(InputError) as refused:
        env_suites.make(f"bsuite/{bsuite_id}")
    message = str(refused.value)
    assert message.startswith("error: ") and "\n" not in message
    assert "bsuite/memory_len/<i>" in message and "0 to 22" in message and "0 to 16" in message


def test_a_script_refuses_a_bad_id_before_writing_anything(tmp_path):
    proc = run_script("helm_ppo.py", ["--env-id", "bsuite/memory_len/99", "--trxl-model", "tiny-random"], tmp_path)
    assert proc.returncode == 1
    assert error_line(proc).startswith("error: bsuite/memory_len/99 is not a setting of bsuite's memory sweeps")
    assert list(tmp_path.iterdir()) == []


def raw_bsuite(bsuite_id, seed):
    """bsuite's own env of a setting, seeded as shimmy seeds it (a RandomState of the reset's seed)."""
    length, bits = bsuite_memory.memory_length_and_bits(bsuite_id)
    env = MemoryChain(memory_length=length, num_bits=bits)
    env._rng = np.random.RandomState(seed)
    return env


@pytest.mark.parametrize("bsuite_id", SETTINGS)
def test_rewards_lengths_and_information_are_bsuites(bsuite_id):
    """Our env and bsuite's MemoryChain stepped side by side with the same actions: the same rewards, episode
    ends and (read back from the frames) the same observations, episode after episode."""
    length, bits = bsuite_memory.memory_length_and_bits(bsuite_id)
    ours = shelm_ppo.make_env(f"bsuite/{bsuite_id}", 0, False, "test")()  # as the scripts make it
    assert ours.observation_space.shape == (bsuite_memory.SIZE, bsuite_memory.SIZE, 3)
    assert ours.action_space.n == 2
    theirs = raw_bsuite(bsuite_id, seed=7)
    frame, _ = ours.reset(seed=7)
    timestep = theirs.reset()
    actions = np.random.default_rng(0).integers(0, 2, size=40 * (length + 1))
    episodes, decisions = [], 0
    for action in actions:
        expected = timestep.observation
        np.testing.assert_array_equal(bsuite_memory.read(frame, length, bits), expected)
        np.testing.assert_array_equal(bsuite_memory.draw(expected, length, bits), frame)
        frame, reward, terminated, truncated, _ = ours.step(int(action))
        timestep = theirs.step(int(action))
        decisions += 1
        assert reward == (timestep.reward or 0.0)
        assert (terminated, truncated) == (timestep.last(), False)
        if terminated:
            np.testing.assert_array_equal(bsuite_memory.read(frame, length, bits), timestep.observation)
            episodes.append((decisions, reward))
            decisions = 0
            frame, _ = ours.reset()
            timestep = theirs.reset()
    # measured, not taken from bsuite's docstring: L + 1 decisions per episode, only the last one rewarded
    assert len(episodes) >= 40 - 1 and all(n == length + 1 for n, _ in episodes)
    assert {r for _, r in episodes} == {-1.0, 1.0}


@pytest.mark.parametrize("bsuite_id", ["memory_len/0", "memory_len/2", "memory_size/2"])
def test_the_context_shows_in_the_first_two_observations_and_the_query_before_the_last_decision(bsuite_id):
    length, bits = bsuite_memory.memory_length_and_bits(bsuite_id)
    env = raw_bsuite(bsuite_id, seed=3)
    observations = [env.reset().observation]
    while not (timestep := env.step(0)).last():
        observations.append(timestep.observation)
    decisions = np.concatenate(observations)  # what the agent sees before each of its L + 1 decisions
    assert len(decisions) == length + 1
    assert [bool(row[2:].any()) for row in decisions] == [True, True] + [False] * (length - 1)
    # the query is shown (as an index; 0 is also what the other steps show) where the time left is 1/L
    assert np.isclose(decisions[-1, 0], 1 / length) and (decisions[:-1, 1] == 0).all()
    frames = [bsuite_memory.draw(row[None], length, bits) for row in decisions]
    lit = [(f == bsuite_memory.QUERY).all(-1).any() for f in frames]
    assert lit == [False] * length + [True] if length > 1 else lit == [True, True]


def test_the_frame_shows_each_value_in_its_place():
    # 3 bits: a 2 x 2 grid of tiles under the time bar; the context (+1, -1, +1), bit 2 queried, time left 1/2
    observation = np.array([[0.5, 2, 1, -1, 1]], dtype=np.float32)
    frame = bsuite_memory.draw(observation, 2, 3)
    rows, columns, height, width = bsuite_memory.layout(3)
    assert (rows, columns) == (2, 2) and height * rows <= bsuite_memory.SIZE - bsuite_memory.TIME_ROWS
    bar = frame[: bsuite_memory.TIME_ROWS]
    assert (bar[:, :16] == 128).all() and (bar[:, 16:] == 0).all()  # half the width, half grey
    top = bsuite_memory.TIME_ROWS

    def tile(bit, lower):
        r, c = divmod(bit, columns)
        y = top + r * height + (height // 2 if lower else 0)
        return frame[y : y + height // 2, c * width : (c + 1) * width]

    half = width // 2  # +1 lights the left lamp of a bit's upper half, -1 the right one
    assert (tile(0, False)[:, :half] == bsuite_memory.ONE).all() and not tile(0, False)[:, half:].any()
    assert (tile(1, False)[:, half:] == bsuite_memory.ZERO).all() and not tile(1, False)[:, :half].any()
    assert (tile(2, False)[:, :half] == bsuite_memory.ONE).all() and (tile(2, True) == bsuite_memory.QUERY).all()
    assert not tile(0, True).any() and not tile(1, True).any()
    assert not frame[top + rows * height :].any()  # nothing else is drawn
    # HELM's encoder sees the mean of the colour channels and compares directions: +1 and -1 differ in place, so the
    # two first frames are far apart even as grey images compared by cosine (0.55: the time bar they share; 0.87 when
    # both lit the same patch, white or red)
    plus, minus = (bsuite_memory.draw(np.array([[1, 0, v]], np.float32), 3, 1).mean(-1).ravel() for v in (1, -1))
    assert plus @ minus / np.linalg.norm(plus) / np.linalg.norm(minus) < 0.6
    np.testing.assert_array_equal(bsuite_memory.read(frame, 2, 3), observation)


def test_rgb_frames_for_videos():
    env = env_suites.make("bsuite/memory_len/2", render_mode="rgb_array")
    frame, _ = env.reset(seed=1)
    np.testing.assert_array_equal(env.render(), frame)
    with pytest.raises(InputError, match="rgb_array"):
        env_suites.make("bsuite/memory_len/2", render_mode="human")


def test_the_docs_name_the_picture_of_the_rendering():
    assert (ROOT / "docs" / "bsuite_memory_frames.png").is_file()
    assert "bsuite_memory_frames.png" in (ROOT / "docs" / "environments.md").read_text()


# ---------------------------------------------------------------------------------------------
# bsuite's record and score (benchmark/bsuite_memory.py)
# ---------------------------------------------------------------------------------------------


def import_tool(name="bsuite_memory"):
    import sys

    sys.path.insert(0, str(ROOT / "benchmark"))
    return importlib.import_module(name)


def test_a_runs_episodes_are_logged_as_bsuites_own_logger_logs_them(tmp_path):
    """bsuite's CSV logger wrapped round its own MemoryChain, played by an agent right in a known pattern of
    episodes, writes what bsuite_rows makes of the same returns: the same columns, rows and values."""
    import pandas as pd
    from bsuite.logging import csv_logging

    tool = import_tool()
    env = csv_logging.wrap_environment(MemoryChain(memory_length=3, num_bits=1, seed=5), "memory_len/2", str(tmp_path))
    right = np.random.default_rng(1).random(150) < 0.7
    returns = []
    for correct in right:
        timestep = env.reset()
        bit = int(timestep.observation[0, 2] > 0)  # the context, shown at the start
        while not timestep.last():
            timestep = env.step(bit if correct else 1 - bit)
        returns.append(timestep.reward)
    expected = pd.read_csv(tmp_path / "bsuite_id_-_memory_len-2.csv")
    ours = pd.DataFrame(tool.bsuite_rows(returns, 3))
    logged = ours[ours.episode.isin(expected.episode)]  # bsuite's logger has no row for the last episode
    assert list(ours.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(logged.reset_index(drop=True), expected, check_dtype=False)
    assert ours.episode.iloc[-1] == 150 and ours.total_perfect.iloc[-1] == right.sum()


def fake_bsuite_run(runs, env_id, exp_name, seed, correct_share, episodes=400, n_layer=None):
    """A run directory as the scripts write it: hyperparameters and raw episode returns (+1 or -1)."""
    from torch.utils.tensorboard import SummaryWriter

    args = {"env_id": env_id, "exp_name": exp_name, "seed": seed, "num_envs": 16}
    if n_layer:
        args |= {"n_layer": n_layer, "mem_len": 15, "beta": 1}  # beta: helm_ppo's own argument
    else:
        args |= {"lstm": True}
    writer = SummaryWriter(str(runs / f"{env_id.replace('/', '-')}__{exp_name}__{seed}__1"))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in args.items()))
    rng = np.random.default_rng(seed)
    for i in range(episodes):
        writer.add_scalar("charts/episodic_return", 1.0 if rng.random() < correct_share else -1.0, i + 1)
    writer.close()


def test_scores_and_success_with_intervals_from_the_runs(tmp_path, capsys, monkeypatch):
    """Crafted runs: HELM right in 95% of its episodes everywhere, its ablation at chance, an LSTM run on one
    setting only. bsuite's scores (its own code): 1 and 0; the success per setting with a t-interval over seeds."""
    import pandas as pd
    from bsuite.logging import csv_load

    tool = import_tool()
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        for env_id in ("bsuite/memory_len/2", "bsuite/memory_len/9", "bsuite/memory_size/2"):
            fake_bsuite_run(runs, env_id, "helm_ppo-memory-0000aaaa", seed, 0.95, n_layer=2)
            fake_bsuite_run(runs, env_id, "helm_ppo-ablated-1111bbbb", seed, 0.5, n_layer=2)
        fake_bsuite_run(runs, "bsuite/memory_len/2", "lstm_ppo-default-2222cccc", seed, 0.8)
    # a fourth seed at one setting alone: its success counts there, but it is not scored over the settings
    fake_bsuite_run(runs, "bsuite/memory_len/2", "helm_ppo-memory-0000aaaa", 4, 0.5, n_layer=2)
    fake_bsuite_run(runs, "MiniGrid-Empty-5x5-v0", "helm_ppo-memory-3333dddd", 1, 0.5, n_layer=2)  # not bsuite's
    out = tmp_path / "results"
    figures, plot_success = [], tool.plot_success
    monkeypatch.setattr(tool, "plot_success", lambda *a: figures.append(plot_success(*a)) or figures[-1])
    tool.main(tool.Args(runs=str(runs), out=str(out)))
    report = json.loads((out / "bsuite_memory.json").read_text())
    # each agent has one style in both panels, though LSTM-PPO has no memory_size setting: its own colour, which its
    # ablated twin keeps, dashed
    (figure,) = figures
    styles = {}
    for axis in figure.axes[:2]:
        for line in axis.get_lines():
            if not line.get_label().startswith("_"):
                style = (line.get_color(), line.get_linestyle(), line.get_marker())
                assert styles.setdefault(line.get_label(), style) == style, line.get_label()
    assert set(styles) == {"HELM", "HELM ablated", "LSTM-PPO"}
    assert styles["HELM"][0] == styles["HELM ablated"][0] != styles["LSTM-PPO"][0]
    assert styles["HELM"][1] == "-" and styles["HELM ablated"][1] == "--"
    scores = report["bsuite_scores"]
    assert scores["HELM"] == {"memory_len": [1.0, 1.0, 1.0], "memory_size": [1.0, 1.0, 1.0]}  # seed 4 not scored
    assert report["success"]["HELM"]["memory_len/2"]["n"] == 4
    assert scores["HELM ablated"] == {"memory_len": [0.0, 0.0, 0.0], "memory_size": [0.0, 0.0, 0.0]}
    cell = report["success"]["HELM"]["memory_len/9"]
    assert cell["x"] == 10 and cell["n"] == 3 and cell["low"] < cell["mean"] < cell["high"]
    # each seed's success: its last 10% of episodes (40 of 400), recomputed from the same draws
    for seed, value in cell["seeds"].items():
        draws = np.random.default_rng(int(seed)).random(400)[-40:] < 0.95
        assert value == pytest.approx(draws.mean())
    assert set(report["success"]) == {"HELM", "HELM ablated", "LSTM-PPO"}
    # the CSVs are bsuite's: its loader reads them, with the setting's own variables joined
    df, _ = csv_load.load_bsuite({"HELM": str(out / "csv" / "HELM" / "seed1")})
    assert set(df.bsuite_id) == {"memory_len/2", "memory_len/9", "memory_size/2"}
    assert set(df[df.bsuite_id == "memory_len/9"].memory_length) == {10}
    assert isinstance(df, pd.DataFrame) and df.episode.max() == 400
    table = (out / "bsuite_memory.md").read_text()
    assert "| HELM ablated |" in table and "L = 10 (memory_len/9)" in table and "bits = 3 (memory_size/2)" in table
    assert (out / "success.png").is_file()


def test_the_tool_refuses_what_it_cannot_score(tmp_path):
    tool = import_tool()
    (tmp_path / "runs").mkdir()
    fake_bsuite_run(tmp_path / "runs", "MiniGrid-Empty-5x5-v0", "helm_ppo-memory-3333dddd", 1, 0.5, n_layer=2)
    with pytest.raises(InputError, match="no runs on a bsuite memory setting"):
        tool.main(tool.Args(runs=str(tmp_path / "runs"), out=str(tmp_path / "out")))
    with pytest.raises(InputError, match="--final-fraction must be in"):
        tool.main(tool.Args(runs=str(tmp_path / "runs"), out=str(tmp_path / "out"), final_fraction=0))
    with pytest.raises(InputError, match="is not a directory"):
        tool.main(tool.Args(runs=str(tmp_path / "nothing"), out=str(tmp_path / "out")))


@pytest.mark.parametrize("plant", ["out-link", "png-link", "md-folder", "csv-file", "agent-link"])
def test_the_tools_outputs_are_checked_before_the_work(plant, tmp_path, monkeypatch):
    """What stands at the output names is refused in one line before any run is read: a link is never written
    through, a folder or file at a name the tool writes is never replaced."""
    tool = import_tool()
    runs = tmp_path / "runs"
    fake_bsuite_run(runs, "bsuite/memory_len/2", "helm_ppo-memory-0000aaaa", 1, 0.9, n_layer=2, episodes=40)
    out, target = tmp_path / "out", tmp_path / "elsewhere"
    target.mkdir()
    out.mkdir()
    if plant == "out-link":
        out.rmdir()
        out.symlink_to(target)
    elif plant == "png-link":
        (out / "success.png").symlink_to(target / "mine.png")
    elif plant == "md-folder":
        (out / "bsuite_memory.md").mkdir()
    elif plant == "csv-file":
        (out / "csv").write_text("mine")
    else:
        (out / "csv").mkdir()
        (out / "csv" / "HELM").symlink_to(target, target_is_directory=True)
    monkeypatch.setattr(tool, "success", lambda *a: pytest.fail("the work started"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match="--out"):
        tool.main(tool.Args(runs=str(runs), out=str(out)))
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and not list(target.iterdir())


def test_the_tools_outputs_are_replaced_as_a_set(tmp_path, monkeypatch):
    """An earlier call's figure, tables and CSVs stay as they were when this call fails while writing (a full disk):
    nothing of the set is replaced and no temporary file is left."""
    import helm_utils.files

    tool = import_tool()
    runs = tmp_path / "runs"
    fake_bsuite_run(runs, "bsuite/memory_len/2", "helm_ppo-memory-0000aaaa", 1, 0.9, n_layer=2, episodes=40)
    out = tmp_path / "out"
    tool.main(tool.Args(runs=str(runs), out=str(out)))
    earlier = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p.name for p in earlier} >= {"success.png", "success.svg", "bsuite_memory.md", "bsuite_memory.json"}
    fake_bsuite_run(runs, "bsuite/memory_len/9", "helm_ppo-memory-0000aaaa", 1, 0.9, n_layer=2, episodes=40)
    real_new_file, calls = helm_utils.files.new_file, []

    def disk_full_at_the_fourth(path):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real_new_file(path)

    monkeypatch.setattr(helm_utils.files, "new_file", disk_full_at_the_fourth)
    with pytest.raises(InputError, match="No space left on device; nothing was overwritten"):
        tool.main(tool.Args(runs=str(runs), out=str(out)))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier


LEARNING_CHECK_REFUSALS = [
    (["--scripts", "nope.py"], "--scripts: choose among helm_ppo.py helmv2_ppo.py shelm_ppo.py, got nope.py"),
    (["--env-id", "MiniGrid-Empty-5x5-v0"], "the check runs on a bsuite memory setting"),
    (["--env-id", "bsuite/memory_len/99"], "memory_len/99"),
    (["--total-timesteps", "10"], "--total-timesteps must be in [512, 10**7], got 10"),
    (["--threshold", "0.5"], "--threshold must be in (0.5, 1]"),
    (["--workers", "0"], "--workers must be in [1, 64], got 0"),
    (["--seed", "-1"], "--seed must be >= 0 and < 2**32, got -1"),
    (["--workdir", "{file}"], "is not a directory"),
    (["--workdir", "{full}"], "is not empty: give a new folder"),
]


@pytest.mark.parametrize("argv, phrase", LEARNING_CHECK_REFUSALS, ids=[a[1] for a, _ in LEARNING_CHECK_REFUSALS])
def test_learning_check_refuses_before_any_run(argv, phrase, tmp_path, monkeypatch):
    """benchmark/learning_check.py: one error line for what it cannot check, before any run starts; an earlier
    check's folder is refused, not mixed with (its runs would be read as this check's)."""
    import tyro

    tool = import_tool("learning_check")
    monkeypatch.setattr(tool, "check", lambda *a: pytest.fail("a run started"))
    (tmp_path / "file").write_text("mine")
    (tmp_path / "full" / "runs").mkdir(parents=True)
    argv = [a.format(file=tmp_path / "file", full=tmp_path / "full") for a in argv]
    with pytest.raises(SystemExit) as stop:
        tool.main(tyro.cli(tool.Args, args=argv))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message and phrase in message, message
    assert (tmp_path / "file").read_text() == "mine" and [p.name for p in (tmp_path / "full").iterdir()] == ["runs"]
