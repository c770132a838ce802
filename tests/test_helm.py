"""HELM's FrozenHopfield against independent expectations, and helm_ppo.py end to end (tiny models)."""

import glob
import math

import numpy as np
import pytest
import torch

import helm_ppo
from conftest import QUICK, assert_no_near_ties, error_line, run_in_process, run_script, tiny_args

H, W = 6, 9  # small, non-square observations: transposing them changes which pixel meets which weight
N_TOKEN = 2000  # the whole tiny vocabulary


@pytest.fixture(scope="module")
def word_emb():
    trxl, vocab = helm_ppo.build_trxl("tiny-random", 1, 4, torch.device("cpu"))
    assert len(vocab) == N_TOKEN
    return trxl.word_emb


def make(word_emb, beta=100.0, chunk=16384, seed=1, n_token=N_TOKEN, hw=(H, W)):
    return helm_ppo.FrozenHopfield(word_emb, n_token, hw, beta, chunk, seed)


def random_obs(batch, seed=0, hw=(H, W)):
    return np.random.default_rng(seed).integers(0, 256, (batch, *hw, 3), dtype=np.uint8)


def dense_reference(obs, projection, embeddings, beta):
    """The HELM formula in one piece, in float64: softmax over the whole vocabulary at once. Returns the soft
    tokens, the most attended ids, their weights and the cosines."""
    pixels = torch.from_numpy(obs).double().div(255.0).mean(dim=3).reshape(len(obs), -1)
    x = pixels @ projection.double().T
    e = embeddings.double()
    sim = x @ e.T / (x.norm(dim=1, keepdim=True) * e.norm(dim=1)[None, :] + 1e-8)
    weights = torch.softmax(beta * sim, dim=1)
    return weights @ e, weights.argmax(dim=1), weights.max(dim=1).values, sim


def test_vocabulary_embeddings_are_the_trxl_input_embeddings(word_emb):
    # computed in chunks that do not divide the vocabulary: the same as all at once
    enc = make(word_emb, chunk=333)
    expected = word_emb(torch.arange(N_TOKEN))
    assert enc.embeddings.shape == (N_TOKEN, 64)
    torch.testing.assert_close(enc.embeddings, expected)
    # a buffer kept out of state dicts and checkpoints: the Transformer-XL defines it
    assert "embeddings" not in enc.state_dict()


@pytest.mark.parametrize("beta", [1.0, 100.0])
@pytest.mark.parametrize("chunk", [0, 7, 333, 2000, 5000])
def test_chunked_streaming_softmax_equals_dense_softmax(word_emb, beta, chunk):
    enc = make(word_emb, beta=beta, chunk=chunk)
    obs = random_obs(5)
    soft, tokens = enc(obs)
    ref_soft, ref_tokens, ref_top, sims = dense_reference(obs, enc.projection, enc.embeddings, beta)
    assert soft.shape == (1, 5, 64) and soft.dtype == torch.float32
    assert tokens.shape == (5, 1) and tokens.dtype == torch.long
    scale = enc.embeddings.abs().max().item()
    torch.testing.assert_close(soft[0].double(), ref_soft, rtol=0, atol=1e-5 * scale)
    assert_no_near_ties(sims)  # float32 in chunks and float64 at once pick the same words
    assert tokens[:, 0].tolist() == ref_tokens.tolist()
    top = enc.log_scalars()["charts/hopfield_top_weight"]
    assert top == pytest.approx(ref_top.mean().item(), rel=1e-4)
    assert enc.log_scalars() == {}  # reset after logging


def test_chunk_of_one_token(word_emb):
    enc = make(word_emb, beta=100.0, chunk=1, n_token=150)  # 150 chunks of a single token
    obs = random_obs(3, seed=1)
    soft, tokens = enc(obs)
    ref_soft, ref_tokens, _, sims = dense_reference(obs, enc.projection, enc.embeddings, 100.0)
    assert enc.embeddings.shape[0] == 150
    torch.testing.assert_close(soft[0].double(), ref_soft, rtol=0, atol=1e-5 * enc.embeddings.abs().max().item())
    assert_no_near_ties(sims)
    assert tokens[:, 0].tolist() == ref_tokens.tolist()


def test_beta_sets_the_sharpness(word_emb):
    obs = random_obs(4, seed=2)
    mean_embedding = word_emb(torch.arange(N_TOKEN)).mean(0)
    # beta -> 0: the softmax is uniform, the soft token is the vocabulary's mean embedding
    soft, _ = make(word_emb, beta=1e-6, chunk=333)(obs)
    torch.testing.assert_close(soft[0], mean_embedding.expand(4, -1), rtol=0, atol=1e-4)
    # a huge beta: (numerically) one-hot on the most similar word, without overflow in any chunk
    enc = make(word_emb, beta=1e6, chunk=333)
    soft, tokens = enc(obs)
    assert torch.isfinite(soft).all()
    torch.testing.assert_close(soft[0], enc.embeddings[tokens[:, 0]], rtol=0, atol=1e-4)
    assert enc.log_scalars()["charts/hopfield_top_weight"] == pytest.approx(1.0)


def test_black_observation_gives_the_mean_embedding(word_emb):
    # x = 0: every cosine is 0 (the 1e-8 keeps it finite), so every word weighs the same
    enc = make(word_emb, beta=100.0, chunk=333)
    soft, _ = enc(np.zeros((2, H, W, 3), dtype=np.uint8))
    torch.testing.assert_close(soft[0], enc.embeddings.mean(0).expand(2, -1), rtol=0, atol=1e-4)


