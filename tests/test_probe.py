"""benchmark/probe.py: the memory probe finds a planted cue, reports chance without a memory, and reads the
same memory as the training loop."""

import contextlib
import copy
import dataclasses
import errno
import io
import json
import runpy
import signal
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro

import helm_ppo
import helmv2_ppo
import shelm_ppo
from conftest import ROOT, tiny_args

sys.path.insert(0, str(ROOT / "benchmark"))
import probe  # noqa: E402

MODULES = {"shelm_ppo.py": shelm_ppo, "helm_ppo.py": helm_ppo, "helmv2_ppo.py": helmv2_ppo}
CPU = torch.device("cpu")


def synthetic_lanes(episodes=60, length=40, cue_step=3, lanes=4, seed=0):
    """Lanes of back-to-back episodes of equal length whose cue is in view at cue_step only."""
    rng = np.random.default_rng(seed)
    per_lane = episodes // lanes
    steps = per_lane * length
    episode = np.zeros((steps, lanes), int)
    since = np.zeros((steps, lanes), int)
    starts = np.zeros((steps, lanes), bool)
    for lane in range(lanes):
        for k in range(per_lane):
            rows = slice(k * length, (k + 1) * length)
            episode[rows, lane] = lane * per_lane + k
            t = np.arange(length)
            since[rows, lane] = np.where(t >= cue_step, t - cue_step, -1)
            starts[k * length, lane] = True
    return probe.Lanes(
        obs=np.zeros((steps, lanes, 1, 1, 3), np.uint8),
        starts=starts,
        episode=episode,
        since_cue=since,
        labels=rng.integers(0, 2, episodes),
        lengths=np.full(episodes, length),
        cue_seen=np.ones(episodes, bool),
        classes=("key", "ball"),
    )


def test_probe_finds_a_cue_planted_in_the_readout():
    """Features of noise, with the label planted in one of 16 dimensions up to 20 steps after the cue: the
    probe decodes it there, and is at chance beyond, where nothing was planted."""
    lanes = synthetic_lanes()
    rng = np.random.default_rng(1)
    features = rng.normal(size=(*lanes.starts.shape, 16)).astype(np.float32)
    label = lanes.labels[lanes.episode]
    planted = (lanes.since_cue >= 0) & (lanes.since_cue <= 20)
    features[..., 5] += np.where(planted, 3.0 * (2 * label - 1), 0.0)
    args = probe.Args(delays=(0, 20, 30), bootstrap=500, c_grid=(0.01, 1.0, 100.0), jobs=1)
    results = probe.decode(features, lanes, args)
    for d in (0, 20):
        assert results[d]["accuracy"] >= 0.9, (d, results[d])
        low, high = results[d]["interval"]
        assert low <= results[d]["accuracy"] <= high and high > results[d]["chance"]
    for d in (30,):
        assert results[d]["accuracy"] <= 0.75, (d, results[d])
        assert results[d]["interval"][0] <= max(results[d]["chance"], 0.5) <= results[d]["interval"][1]
    assert all(results[d]["episodes"] == 60 for d in args.delays)


def test_standardized_features_reveal_a_cue_of_small_scale():
    """A cue carried by a feature of tiny scale among features of scale 1: under the L2 penalty of C = 1 the raw
    features hide it (its weight would have to be huge), standardized ones do not (--no-standardize)."""
    lanes = synthetic_lanes(episodes=40, seed=5)
    rng = np.random.default_rng(2)
    features = rng.normal(size=(*lanes.starts.shape, 8))
    features[..., 0] = 1e-3 * (2 * lanes.labels[lanes.episode] - 1) + 1e-4 * rng.normal(size=lanes.starts.shape)
    args = probe.Args(delays=(5,), bootstrap=100, c_grid=(1.0,), jobs=1)
    assert probe.decode(features, lanes, args)[5]["accuracy"] >= 0.9
    raw = probe.decode(features, lanes, dataclasses.replace(args, standardize=False))[5]
    assert raw["accuracy"] <= 0.75 and raw["C"] == [1.0] * 5


def test_constant_features_give_exactly_chance():
    lanes = synthetic_lanes(episodes=40, seed=3)
    zeros = np.zeros((*lanes.starts.shape, 8), np.float32)
    for entry in probe.decode(zeros, lanes, probe.Args(delays=(0, 5), bootstrap=100, jobs=1)).values():
        assert entry["accuracy"] == entry["chance"] and entry["interval"] == entry["chance_interval"]


