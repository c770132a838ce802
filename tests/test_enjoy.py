"""enjoy.py on the tiny trained SHELM run of conftest.py: the video, the trace, the attention maps,
the hub (download from a cache, upload through a fake client) and every bad input as one line."""

import json

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import enjoy
import prepare_embeddings
import shelm_ppo

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
    vocab = prepare_embeddings.tiny_vocab()
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
    maps = enjoy.AttentionMaps(out / "again", 1, per_head=False, label_words=True)
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


def test_most_attended_step_is_in_the_window(enjoyed):
    _, _, recorder, trace = enjoyed
    for row, record in zip(trace, recorder.steps):
        mean = record.attention.mean(axis=0)
        j = int(mean.argmax())
        assert row["attended_step"] == record.key_steps[j][1] and 0 <= row["attended_step"] <= row["step"]
        assert row["attended_word"] in row["window"]
