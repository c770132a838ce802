"""HELMv2's frozen encoder (helmv2_ppo.CLIPRescale) against independent NumPy / dense computations,
and one short end-to-end run. Tiny random models only, offline."""

import glob

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import helmv2_ppo as h
from conftest import QUICK, assert_same_choices, error_line, run_in_process, tiny_args

EPS = 1e-8


@pytest.fixture(scope="module")
def models():
    """(trxl, vocab, clip, word_emb) of the tiny models, built once through build_memory."""
    args = h.Args(
        trxl_model="tiny-random", clip_model="tiny-random", n_layer=2, mem_len=4, cuda=False, frozen_dtype="float32"
    )
    trxl, vocab, encoder = h.build_memory(args, torch.device("cpu"), verbose=False)
    return trxl, vocab, encoder.frozen["clip"], trxl.word_emb


@pytest.fixture(scope="module")
def word_stats(models):
    """Per-dimension mean / unbiased std of the full word-embedding matrix, in NumPy (float64)."""
    full = models[3](torch.arange(len(models[1]))).double().numpy()
    return full.mean(0), full.std(0, ddof=1)


def encoder(models, rescale="running"):
    return h.CLIPRescale(models[2], models[3], rescale)


def features(rng, n, d=64):
    """CLIP-like embeddings: every dimension with its own offset and scale (float32)."""
    offset = np.linspace(-3.0, 3.0, d)
    scale = np.geomspace(1e-3, 10.0, d)
    return torch.from_numpy((offset + scale * rng.standard_normal((n, d))).astype(np.float32))


def images(rng, n):
    return rng.integers(0, 256, (n, 56, 56, 3), dtype=np.uint8)


def test_batch_mode_is_the_original_formula(models, word_stats):
    rng = np.random.default_rng(0)
    enc = encoder(models, "batch")
    x = features(rng, 16)
    xn = x.double().numpy()
    want = (xn - xn.mean(0)) / (xn.std(0, ddof=1) + EPS) * word_stats[1] + word_stats[0]
    np.testing.assert_allclose(enc.embed(x).double().numpy(), want, rtol=1e-4, atol=1e-4)
    assert enc.encoder_state() == {}


def test_running_mode_equals_statistics_of_all_batches(models, word_stats):
    rng = np.random.default_rng(1)
    enc = encoder(models)
    batches = [features(rng, n) * (1 + i) for i, n in enumerate([1, 5, 3, 16, 7])]
    for x in batches:
        out = enc.embed(x)
    seen = np.concatenate([b.double().numpy() for b in batches])
    assert enc.count.item() == len(seen) == 32
    np.testing.assert_allclose(enc.mean.numpy(), seen.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(enc.var.numpy(), seen.var(0), rtol=1e-10, atol=1e-14)
    # the last batch was standardised with statistics that already included it
    last = batches[-1].double().numpy()
    want = (last - seen.mean(0)) / (seen.std(0) + EPS) * word_stats[1] + word_stats[0]
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-4, atol=1e-4)

    # eval mode: statistics frozen, the same formula with them
    enc.eval()
    state = {k: v.clone() for k, v in enc.encoder_state().items()}
    x = features(rng, 9) * 5
    out = enc.embed(x)
    for key, value in enc.encoder_state().items():
        assert torch.equal(value, state[key]), key
    want = (x.double().numpy() - seen.mean(0)) / (seen.std(0) + EPS) * word_stats[1] + word_stats[0]
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-4, atol=1e-4)


def test_one_env_works_in_running_mode(models):
    rng = np.random.default_rng(2)
    enc = encoder(models)
    for step in range(4):
        x, tokens = enc(images(rng, 1))
        assert x.shape == (1, 1, 64) and tokens.shape == (1, 1) and tokens.dtype == torch.long
        assert torch.isfinite(x).all(), f"non-finite input at step {step}"
    assert enc.count.item() == 4