def test_scripted_policy_sees_the_cue_then_looks_away():
    """MiniGrid-Memory: every episode sees the cue, then waits out of its sight for at least --wait steps,
    and ends at one of the two objects (terminated, not truncated at max_steps). The twin episodes (the
    other cue, the same actions) show the same frames except where the cue is in view: "in view" is what
    the observation shows."""
    args = probe.Args(env_id="MiniGrid-MemoryS7-v0", episodes=8, num_envs=2, wait=(12, 14))
    lanes = probe.collect(shelm_ppo, probe.cue_task(args.env_id), args)
    assert len(lanes.labels) >= 8 and lanes.cue_seen.all()
    max_steps = 5 * 7**2
    assert (lanes.lengths < max_steps).all()
    for e in range(len(lanes.labels)):
        since = lanes.since_cue[lanes.episode == e]
        assert since.max() >= 12
        first_seen = np.argmax(since == 0)
        assert (since[first_seen:] >= 0).all()
    differ = np.any(lanes.obs != lanes.twin_obs, axis=(2, 3, 4))
    assert np.array_equal(differ, lanes.since_cue == 0)
    # frames of a lane follow each other; each episode's first frame is marked
    assert lanes.starts[0].all()
    for lane in range(lanes.starts.shape[1]):
        ids = lanes.episode[:, lane]
        changes = np.nonzero(np.diff(ids))[0] + 1
        assert all(lanes.starts[t, lane] for t in changes)


@pytest.mark.parametrize("env_id", ["bsuite/memory_len/4", "bsuite/memory_size/2"])
def test_bsuite_twins_differ_in_the_context_alone(env_id):
    """bsuite's twin episodes: bsuite's own draws but the other first context bit. The frames differ exactly while
    the context shows, the first two of each episode (collect checks that the twins stay in step)."""
    args = probe.Args(env_id=env_id, episodes=12, num_envs=3)
    lanes = probe.collect(shelm_ppo, probe.cue_task(env_id), args)
    differ = np.any(lanes.obs != lanes.twin_obs, axis=(2, 3, 4))
    assert np.array_equal(differ, lanes.since_cue == 0) and differ.sum() == 2 * np.sum(lanes.starts & differ)


def test_memory_pathway_carries_a_planted_token_within_its_reach():
    """The probe's read-out loop through a script's Transformer-XL: a word planted at step 0, the same filler
    words after it. The read-outs differ between two planted words exactly while the word is within reach,
    n_layer x (mem_len - 1) steps: each layer's memory holds the last mem_len outputs of the layer below, of
    which it attends to mem_len - 1 besides the step itself (the wt103 model's same_length: every query
    sees mem_len keys). An episode start forgets the word at once.

    The attention is made uniform (scale 0: every visible key weighs 1 / its count), so that the word weighs
    at least (1 / mem_len)^n_layer at every step within reach: the tiny random model's own scores give some
    distances a weight too small to change a float32 read-out, which only a bitwise comparison could see.
    Lanes of one batch are compared with a tolerance: the kernels may round each lane differently (AVX2
    rounds them apart in the last bits, AVX-512 does not)."""
    for n_layer, mem_len in [(1, 4), (1, 16), (2, 16)]:
        argv = ["--trxl-model", "tiny-random", "--n-layer", str(n_layer), "--mem-len", str(mem_len)]
        args = tyro.cli(helm_ppo.Args, args=[*argv, "--frozen-dtype", "float32", "--env-id", "MiniGrid-MemoryS7-v0"])
        trxl, _, _ = helm_ppo.build_memory(args, CPU, verbose=False)
        for layer in trxl.layers:
            layer.dec_attn.scale = 0.0
        steps = n_layer * mem_len + 8
        ids = np.tile(np.random.default_rng(0).integers(10, 256, steps)[:, None], (1, 3))
        ids[0] = [3, 4, 3]  # the planted word: lanes 0 and 2 alike, lane 1 another
        starts = np.zeros((steps, 3), bool)
        starts[0] = True
        starts[5, 2] = True  # lane 2 begins a new episode at step 5

        def encoder(obs, trxl=trxl):
            tokens = torch.as_tensor(obs[:, 0, 0, 0], dtype=torch.long)  # one "pixel" per lane: a word id
            return trxl.word_emb(tokens[None]), tokens[:, None]

        obs = np.ascontiguousarray(np.broadcast_to(ids[:, :, None, None, None], (steps, 3, 1, 1, 3)), np.uint8)
        (readouts,), _, _ = probe.memory_readouts(helm_ppo, trxl, encoder, obs, starts, [("mask", False)], CPU)
        # The read-outs are layer-normed (about unit scale). Lanes fed the same inputs differ by rounding only,
        # a few float32 ulps (<= 2e-7 of the largest read-out under ATEN_CPU_CAPABILITY=avx2); within reach the
        # planted word changes a read-out by >= 2.8e-4 of it. The tolerance, 1e-5 of the largest, sits between.
        tolerance = 1e-5 * np.abs(readouts).max()

        def differ(a, b, tolerance=tolerance):
            return np.abs(a - b).max(axis=-1) > tolerance

        reach = n_layer * (mem_len - 1)
        planted = differ(readouts[:, 0], readouts[:, 1])
        assert planted[: reach + 1].all() and not planted[reach + 1 :].any(), (n_layer, mem_len, planted)
        # lane 2 is lane 0 until its reset, and forgets the word there: lane 1, with the other word, then
        # reads the same as lane 2 once the words before the reset are out of reach for both
        reset = differ(readouts[:, 0], readouts[:, 2])
        assert not reset[:5].any() and reset[5], (n_layer, mem_len, reset)
        after = differ(readouts[:, 1], readouts[:, 2])
        assert after[4 + reach] and not after[5 + reach :].any(), (n_layer, mem_len, after)


