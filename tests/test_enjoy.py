"""enjoy.py on the tiny trained SHELM run of conftest.py: the video, the trace, the attention maps,
the hub (download from a cache, upload through a fake client) and every bad input as one line."""

import json
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import enjoy
import shelm_ppo
from helm_utils import evaluation, frozen_models, hub

EPISODES = 2


class Recorder(enjoy.Output):
    """Keeps every step record and the episodes that ended."""

    def __init__(self):
        self.steps, self.ended = [], []

    def step(self, record):
        self.steps.append(record)

    def end_episode(self, episode):
        self.ended.append(episode)


@pytest.fixture(scope="module")
def enjoyed(shelm_run, tmp_path_factory):
    """One enjoy.py run of 2 episodes with every output, the tokens the encoder returned for env 0 at each
    step, and every step record."""
    out = tmp_path_factory.mktemp("enjoy")
    retrieved, recorder = [], Recorder()
    forward, play = shelm_ppo.TokenRetrieval.forward, enjoy.play

    def recording_forward(self, obs):
        trxl_in, tokens = forward(self, obs)
        retrieved.append(tokens[0].tolist())
        return trxl_in, tokens

    def play_and_record(loaded, episodes, outputs, *args, **kwargs):
        return play(loaded, episodes, [*outputs, recorder], *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shelm_ppo.TokenRetrieval, "forward", recording_forward)
        mp.setattr(enjoy, "play", play_and_record)
        mp.chdir(shelm_run.parent.parent)  # the embeddings file is where the run built it
        cli = enjoy.Args(
            checkpoint=str(shelm_run / "model_final.pt"),
            episodes=EPISODES,
            capture_video=True,
            attention=True,
            trace="jsonl",
            out_dir=str(out),
        )
        enjoy.main(cli)
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    return out, retrieved, recorder, trace


def test_one_video_per_episode_with_one_frame_per_step(enjoyed):
    out, _, recorder, trace = enjoyed
    assert recorder.ended == list(range(1, EPISODES + 1))
    for episode in range(1, EPISODES + 1):
        steps = [row for row in trace if row["episode"] == episode]
        assert [row["step"] for row in steps] == list(range(len(steps)))
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out / f"episode-{episode:03d}.mp4"))
        assert frames == len(steps)
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"episode-{e:03d}.mp4" for e in range(1, EPISODES + 1)]


def test_trace_words_are_the_retrieved_tokens(enjoyed, shelm_run):
    _, retrieved, _, trace = enjoyed
    vocab = frozen_models.tiny_vocab()
    # env 0's tokens at each step, as the encoder returned them, in order
    assert len(retrieved) == len(trace)
    assert [row["words"] for row in trace] == [[vocab[i] for i in ids] for ids in retrieved]
    # the window: the tokens of this episode's steps so far, the last mem_len + topk of them (memory
    # slots, then this step's tokens), since --memory-reset mask hides the previous episode
    mem_len, topk = 15, 2
    episode_tokens = []
    for row, ids in zip(trace, retrieved):
        if row["step"] == 0:
            episode_tokens = []
        episode_tokens += [vocab[i] for i in ids]
        assert row["window"] == episode_tokens[-(mem_len + topk) :]
    # MiniGrid's own rewards: 0 until the goal, positive there (the run's normalisation is not applied)
    for row, following in zip(trace, trace[1:] + [None]):
        last = following is None or following["step"] == 0
        assert row["reward"] == 0 or (last and 0 < row["reward"] <= 1)
    assert {row["action"] for row in trace} <= {"left", "right", "forward", "pickup", "drop", "toggle", "done"}