def test_batch_mode_refuses_one_env(models, tmp_path):
    with pytest.raises(SystemExit, match="^error: --rescale batch"):
        encoder(models, "batch")(images(np.random.default_rng(3), 1))
    args = ["--rescale", "batch", "--num-envs", "1", "--env-id", "MiniGrid-DoorKey-5x5-v0", "--no-progress-bar"]
    proc = run_in_process("helmv2_ppo.py", args + tiny_args("helmv2_ppo.py", tmp_path), tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [error_line(proc)]
    assert error_line(proc).startswith("error: --rescale batch") and "--num-envs >= 2" in error_line(proc)
    assert not (tmp_path / "runs").exists()


def test_envs_are_independent_in_running_eval_mode_only(models):
    rng = np.random.default_rng(4)
    running, batch = encoder(models), encoder(models, "batch")
    running.embed(features(rng, 64))
    running.eval()
    x = features(rng, 8)
    other = torch.cat([x[:1], features(rng, 7) * 3])
    # the standardisation itself is elementwise: another batch may round it otherwise (vectorised or not), by an
    # ulp or so of the outputs' scale (~30), never by what batch mode changes
    rounding = 1e-6 * running.embed(x).abs().max().item()
    torch.testing.assert_close(running.embed(x)[0], running.embed(x[:1])[0], rtol=0, atol=rounding)
    torch.testing.assert_close(running.embed(x)[0], running.embed(other)[0], rtol=0, atol=rounding)
    assert (batch.embed(x)[0] - batch.embed(other)[0]).abs().max() > 1.0
    # and through CLIP, whose batched convolutions round differently (~1e-7 of its features; the standardisation
    # magnifies that by we_std / std, here < 150): 1e-4 of the outputs' scale, far below what batch mode changes
    obs = images(rng, 4)
    running.train()
    running(images(rng, 16))
    running.eval()
    alone = running(obs[:1])[0][0, 0]
    assert (running(obs)[0][0, 0] - alone).abs().max() < 1e-4 * alone.abs().max()
    together, apart = batch(obs)[0][0, 0], batch(np.concatenate([obs[:1], images(rng, 3)]))[0][0, 0]
    assert (together - apart).abs().max() > 2.0


def test_rescaled_inputs_have_the_word_embedding_statistics(models, word_stats):
    rng = np.random.default_rng(5)
    for rescale in ["running", "batch"]:
        enc = encoder(models, rescale)
        out = torch.cat([enc.embed(features(rng, 16)) for _ in range(200)]).double().numpy()
        we_mean, we_std = word_stats
        # 5 standard errors of a mean of 3200 samples (batch mode: every batch has exactly we_mean)
        assert (np.abs(out.mean(0) - we_mean) < 5 * we_std / np.sqrt(len(out))).all(), rescale
        np.testing.assert_allclose(out.std(0), we_std, rtol=0.08, err_msg=rescale)


def test_encoder_state_round_trip_and_mismatch(models, tmp_path):
    rng = np.random.default_rng(6)
    enc = encoder(models)
    for n in [3, 16, 5]:
        enc.embed(features(rng, n))
    path = tmp_path / "state.pt"
    torch.save({"encoder": enc.encoder_state()}, path)
    state = torch.load(path, weights_only=True)["encoder"]  # as checkpoints are read
    assert set(state) == {"count", "mean", "var"} and state["count"].item() == 24

    fresh = encoder(models)
    fresh.load_encoder_state(state)
    enc.eval(), fresh.eval()
    x = features(rng, 4)
    assert torch.equal(fresh.embed(x), enc.embed(x))
    for key in state:
        assert torch.equal(fresh.encoder_state()[key], state[key])

    # a resumed run: its first batch (fresh episodes' first observations) stands in for the one the
    # checkpoint already counted, so it is standardised with the restored statistics but not added
    resumed = encoder(models)
    resumed.load_encoder_state(state)
    assert torch.equal(resumed.embed(x), enc.embed(x))
    assert resumed.count.item() == 24
    resumed.embed(x)
    assert resumed.count.item() == 28

    bad = dict(state, mean=torch.zeros(32, dtype=torch.float64), var=torch.ones(32, dtype=torch.float64))
    with pytest.raises(SystemExit, match=r"^error: .*running mean has shape \(32,\).*\(64,\)"):
        fresh.load_encoder_state(bad)
    with pytest.raises(SystemExit, match="^error: .*--rescale running needs count, mean and var"):
        fresh.load_encoder_state({})
    with pytest.raises(SystemExit, match="^error: .*negative or non-finite"):
        fresh.load_encoder_state(dict(state, var=-state["var"]))
    with pytest.raises(SystemExit, match="^error: .*--rescale batch uses none"):
        encoder(models, "batch").load_encoder_state(state)
    encoder(models, "batch").load_encoder_state({})
    empty = encoder(models).eval()
    with pytest.raises(SystemExit, match="^error: the running statistics .* are empty"):
        empty.embed(x)


def test_word_embedding_stats_chunked_equal_full_matrix(models):
    word_emb = models[3]
    full = word_emb(torch.arange(word_emb.cutoff_ends[-1]))
    for chunk in [300, 2000, 4096]:  # crossing cluster boundaries, exactly the vocabulary, more than it
        mean, std, norms = h.word_embedding_stats(word_emb, chunk)
        torch.testing.assert_close(mean, torch.mean(full, 0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std, torch.std(full, 0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norms, full.norm(dim=1))
    enc = encoder(models)
    torch.testing.assert_close(enc.we_mean, torch.mean(full, 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.we_std, torch.std(full, 0), rtol=1e-5, atol=1e-5)


def test_nearest_tokens_equal_dense_argmax(models):
    rng = np.random.default_rng(7)
    word_emb = models[3]
    full = word_emb(torch.arange(word_emb.cutoff_ends[-1]))
    picked = torch.from_numpy(rng.choice(len(full), 24, replace=False))
    x = torch.cat([full[picked] * 3.0, features(rng, 40), torch.randn(40, 64) * 8])
    sims = F.normalize(x, dim=-1) @ F.normalize(full, dim=-1).T
    dense = sims.argmax(dim=1)
    _, _, norms = h.word_embedding_stats(word_emb)
    for chunk in [7, 100, 16384]:
        ids = h.nearest_tokens(x, word_emb, norms, chunk)[:, 0]
        assert torch.equal(ids[:24], picked)  # a word's own embedding (scaled) finds that word
        differ = ids != dense
        # float rounding may only swap words whose similarities tie to 1e-6
        assert differ.sum() <= 1
        assert (sims.max(1).values - sims[torch.arange(len(x)), ids]).max() < 1e-6
        # the k nearest (what enjoy.py shows), most similar first, are the dense top k
        top = h.nearest_tokens(x, word_emb, norms, chunk, k=5)
        assert top.shape == (len(x), 5) and torch.equal(top[:, 0], ids)
        got = sims.gather(1, top)
        assert (got[:, :-1] >= got[:, 1:] - 1e-6).all()
        assert (sims.topk(5, dim=1).values - got).abs().max() < 1e-6
    # the encoder's token is the nearest word to env 0's input (the one whose memory is logged as text), up to
    # a tie to 1e-6 as above
    enc = encoder(models)
    inputs, tokens = enc(images(rng, 6))
    sims = F.normalize(inputs[0, :1], dim=-1) @ F.normalize(full, dim=-1).T
    assert tokens.shape == (1, 1)
    assert_same_choices(tokens, sims.argmax(dim=1), sims, tie=1e-6)


def test_end_to_end_run_saves_running_statistics(tmp_path):
    script = "helmv2_ppo.py"
    proc = run_in_process(script, QUICK + tiny_args(script, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "helmv2" and ckpt["args"]["rescale"] == "running"
    state = ckpt["encoder"]
    # one encoder call at the start (4 envs) and one per step: 2 updates x 16 steps x 4 envs
    assert state["count"].item() == 4 + 2 * 16 * 4
    assert state["mean"].shape == state["var"].shape == (64,)
    assert torch.isfinite(state["mean"]).all() and (state["var"] > 0).all()