# the tiny probe of the end-to-end test; the bad-input cases change one argument of it, so that a case the probe
# failed to refuse would run quickly instead of hanging
TINY = ["--scripts", "helm_ppo.py", "--trxl-model", "tiny-random", "--episodes", "24", "--num-envs", "4", "--no-cuda"]
TINY += [
    "--wait",
    "6",
    "8",
    "--delays",
    "0",
    "6",
    "--folds",
    "3",
    "--bootstrap",
    "200",
    "--c-grid",
    "1.0",
    "--jobs",
    "1",
]
TINY += ["--variants", "n1:--n-layer 1 --mem-len 8", "ablated:--n-layer 1 --mem-len 8 --ablate-memory"]


@pytest.fixture
def no_work(monkeypatch):
    """The probe's work (collecting episodes, building a pipeline), failing the test if it starts."""

    def started(*args, **kwargs):
        raise AssertionError("the probe started its work")

    monkeypatch.setattr(probe, "collect", started)
    monkeypatch.setattr(probe, "memory_readouts", started)


def error_of(argv):
    """The one line the probe stops with for these arguments (after TINY's), checked to be one `error:` line."""
    with pytest.raises(SystemExit) as stop:
        probe.main(tyro.cli(probe.Args, args=[*TINY, *argv]))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