def test_attention_rows_sum_to_one_over_visible_slots(enjoyed):
    _, _, recorder, _ = enjoyed
    mem_len, topk = 15, 2
    for record in recorder.steps:
        n_head, n_keys = record.attention.shape
        assert (n_head, n_keys) == (4, mem_len + topk)
        # the step's last token sees the last mem_len positions up to itself (same_length), but none
        # from before its episode (--memory-reset mask): at step 0 only the step's own tokens
        visible = min(mem_len, (record.t + 1) * topk)
        att = torch.from_numpy(record.attention)
        assert att[:, : n_keys - visible].abs().max() == 0, (record.episode, record.t)
        torch.testing.assert_close(att[:, n_keys - visible :].sum(dim=1), torch.ones(n_head))
    assert sum(r.t == 0 for r in recorder.steps) == EPISODES  # a second episode was attended to from scratch


def test_attention_heatmap_per_episode(enjoyed):
    out, _, recorder, trace = enjoyed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"attention-episode-{e:03d}.png" for e in range(1, EPISODES + 1)]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what the first heatmap draws: each step's attention over the steps of the episode, rows summing to 1
    maps = enjoy.AttentionMaps(out / "heads", 1, per_head=True)
    first = [r for r in recorder.steps if r.episode == 1]
    for record in first:
        maps.step(record)
    matrix = maps.matrix()
    assert matrix.shape == (4, len(first), len(first) + 1)
    np.testing.assert_allclose(matrix.sum(axis=2), 1, atol=1e-5)
    assert np.all(np.triu(matrix[:, :, :-1], k=1) == 0)  # nothing from the future
    assert np.all(matrix[:, :, -1] == 0)  # nothing from before the episode
    for t in range(len(first)):  # nothing older than the window of mem_len tokens (2 per step)
        assert np.all(matrix[:, t, : max(0, t - 7)] == 0)
    maps.end_episode(1)  # one panel per head
    assert [p.name for p in (out / "heads").iterdir()] == ["attention-episode-001.png"]


def test_most_attended_step_is_in_the_window(enjoyed):
    _, _, recorder, trace = enjoyed
    for row, record in zip(trace, recorder.steps):
        mean = record.attention.mean(axis=0)
        j = int(mean.argmax())
        assert row["attended_slot"] == j and row["attended_step"] == record.key_steps[j][1]
        assert 0 <= row["attended_step"] <= row["step"]
        assert row["attended_word"] in row["window"]


# ---------------------------------------------------------------------------------------------
# The hub: a checkpoint from the cache, an upload through a fake client
# ---------------------------------------------------------------------------------------------