def test_projection_is_drawn_from_the_seed(word_emb):
    rng_before = torch.get_rng_state()
    a, b, c = make(word_emb, seed=1), make(word_emb, seed=1), make(word_emb, seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global torch RNG stream must be left alone"
    assert a.projection.shape == (64, H * W)
    assert torch.equal(a.projection, b.projection)
    assert not torch.allclose(a.projection, c.projection)
    # N(0, 1/d_model), as in the original
    assert abs(a.projection.mean().item()) < 0.02
    assert a.projection.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.05)
    # not a parameter or persistent buffer: it travels only through encoder_state
    assert list(a.parameters()) == [] and a.state_dict() == {}


def test_encoder_state_round_trip(word_emb):
    a, b = make(word_emb, seed=1), make(word_emb, seed=2)
    obs = random_obs(3, seed=3)
    state = a.encoder_state()
    assert set(state) == {"projection"} and state["projection"].device.type == "cpu"
    b.load_encoder_state(state)
    assert torch.equal(b.projection, a.projection)
    torch.testing.assert_close(b(obs)[0], a(obs)[0])


def test_mismatched_encoder_state_fails_clearly(word_emb):
    enc = make(word_emb)
    wrong = make(word_emb, hw=(H, H)).encoder_state()  # another environment's image size
    with pytest.raises(SystemExit) as e:
        enc.load_encoder_state(wrong)
    assert str(e.value).startswith("error: ") and "projection" in str(e.value)
    assert f"(64, {H * H})" in str(e.value) and f"(64, {H * W})" in str(e.value)
    with pytest.raises(SystemExit) as e:
        enc.load_encoder_state({})  # e.g. a checkpoint of another script's encoder
    assert str(e.value).startswith("error: ") and "projection" in str(e.value)


def test_colour_channels_are_averaged(word_emb):
    enc = make(word_emb, beta=100.0)
    obs = random_obs(4, seed=4)
    soft, tokens = enc(obs)
    # permuting the colour channels does not change the channel mean, so nothing changes (but the rounding of the
    # mean, summed in another order: the words must be set apart by more than that)
    assert_no_near_ties(dense_reference(obs, enc.projection, enc.embeddings, 100.0)[3])
    for perm in ([2, 0, 1], [1, 0, 2]):
        soft_p, tokens_p = enc(np.ascontiguousarray(obs[..., perm]))
        torch.testing.assert_close(soft_p, soft, rtol=0, atol=1e-5 * enc.embeddings.abs().max().item())
        assert torch.equal(tokens_p, tokens)
    # pure red, green and blue images have the same channel mean: the same token
    pure = np.zeros((3, H, W, 3), dtype=np.uint8)
    for i in range(3):
        pure[i, ..., i] = 255
    soft_rgb, tokens_rgb = enc(pure)
    torch.testing.assert_close(soft_rgb[0, 1:], soft_rgb[0, :1].expand(2, -1))
    # the spatial layout does matter: every pixel has its own column of the projection. (Averaging
    # over a spatial axis instead, as obs.mean(1) would on channel-last images, keeps the colours
    # apart, so the colour permutations above would change its output.)
    square = make(word_emb, beta=100.0, hw=(W, W))
    obs_sq = random_obs(4, seed=5, hw=(W, W))
    soft_sq, _ = square(obs_sq)
    soft_t, _ = square(np.ascontiguousarray(obs_sq.transpose(0, 2, 1, 3)))
    assert (soft_t - soft_sq).abs().max() > 1e-2 * square.embeddings.abs().max()


@pytest.mark.parametrize(
    "field,value", [("beta", 0.0), ("beta", -1.0), ("beta", math.nan), ("beta", math.inf), ("hopfield_chunk", -1)]
)
def test_check_args_rejects(field, value):
    with pytest.raises(SystemExit) as e:
        helm_ppo.check_args(helm_ppo.Args(**{field: value}))
    assert str(e.value).startswith(f"error: --{field.replace('_', '-')} must be")


def test_helm_defaults_follow_the_original_minigrid_memory_config():
    args = helm_ppo.Args()
    assert helm_ppo.ALGORITHM == "helm"
    assert (args.learning_rate, args.mem_len, args.ent_coef, args.num_steps, args.num_envs) == (
        1e-4,
        15,
        0.005,
        128,
        16,
    )
    assert args.beta == 100.0 and args.total_timesteps == 2_000_000
    assert not hasattr(args, "topk") and not hasattr(args, "clip_model")  # no SHELM-only fields
    helm_ppo.check_args(args)


def test_training_run_end_to_end(tmp_path):
    proc = run_script("helm_ppo.py", QUICK + tiny_args("helm_ppo.py", tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["algorithm"] == "helm" and ckpt["global_step"] == 128
    projection = ckpt["encoder"]["projection"]
    assert projection.shape == (64, 56 * 56)  # MiniGrid: 7x7 tiles of 8x8 pixels
    # the same projection as the seed draws in this process: reproducible across processes
    torch.manual_seed(123)  # the global RNG state does not matter
    args = helm_ppo.Args(trxl_model="tiny-random", env_id="MiniGrid-DoorKey-5x5-v0", n_layer=2)
    _, _, encoder = helm_ppo.build_memory(args, torch.device("cpu"), verbose=False)
    assert torch.equal(projection, encoder.projection)


def test_bad_beta_exits_with_one_error_line(tmp_path):
    proc = run_in_process("helm_ppo.py", ["--beta", "-1", *tiny_args("helm_ppo.py", tmp_path)], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert error_line(proc) == "error: --beta must be a positive float32 number, got -1.0"
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [error_line(proc)]
    assert not (tmp_path / "runs").exists()