BAD_INPUTS = [
    (["--scripts", "nope.py"], "--scripts: 'nope.py' is not one of"),
    (["--scripts", "helm_ppo.py", "helm_ppo.py"], "--scripts: give one or more of"),
    (["--env-id", "MiniGrid-DoorKey-5x5-v0"], "MiniGrid-DoorKey-5x5-v0: the probe knows the cue of"),
    (["--env-id", "MiniGrid-MemoryS99-v0"], "unknown or unusable environment 'MiniGrid-MemoryS99-v0'"),
    (["--variants", "no-colon"], "each variant is NAME:FLAGS"),
    (["--variants", "a:--n-layer 1", "a:--n-layer 2"], "the names must differ"),
    (["--variants", "bad:--no-such-flag 3"], "helm_ppo.py variant bad: "),
    (["--variants", "bad:--n-layer 0"], "helm_ppo.py variant bad: --n-layer must be >= 1, got 0"),
    # a variant's own --env-id or --num-envs was accepted and ignored: the episodes are collected once, for all
    (["--variants", "v:--env-id MiniGrid-MemoryS11-v0"], "--variants v: --env-id is not for a script here"),
    (["--variants", "v:--num_envs=4"], "--variants v: --num_envs=4 is not for a script here"),
    (["--script-args=--no-cuda"], "--script-args: --no-cuda is not for a script here"),
    (["--episodes", "3"], "--episodes must be at least 2 x --folds"),
    (["--delays", "-1"], "--delays must be distinct steps in [0, "),
    (["--delays", "0", "0"], "--delays must be distinct steps"),
    (["--delays", str(2**70)], "--delays must be distinct steps"),
    (["--num-envs", "0"], "--num-envs must be >= 1 and at most --episodes (24)"),
    (["--num-envs", "25"], "--num-envs must be >= 1 and at most --episodes (24)"),
    (["--inner-folds", "25"], "--inner-folds must be at most --episodes"),
    (["--seed", "-1"], "--seed must be >= 0 and < 2**32"),
    (["--jobs", "5000"], "--threads and --jobs must be in [0, 1024]"),
    (["--threads", "-1"], "--threads and --jobs must be in [0, 1024]"),
    (["--bootstrap", "0"], "--bootstrap must be >= 1"),
    (["--c-grid", "nan"], "--c-grid must be 1 to 100 positive finite numbers"),
    (["--wait", "6", str(2**63)], "--wait must be two steps 0 <= min <= max <= 100000"),
    # MiniGrid-MemoryS7's episodes end after 245 steps: a longer wait never reaches the choice
    (["--wait", "6", "300"], "the episodes of MiniGrid-MemoryS7-v0 end after 245 steps"),
    (["--policy", "scripted", "--env-id", "MortarMayhem-v0"], "MortarMayhem"),
    # what the probe would hold, against this machine's memory (arguments.check_fits)
    (["--episodes", str(10**9)], "the episodes' frames alone take at least"),
    (["--bootstrap", str(10**12)], "--bootstrap 1000000000000, --episodes 24: the bootstrap alone take"),
    (["--variants", "big:--mem-len 1000000000"], "helm_ppo.py variant big: --mem-len 1000000000"),
]