def hub_cache(root, repo_id, files):
    """A cache laid out as huggingface_hub lays it out: models--org--name/snapshots/<rev>/file + refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_checkpoint_loads_from_the_cache(enjoyed, shelm_run, offline_hub, tmp_path, monkeypatch, capsys):
    snapshot = hub_cache(offline_hub, "someone/tiny-shelm", {"model.pt": (shelm_run / "model_final.pt").read_bytes()})
    monkeypatch.chdir(shelm_run.parent.parent)  # a hub checkpoint's embeddings go to ./data
    enjoy.main(enjoy.Args(hub="someone/tiny-shelm", episodes=1, trace="jsonl", out_dir=str(tmp_path / "out")))
    assert f"shelm agent from {snapshot / 'model.pt'} (step 256)" in capsys.readouterr().out
    # the same agent, seeds and sampling as from the local file: the same first episode
    trace = [json.loads(line) for line in (tmp_path / "out" / "trace.jsonl").read_text().splitlines()]
    assert trace == [row for row in enjoyed[3] if row["episode"] == 1]


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records what would go over the network."""

    calls = []

    def create_repo(self, repo_id, repo_type=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        files = {p.name: p.read_bytes() for p in sorted(Path(folder_path).iterdir())}
        self.calls.append(("upload_folder", repo_id, repo_type, files))


def test_evaluate_and_upload_through_the_hub_client(shelm_run, tmp_path, monkeypatch):
    import huggingface_hub
    import tyro

    monkeypatch.chdir(shelm_run.parent.parent)
    returns, video = evaluation.evaluate(shelm_run / "model_final.pt", None, 1, video_dir=tmp_path / "eval")
    assert len(returns) == 1 and video == tmp_path / "eval" / "episode-001.mp4"
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
    assert 1 <= frames <= 100

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_offline", lambda: False)  # the fake hub is in reach
    returns = [0.25, 0.75]
    sent = enjoy.push_to_hub(shelm_run / "model_final.pt", "someone/tiny-shelm", returns, video)
    assert sent == ["README.md", "model.pt", "replay.mp4"]
    (create, upload) = FakeHfApi.calls
    assert create == ("create_repo", "someone/tiny-shelm", "model", True)
    assert upload[:3] == ("upload_folder", "someone/tiny-shelm", "model") and sorted(upload[3]) == sent
    files = upload[3]
    assert files["model.pt"] == (shelm_run / "model_final.pt").read_bytes()
    assert files["replay.mp4"] == video.read_bytes()
    card = files["README.md"].decode()
    ckpt = torch.load(shelm_run / "model_final.pt", weights_only=True)
    assert "0.500 +- 0.250" in card and "value: 0.50 +/- 0.25" in card  # mean +- std of the returns
    assert "python enjoy.py --hub someone/tiny-shelm" in card and "MiniGrid-Empty-5x5-v0" in card
    for package, version in ckpt["meta"]["versions"].items():
        assert f"- {package}: {version}" in card
    # the card's command reproduces the run's arguments
    command = next(line for line in card.splitlines() if line.startswith("python shelm_ppo.py "))
    parsed = tyro.cli(shelm_ppo.Args, args=shlex.split(command)[2:])
    runtime = {"batch_size", "minibatch_size", "num_iterations"}
    assert {k: v for k, v in vars(parsed).items() if k not in runtime} == {
        k: v for k, v in ckpt["args"].items() if k not in runtime
    }


@pytest.mark.parametrize(
    "offline, token, reachable, phrase",
    [
        (True, None, True, "while offline"),
        (False, None, True, "no Hugging Face token"),
        (False, "hf_fake", False, "out of reach"),
    ],
    ids=["offline", "no-token", "unreachable"],
)
def test_upload_without_network_or_token_is_one_line(shelm_run, monkeypatch, offline, token, reachable, phrase):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub, "hub_offline", lambda: not reachable)
    checkpoint = shelm_run / "model_final.pt"
    before = checkpoint.read_bytes()
    with pytest.raises(SystemExit) as e:
        enjoy.push_to_hub(checkpoint, "someone/tiny-shelm", [0.5], None)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and phrase in message, message
    assert f"python enjoy.py {checkpoint} --upload someone/tiny-shelm" in message
    assert FakeHfApi.calls == [] and checkpoint.read_bytes() == before


def test_training_script_evaluates_then_reports_the_failed_upload(shelm_run, tmp_path):
    # offline, --upload-model: the run is trained and saved, evaluated (logged, with a video), then one line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import error_line, run_in_process

    args = [*QUICK_UPLOAD, "--embeddings-dir", str(shelm_run.parent.parent / "data")]
    proc = run_in_process("shelm_ppo.py", args, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    line = error_line(proc)
    assert line.startswith("error: cannot upload to the Hugging Face hub while offline")
    assert f"python enjoy.py {os.path.join('runs', run.name, 'model_final.pt')} --upload" in line
    assert line.endswith("MiniGrid-Empty-5x5-v0-shelm_ppo-seed1")
    assert {"checkpoint.pt", "model_final.pt"} <= {p.name for p in run.iterdir()}
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/episodic_return")] == [0]
    videos = list((tmp_path / "videos" / f"{run.name}-eval").glob("*.mp4"))
    assert len(videos) == 1


QUICK_UPLOAD = [
    "--env-id",
    "MiniGrid-Empty-5x5-v0",
    "--num-envs",
    "1",
    "--num-steps",
    "16",
    "--total-timesteps",
    "16",
    "--num-minibatches",
    "1",
    "--update-epochs",
    "1",
    "--n-layer",
    "1",
    "--no-progress-bar",
    "--trxl-model",
    "tiny-random",
    "--clip-model",
    "tiny-random",
    "--upload-model",
    "--eval-episodes",
    "1",
]


# ---------------------------------------------------------------------------------------------
# HELM and HELMv2: their memory's text
# ---------------------------------------------------------------------------------------------


class Enough(Exception):
    pass


class StopAfter(Recorder):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def step(self, record):
        super().step(record)
        if len(self.steps) == self.n:
            raise Enough


@pytest.mark.parametrize("script", ["helm_ppo.py", "helmv2_ppo.py"])
def test_memory_text_of_helm_and_helmv2(script, tmp_path, monkeypatch):
    import importlib

    from conftest import assert_same_choices, run_in_process, tiny_args

    tiny = ["--num-envs", "2", "--num-steps", "4", "--total-timesteps", "8", "--num-minibatches", "1"]
    tiny += ["--frozen-dtype", "float32"]  # the references below are float32 computations
    proc = run_in_process(
        script, [*tiny, "--n-layer", "1", "--save-model", "--no-progress-bar", *tiny_args(script, tmp_path)], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (checkpoint,) = (tmp_path / "runs").glob("*/model_final.pt")
    algo = importlib.import_module(script[:-3])
    encoder_class = algo.FrozenHopfield if script == "helm_ppo.py" else algo.CLIPRescale
    forward, seen = encoder_class.forward, []

    def recording_forward(self, obs):
        trxl_in, tokens = forward(self, obs)
        seen.append((obs[0].copy(), trxl_in[0, 0].clone(), self))
        return trxl_in, tokens

    monkeypatch.setattr(encoder_class, "forward", recording_forward)
    loaded = enjoy.load(checkpoint, frames=True)
    recorder = StopAfter(5)
    with pytest.raises(Enough):
        enjoy.play(loaded, 1, [recorder])
    picture = enjoy.Picture(loaded.algorithm, 0)
    vocab = loaded.vocab
    full = loaded.trxl.word_emb(torch.arange(len(vocab)))  # every word's Transformer-XL input embedding
    for record, (obs, trxl_in, encoder) in zip(recorder.steps, seen):
        assert picture(record).shape[1] >= enjoy.Picture.MIN_WIDTH
        # the words' ids (the tiny vocabulary's words are distinct), compared with those the cosines below pick:
        # computed otherwise (in chunks, in another batch), they may swap words whose cosines tie (conftest.py)
        shown = [vocab.index(word) for word in record.words]
        if script == "helm_ppo.py":
            # the most attended word of the soft token and its weight: softmax(beta * cosine) over all words
            x = (torch.from_numpy(obs).float() / 255).mean(-1).flatten() @ encoder.projection.T
            cos = (full @ x) / (full.norm(dim=1) * x.norm() + 1e-8)
            weights = (loaded.args.beta * cos).softmax(dim=0)
            assert len(shown) == 1
            assert_same_choices(shown, weights.argmax(), cos[None])
            assert record.weight == pytest.approx(float(weights.max()), rel=1e-4)
        else:
            # the 3 words whose embeddings are nearest (cosine) to the rescaled CLIP embedding, nearest first
            cos = (full @ trxl_in) / (full.norm(dim=1) * trxl_in.norm())
            assert len(shown) == 3 and record.weight is None
            assert_same_choices(shown, cos.topk(3).indices, cos[None])
        assert loaded.algorithm == algo.ALGORITHM


# ---------------------------------------------------------------------------------------------
# Bad checkpoints and hub files: one line each
# ---------------------------------------------------------------------------------------------


def altered(shelm_run, change):
    ckpt = torch.load(shelm_run / "model_final.pt", weights_only=True)
    change(ckpt)
    return ckpt


BAD_CHECKPOINTS = {
    "missing": (None, "does not exist"),
    "not-torch": (b"not a checkpoint at all", "corrupt or not a checkpoint"),
    "a-list": ([1, 2, 3], "is not a checkpoint of these scripts"),
    "other-format": ({"format": "something/1", "algorithm": "shelm"}, "is not a checkpoint of these scripts"),
    "unknown-algorithm": (lambda c: c.update(algorithm="dqn"), "is not a checkpoint of helm_ppo.py"),
    "unknown-argument": (lambda c: c["args"].update(no_such_flag=1), "other arguments"),
    "no-arguments": (lambda c: c.pop("args"), "args is missing"),
    "wrong-weights": (lambda c: c["agent"].pop(next(iter(c["agent"]))), "does not match this model"),
    "bad-run-name": (lambda c: c.update(run_name="../../elsewhere"), "leaves runs/"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_one_line(case, shelm_run, tmp_path, monkeypatch):
    content, phrase = BAD_CHECKPOINTS[case]
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif callable(content):
        torch.save(altered(shelm_run, content), path)
    elif content is not None:
        torch.save(content, path)
    monkeypatch.chdir(shelm_run.parent.parent)
    with pytest.raises(SystemExit) as e:
        enjoy.main(enjoy.Args(checkpoint=str(path), episodes=1))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and phrase in message, message


@pytest.mark.parametrize(
    "hub, hub_file, phrase",
    [
        ("someone/tiny-shelm", "nothing.pt", "hub cache does not hold it"),
        ("someone/not-cached", "model.pt", "hub cache does not hold it"),
        ("not a repo id!", "model.pt", "not a Hugging Face hub repository id"),
    ],
)
def test_missing_hub_file_is_one_line(hub, hub_file, phrase, offline_hub):
    hub_cache(offline_hub, "someone/tiny-shelm", {"model.pt": b"x"})
    with pytest.raises(SystemExit) as e:
        enjoy.main(enjoy.Args(hub=hub, hub_file=hub_file, episodes=1))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and phrase in message, message


@pytest.mark.parametrize(
    "args, phrase",
    [
        ({}, "give a checkpoint file or --hub"),
        ({"checkpoint": "a.pt", "hub": "someone/x"}, "give a checkpoint file or --hub"),
        ({"checkpoint": "a.pt", "episodes": 0}, "must be >= 1"),
        ({"checkpoint": "a.pt", "seed": -1}, "--seed must be >= 0"),
        ({"attention_layer": 2}, "--attention-layer must be in [-2, 1]"),
    ],
)
def test_bad_arguments_are_one_line(args, phrase, shelm_run, monkeypatch):
    monkeypatch.chdir(shelm_run.parent.parent)
    args = {"checkpoint": str(shelm_run / "model_final.pt"), **args} if "attention_layer" in args else args
    with pytest.raises(SystemExit) as e:
        enjoy.main(enjoy.Args(**args))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and phrase in message, message


def test_render_without_display_writes_the_video(shelm_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(enjoy.sys, "platform", "linux")
    monkeypatch.chdir(shelm_run.parent.parent)
    enjoy.main(enjoy.Args(checkpoint=str(shelm_run / "model_final.pt"), episodes=1, render=True, out_dir=str(tmp_path)))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no display: --render shows no window; the video with the memory strip is written instead"
    assert [p.name for p in tmp_path.iterdir()] == ["episode-001.mp4"]


def test_window_shows_the_pictures(enjoyed, monkeypatch):
    # a real pygame window, on SDL's dummy video driver (no display here)
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    recorder = enjoyed[2]
    picture = enjoy.Picture("shelm", 1)
    window = enjoy.Window(picture, fps=1000)
    try:
        for record in recorder.steps[:3]:
            window.step(record)
        shown = window.pygame.surfarray.array3d(window.screen).swapaxes(0, 1)
        np.testing.assert_array_equal(shown, picture(recorder.steps[2]))
    finally:
        window.close()


# ---------------------------------------------------------------------------------------------
# Outputs: written as the checkpoints are (a file of their own, then its name), through no link, over no file
# ---------------------------------------------------------------------------------------------


def a_step(t):
    """A step record as play() hands it to the outputs (two attention heads, three keys)."""
    attended = {"attended_slot": 2, "attended_step": t, "attended_word": "a", "attended_weight": 0.5}
    return SimpleNamespace(
        episode=1,
        t=t,
        action_name="left",
        reward=0.0,
        value=0.5,
        words=["a"],
        window=["a"],
        attended=attended,
        attention=np.full((2, 3), 1 / 3),
        key_steps=[None, None, (1, t)],
        frame=np.zeros((16, 16, 3), dtype=np.uint8),
    )


def test_outputs_follow_no_link_and_replace_no_file(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ["trace.csv", "episode-001.mp4", "attention-episode-001.png"]:  # planted links
        (out / name).symlink_to(victim)
    (out / "trace.jsonl").write_text("an older trace\n")
    outputs = [
        enjoy.Trace(out / "trace.csv", "csv"),
        enjoy.Trace(out / "trace.jsonl", "jsonl"),
        evaluation.Video(out, lambda record: record.frame, fps=4),
        enjoy.AttentionMaps(out, 0, per_head=False),
    ]
    for output in outputs:
        for t in range(2):
            output.step(a_step(t))
        output.end_episode(1)
        output.close()
    assert victim.read_text() == "precious"
    assert all((out / name).is_symlink() for name in ["trace.csv", "episode-001.mp4", "attention-episode-001.png"])
    assert (out / "trace.jsonl").read_text() == "an older trace\n"
    new = ["trace-2.csv", "trace-2.jsonl", "episode-001-2.mp4", "attention-episode-001-2.png"]
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == sorted([*new, "trace.jsonl"])
    assert (out / "trace-2.csv").read_text().splitlines()[0].startswith("episode,step,action")
    assert len((out / "trace-2.jsonl").read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert all(str(out / name) in printed for name in new)
    assert f"({out / 'trace.jsonl'} exists: kept)" in printed


def test_output_folder_problems_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("keep")
    for folder in [tmp_path / "a-file", tmp_path / "a-file" / "below", Path("/proc/helm-enjoy-out")]:
        with pytest.raises(SystemExit) as stop:
            enjoy.Trace(folder / "trace.csv", "csv")
        assert stop.value.code.startswith(f"error: cannot use {folder} as the output folder (--out-dir): ")
    assert (tmp_path / "a-file").read_text() == "keep"
    # a full disk when the file is finished: one line, nothing left behind
    trace = enjoy.Trace(tmp_path / "out" / "trace.csv", "csv")
    trace.step(a_step(0))

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(enjoy.files.os, "fsync", full)
    with pytest.raises(SystemExit) as stop:
        trace.close()
    assert (
        stop.value.code
        == f"error: could not write {tmp_path / 'out' / 'trace.csv'}: No space left on device; nothing was written"
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_a_video_cut_short_is_one_line(tmp_path, monkeypatch):
    """ffmpeg stopped by a full disk or a file size limit exits without an error that moviepy reports: the video is
    counted after it is written, and a short one is one line, nothing left in the folder."""
    from moviepy import ImageSequenceClip

    def cut_short(self, name, **kwargs):
        Path(name).write_bytes(b"\x00\x00\x00 ftypisom" + bytes(100))  # what a killed ffmpeg leaves

    monkeypatch.setattr(ImageSequenceClip, "write_videofile", cut_short)
    video = evaluation.Video(tmp_path / "out", lambda record: record.frame, fps=4)
    for t in range(2):
        video.step(a_step(t))
    with pytest.raises(SystemExit) as stop:
        video.end_episode(1)
    assert stop.value.code.startswith(f"error: could not write {tmp_path / 'out' / 'episode-001.mp4'}: ffmpeg wrote")
    assert list((tmp_path / "out").iterdir()) == []