@pytest.mark.parametrize("argv, phrase", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_before_any_work(argv, phrase, tmp_path, no_work):
    assert phrase in error_of([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_a_bad_out_is_refused_before_any_work(tmp_path, no_work):
    """--out a file, inside a file, a link to a folder, in /proc, or with a link or a folder at one of the report's
    names: refused before the episodes are collected (it was refused after the whole probe had run), and the link's
    target untouched."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    planted = tmp_path / "planted"
    planted.mkdir()
    (tmp_path / "target.png").write_bytes(b"someone's image")
    (planted / "probe.png").symlink_to(tmp_path / "target.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "probe.json").mkdir()
    cases = {
        "file": "is not a folder",
        "file/out": "lies inside",
        "link": "is a link; outputs never go through a link",
        "planted": "probe.png is a link, which an output never replaces",
        "folder": "probe.json is not a plain file",
    }
    for out, phrase in cases.items():
        assert phrase in error_of(["--out", str(tmp_path / out)]), out
    assert "cannot write into /proc" in error_of(["--out", "/proc/probe"])
    assert (tmp_path / "target.png").read_bytes() == b"someone's image" and not list((tmp_path / "elsewhere").iterdir())
    assert (tmp_path / "file").read_text() == "mine"


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """The whole probe on the tiny models (TINY), once: its report and its folder."""
    out = tmp_path_factory.mktemp("probe") / "out"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        report = probe.main(tyro.cli(probe.Args, args=[*TINY, "--out", str(out)]))
    return report, out, output.getvalue()


def test_ablated_memory_reports_chance_end_to_end(probe_run):
    """The whole probe on the tiny models: --ablate-memory sits exactly at chance (the majority class of the
    training episodes) at every delay; the controls run; the figure, the table and the JSON are written, with a
    line for each phase of the work."""
    report, out, printed = probe_run
    rows = {(r["variant"], r["kind"]): r["delays"] for r in report["results"]}
    for entry in rows["ablated", "memory"].values():
        assert entry["episodes"] >= 24 and entry["accuracy"] == entry["chance"]
        assert entry["influence"]["identical"] == 1  # zeros, whatever the cue
    # the twins (the other cue) differ in the observation only while the cue is in view, and in the memory after
    assert rows["control", "observation"]["6"]["influence"]["identical"] == 1
    assert rows["n1", "memory"]["0"]["influence"]["median"] > 0
    assert rows["control", "observation"]["0"]["episodes"] >= 24  # the controls ran (too few episodes to learn)
    assert {p.name for p in out.iterdir()} == {"probe.png", "probe.md", "probe.json"}
    table = (out / "probe.md").read_text()
    assert "| helm_ppo.py | ablated | memory read-out |" in table and "| chance | majority class |" in table
    assert json.loads((out / "probe.json").read_text())["results"] == json.loads(json.dumps(report["results"]))
    assert "collecting 24 episodes of MiniGrid-MemoryS7-v0 in 4 envs and their twins" in printed
    assert "helm_ppo.py n1+ablated: the frozen pipeline over" in printed


def shelm_probe(env_id, out, extra=()):
    """The probe of SHELM alone on the tiny models (one layer, and its ablated twin): its report (files in out)."""
    argv = [*TINY[: TINY.index("--variants")], "--scripts", "shelm_ppo.py", "--clip-model", "tiny-random"]
    argv += ["--env-id", env_id, "--variants", "n1:--n-layer 1 --mem-len 8", "ablated:--ablate-memory"]
    argv += ["--episodes", "12", "--out", str(out), f"--script-args=--embeddings-dir {out.parent / 'data'}", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        return probe.main(tyro.cli(probe.Args, args=argv))


def test_shelm_tiny_memory_carries_the_context(tmp_path):
    """SHELM's tiny random models let its memory be seen (frozen_models.spread_tiny_vit): different frames retrieve
    different words, and the context shown at the start of a bsuite memory_len episode is decoded from the memory
    read-out steps later, when no frame shows it; on MiniGrid-Memory the twin episodes (the other cue) leave a
    different memory after the cue has gone. A tiny ViT that maps every frame to one word (as before) fails all of
    this: one word, twins identical, chance. The ablated twin stays at chance."""
    report = shelm_probe("bsuite/memory_len/4", tmp_path / "bsuite", ["--delays", "0", "2", "4"])
    rows = {r["variant"]: r["delays"] for r in report["results"] if r["kind"] == "memory"}
    for delay in ("2", "4"):  # the context is in the first two frames; at delay 2 and later no frame shows it
        assert rows["n1"][delay]["accuracy"] >= 0.9, rows["n1"][delay]
        assert rows["ablated"][delay]["accuracy"] == rows["ablated"][delay]["chance"]
    assert report["tokens"]["shelm_ppo.py"]["distinct_tokens_overall"] >= 3
    # the twins (the other context bit) leave a different memory in every episode, the ablation none
    assert rows["n1"]["4"]["influence"]["identical"] == 0 and rows["ablated"]["4"]["influence"]["identical"] == 1

    report = shelm_probe("MiniGrid-MemoryS7-v0", tmp_path / "minigrid")
    rows = {r["variant"]: r["delays"] for r in report["results"] if r["kind"] == "memory"}
    assert rows["n1"]["6"]["influence"]["identical"] <= 0.8  # a third of them here; with one word for all, every one
    assert rows["ablated"]["6"]["influence"]["identical"] == 1
    assert report["tokens"]["shelm_ppo.py"]["distinct_tokens_overall"] >= 5


def earlier_results(folder):
    """A good earlier report in `folder` (distinct bytes, so that a replacement shows); {name: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    earlier = {name: f"earlier {name}".encode() for name in probe.OUTPUTS}
    for name, data in earlier.items():
        (folder / name).write_bytes(data)
    return earlier


def assert_unchanged(folder, earlier):
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier  # byte-identical, no temporary file left


def malformed(report, change):
    """probe.json's text with one part of the report changed (a mutation of a deep copy)."""
    report = copy.deepcopy(json.loads(json.dumps(report)))
    change(report)
    return json.dumps(report)


def set_path(path, value):
    def change(report):
        *parents, last = path
        node = report
        for key in parents:
            node = node[key]
        node[last] = value

    return change


MALFORMED = {
    "not JSON": lambda report: '{"args": ',
    "a list": lambda report: "[1, 2]",
    "no results": lambda report: malformed(report, set_path(["results"], [])),
    "a delay missing": lambda report: malformed(report, lambda r: r["results"][0]["delays"].pop("6")),
    "a delay too many": lambda report: malformed(report, set_path(["results", 0, "delays", "7"], {"x": 1})),
    "accuracy a string": lambda report: malformed(report, set_path(["results", 0, "delays", "0", "accuracy"], "0.9")),
    "accuracy above 1": lambda report: malformed(report, set_path(["results", 0, "delays", "0", "accuracy"], 1.5)),
    "accuracy NaN": lambda report: malformed(report, set_path(["results", 0, "delays", "0", "chance"], 0.5)).replace(
        '"chance": 0.5', '"chance": NaN', 1
    ),
    "an interval of three": lambda report: malformed(
        report, set_path(["results", 0, "delays", "0", "interval"], [0.1, 0.2, 0.3])
    ),
    "an interval reversed": lambda report: malformed(
        report, set_path(["results", 0, "delays", "0", "interval"], [0.9, 0.1])
    ),
    "an accuracy without interval": lambda report: malformed(
        report, lambda r: r["results"][0]["delays"]["0"].pop("interval")
    ),
    "a script of its own": lambda report: malformed(report, set_path(["results", 0, "script"], "evil.py")),
    "10000 scripts": lambda report: malformed(
        report, lambda r: r["results"].extend(dict(r["results"][0], script=f"s{i}.py") for i in range(10_000))
    ),
    "a variant with a newline": lambda report: malformed(report, set_path(["results", 0, "variant"], "a\nb")),
    "delays missing": lambda report: malformed(report, lambda r: r["args"].pop("delays")),
    "a delay twice": lambda report: malformed(report, set_path(["args", "delays"], [0, 6, 6])),
    "token statistics cut": lambda report: malformed(
        report, lambda r: r["tokens"]["helm_ppo.py"]["distinct_inputs_per_episode"].pop("max")
    ),
    "no classes": lambda report: malformed(report, set_path(["episodes", "classes"], [])),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_replot_file_is_one_line_and_replaces_nothing(case, probe_run, tmp_path):
    """--replot reads a file from elsewhere: its structure (types, lengths, keys, bounds) is checked before anything
    is drawn; a malformed one (it ended in a traceback, or drew a figure from garbage) is one line, and the good
    report already in --out stays byte-identical."""
    report, _, _ = probe_run
    bad = tmp_path / "bad.json"
    bad.write_text(MALFORMED[case](report))
    earlier = earlier_results(tmp_path / "out")
    with pytest.raises(SystemExit) as stop:
        probe.main(tyro.cli(probe.Args, args=["--replot", str(bad), "--out", str(tmp_path / "out")]))
    message = str(stop.value.code)
    assert message.startswith(f"error: --replot {bad}") and "\n" not in message, message
    assert_unchanged(tmp_path / "out", earlier)


def test_replot_writes_the_set_again_and_takes_only_out(probe_run, tmp_path):
    report, out, _ = probe_run
    again = tmp_path / "again"
    earlier = earlier_results(again)
    # flags a replot would ignore are refused (they were accepted and ignored), before anything is read or written
    with pytest.raises(SystemExit, match="--episodes --delays would be ignored"):
        probe.main(tyro.cli(probe.Args, args=["--replot", str(out / "probe.json"), "--out", str(again), *TINY[4:6],
                                              "--delays", "1"]))  # fmt: skip
    assert_unchanged(again, earlier)
    probe.main(tyro.cli(probe.Args, args=["--replot", str(out / "probe.json"), "--out", str(again)]))
    # the three files of the set, from the same report: the JSON as it was, the table and the figure made again
    assert (again / "probe.json").read_bytes() == (out / "probe.json").read_bytes()
    assert (again / "probe.md").read_text() == (out / "probe.md").read_text()
    assert (again / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in again.iterdir()) == sorted(probe.OUTPUTS)


def test_the_report_set_is_replaced_together(probe_run, tmp_path):
    """A failure while the set is written (the disk full at the figure, the last file) replaces none of the earlier
    report's files and leaves no temporary file; a link at a name is replaced, its target untouched (helm_utils
    .files.replace_together, which the probe, cue_use.py and throughput.py write with)."""
    from helm_utils.files import replace_together

    report, out, _ = probe_run
    folder = tmp_path / "out"
    earlier = earlier_results(folder)
    png = probe.figure(report)

    def full_disk(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    writes = {folder / "probe.json": lambda f: f.write(b"{}"), folder / "probe.md": lambda f: f.write(b"table")}
    with pytest.raises(SystemExit) as stop:
        replace_together(writes | {folder / "probe.png": full_disk})
    message = f"error: could not write {folder}/probe.png: No space left on device; nothing was overwritten"
    assert str(stop.value.code) == message
    assert_unchanged(folder, earlier)
    (tmp_path / "target").write_bytes(b"target")
    (folder / "probe.md").unlink()
    (folder / "probe.md").symlink_to(tmp_path / "target")
    probe.write_report(report, folder, b"{}")
    assert (tmp_path / "target").read_bytes() == b"target" and not (folder / "probe.md").is_symlink()
    assert (folder / "probe.png").read_bytes() == png and (folder / "probe.json").read_bytes() == b"{}"


# ---------------------------------------------------------------------------------------------
# The read-outs the probe computes are those the training loop gives the agent
# ---------------------------------------------------------------------------------------------


def train_one_update(script, argv, cwd, monkeypatch):
    """Run `python script argv` in this process for one update; returns what the rollout handed the agent,
    (trxl_out, obs) of each step, and the vector env's done flags of each step."""
    handed, dones = [], []

    def hook(cls, **kwargs):  # the script's classes are made anew by runpy: wrap its Agent as it is defined
        super(torch.nn.Module, cls).__init_subclass__(**kwargs)
        if cls.__name__ == "Agent":
            original = cls.get_action_and_value

            def get_action_and_value(self, trxl_out, obs, action=None):
                if action is None:  # the rollout; the update passes the buffer's actions
                    handed.append((trxl_out.clone(), obs.clone()))
                return original(self, trxl_out, obs, action)

            cls.get_action_and_value = get_action_and_value

    step = gym.vector.SyncVectorEnv.step

    def recording_step(self, actions):
        result = step(self, actions)
        dones.append(np.logical_or(result[2], result[3]))
        return result

    monkeypatch.setattr(torch.nn.Module, "__init_subclass__", classmethod(hook))
    monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", recording_step)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with torch.random.fork_rng(devices=[]):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:  # the script installs its own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return handed, dones


@pytest.mark.parametrize(
    "script,memory_reset",
    [("shelm_ppo.py", "mask"), ("helm_ppo.py", "zero"), ("helmv2_ppo.py", "mask")],
)
def test_readouts_equal_the_training_loops(script, memory_reset, tmp_path, monkeypatch):
    """One update of the script's own training loop on MiniGrid-MemoryS7-v0 (episodes cut at 12 steps, so that
    the rollout crosses episode ends): the probe, given the same frames and episode starts, computes the
    same read-outs, bit for bit, with the memory reset where the training loop resets it."""
    module = MODULES[script]
    steps, n_envs = 32, 2
    argv = ["--env-id", "MiniGrid-MemoryS7-v0", "--num-envs", n_envs, "--num-steps", steps]
    argv += ["--total-timesteps", steps * n_envs, "--num-minibatches", "2", "--update-epochs", "1"]
    argv += ["--n-layer", "2", "--mem-len", "8", "--memory-reset", memory_reset, "--frozen-dtype", "float32"]
    argv += ["--no-progress-bar", "--no-cuda", *tiny_args(script, tmp_path)]
    argv = [str(a) for a in argv]
    monkeypatch.setitem(gym.registry["MiniGrid-MemoryS7-v0"].kwargs, "max_steps", 12)
    handed, dones = train_one_update(script, argv, tmp_path, monkeypatch)
    assert len(handed) == steps
    trained = torch.stack([out for out, _ in handed]).numpy()
    obs = torch.stack([o for _, o in handed]).numpy()
    starts = np.ones((steps, n_envs), bool)
    starts[1:] = np.stack(dones[: steps - 1])  # a step's done: the next frame is a new episode's first
    assert starts[1:].sum(0).min() >= 2  # every env crossed episode ends

    args = tyro.cli(module.Args, args=argv)
    trxl, _, encoder = module.build_memory(args, CPU, verbose=False)
    settings = [(args.memory_reset, args.ablate_memory)]
    (readouts,), _, _ = probe.memory_readouts(module, trxl, encoder, obs, starts, settings, CPU)
    assert readouts.dtype == trained.dtype and np.array_equal(readouts, trained)
    # not trivially: the read-outs change along the rollout, and without the resets they would differ
    assert not np.array_equal(readouts[1:], readouts[:-1])
    _, _, encoder = module.build_memory(args, CPU, verbose=False)
    no_resets = np.zeros_like(starts)
    no_resets[0] = True
    (unreset,), _, _ = probe.memory_readouts(module, trxl, encoder, obs, no_resets, settings, CPU)
    assert not np.array_equal(unreset, trained)
