"""The speed-ups of the frozen memory give the results of the plain computations (tiny models, fast):
keys and values of memory slots computed once, the observation cache of all three encoders, bfloat16
frozen models, HELM's one-piece retrieval, and the per-phase timer. Nothing here is timed."""

import math

import numpy as np
import pytest
import torch
import tyro

import helm_ppo
import helmv2_ppo
import shelm_ppo
from conftest import ROOT, assert_no_near_ties, assert_same_choices
from helm_utils import frozen_models, observation_cache, timing

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny3():
    trxl, _ = shelm_ppo.build_trxl("tiny-random", 3, 4, "cpu")
    return trxl


def plain_attention(attn, h, pos_emb, mask, mem):
    """One attention layer as written before the key/value memory (checked against Hugging Face then):
    the keys and values of the whole memory recomputed from its hidden states at every step."""
    qlen, bsz = h.shape[:2]
    q, k, v = attn.qkv_net(torch.cat([mem, h], dim=0)).chunk(3, dim=-1)
    q = q[-qlen:].view(qlen, bsz, attn.n_head, attn.d_head)
    k = k.view(-1, bsz, attn.n_head, attn.d_head)
    v = v.view(-1, bsz, attn.n_head, attn.d_head)
    r = attn.r_net(pos_emb).view(-1, attn.n_head, attn.d_head)
    content = torch.einsum("ibnd,jbnd->ijbn", q + attn.r_w_bias, k)
    position = attn.rel_shift(torch.einsum("ibnd,jnd->ijbn", q + attn.r_r_bias, r))
    score = (content + position) * attn.scale
    score = score.masked_fill(mask[..., None], torch.finfo(score.dtype).min)
    out = torch.einsum("ijbn,jbnd->ibnd", score.softmax(dim=1), v).reshape(qlen, bsz, -1)
    return attn.layer_norm(h + attn.o_net(out))


def plain_forward(trxl, x, hidden, memory_mask):
    """The Transformer-XL step with hidden-state memories (Hugging Face's kind), written out."""
    qlen, bsz = x.shape[:2]
    mlen = hidden.shape[1]
    klen = mlen + qlen
    ones = torch.ones(qlen, klen, dtype=torch.bool)
    mask = torch.triu(ones, diagonal=1 + mlen)
    shift = qlen - (klen - trxl.mem_len) if klen > trxl.mem_len else qlen
    mask = (mask | torch.tril(ones, diagonal=-shift))[:, :, None]
    mask = mask | ~torch.cat([memory_mask, torch.ones(qlen, bsz, dtype=torch.bool)])[None]
    pos = torch.arange(klen - 1, -1, -1.0)
    inv_freq = 1 / (10000 ** (torch.arange(0.0, trxl.d_model, 2.0) / trxl.d_model))
    angles = torch.outer(pos, inv_freq)
    pos_emb = torch.cat([angles.sin(), angles.cos()], dim=-1)[:, None, :]
    hids, h = [], x
    for layer, mem in zip(trxl.layers, hidden):
        hids.append(h)
        h = layer.pos_ff(plain_attention(layer.dec_attn, h, pos_emb, mask, mem))
    new_hidden = torch.cat([hidden, torch.stack(hids)], dim=1)[:, -trxl.mem_len :]
    new_mask = torch.cat([memory_mask, torch.ones(qlen, bsz, dtype=torch.bool)])[-trxl.mem_len :]
    return h, new_hidden, new_mask


@pytest.mark.parametrize("memory_reset", ["mask", "zero"])
def test_key_value_memory_equals_plain_forward(tiny3, memory_reset):
    trxl, batch = tiny3, 3
    gen = torch.Generator().manual_seed(0)
    mems, mask = shelm_ppo.init_memory(trxl, batch, memory_reset, "cpu")
    hidden = torch.zeros(trxl.n_layer, trxl.mem_len, batch, trxl.d_model)
    plain_mask = mask.clone()
    with torch.no_grad():
        for step, qlen in enumerate([1, 2, 1, 1, 3, 1, 1, 2, 1, 1, 1, 1]):  # longer than the memory
            x = trxl.word_emb(torch.randint(0, 2000, (qlen, batch), generator=gen))
            out, mems, mask = trxl(x, mems, mask)
            plain_out, hidden, plain_mask = plain_forward(trxl, x, hidden, plain_mask)
            assert (out - plain_out).abs().max() <= TOL, step
            assert (mems - trxl.keys_values(hidden)).abs().max() <= TOL, step
            assert torch.equal(mask, plain_mask)
            if step in (3, 7):  # an episode of env 1 ends: both forget it the same way
                done = torch.tensor([False, True, False])
                mems, mask = shelm_ppo.reset_memory(mems, mask, done, memory_reset)
                hidden, plain_mask = shelm_ppo.reset_memory(hidden, plain_mask, done, memory_reset)


def test_bfloat16_transformer_xl_close_to_float32():
    # stated tolerance: outputs (layer-normed, about unit scale) within 0.1 absolute, 2% of their norm
    f32, _ = shelm_ppo.build_trxl("tiny-random", 2, 4, "cpu")
    b16, _ = shelm_ppo.build_trxl("tiny-random", 2, 4, "cpu")
    b16.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    state = {m: shelm_ppo.init_memory(m, 4, "mask", "cpu") for m in (f32, b16)}
    assert state[b16][0].dtype == torch.bfloat16
    with torch.no_grad():
        for _ in range(8):
            x = f32.word_emb(torch.randint(0, 2000, (1, 4), generator=gen))
            outs = {}
            for m in (f32, b16):
                outs[m], *state[m] = m(x, *state[m])
            assert outs[b16].dtype == torch.float32  # what the agent reads is float32
            assert (outs[b16] - outs[f32]).abs().max() < 0.1
            assert (outs[b16] - outs[f32]).norm() < 0.02 * outs[f32].norm()


def test_bfloat16_clip_close_to_float32():

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8))
    for kind in ("ViT", "RN"):
        clip = frozen_models.load_clip("tiny-random", None, "cpu", tiny_kind=kind)
        with torch.no_grad():
            f32 = frozen_models.clip_image_features(clip, images)
            b16 = frozen_models.clip_image_features(clip.to(torch.bfloat16), images)
        assert b16.dtype == torch.float32
        # stated tolerance: cosine similarity of each embedding to its float32 self above 0.99
        assert torch.nn.functional.cosine_similarity(f32, b16).min() > 0.99, kind


def test_frozen_dtype_resolution():
    assert frozen_models.resolve_frozen_dtype("float32", "cpu") == torch.float32
    assert frozen_models.resolve_frozen_dtype("bfloat16", "cpu") == torch.bfloat16
    expected = torch.bfloat16 if frozen_models.mkldnn_bf16_supported() else torch.float32
    assert frozen_models.resolve_frozen_dtype("auto", "cpu") == expected


# ---------------------------------------------------------------------------------------------
# the observation cache
# ---------------------------------------------------------------------------------------------


class Counting:
    """A stand-in encoder: the sum of each observation's pixels, and a count of what it was asked for."""

    def __init__(self):
        self.seen = []

    def __call__(self, obs):
        self.seen.append(len(obs))
        flat = torch.from_numpy(obs.reshape(len(obs), -1).astype(np.int64))
        return flat.sum(1), flat[:, :2].float()


def test_cache_computes_each_new_observation_once():
    pool = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    encode, cache = Counting(), observation_cache.ObservationCache(100)
    for ids in [[0, 1, 0, 1], [1, 2, 2, 3], [3, 0, 1, 2]]:
        out = cache(pool[ids], encode)
        expected = Counting()(pool[ids])
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert encode.seen == [2, 2]  # repeats within a batch and across batches are not recomputed
    assert cache.log_scalars() == {"charts/observation_cache_hit_rate": pytest.approx(5 / 12)}
    assert len(cache) == 4


def test_cache_off_calls_through():
    pool = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    encode, cache = Counting(), observation_cache.ObservationCache(0)
    cache(pool, encode)
    cache(pool, encode)
    assert encode.seen == [3, 3] and cache.log_scalars() == {} and len(cache) == 0


@pytest.fixture(scope="module")
def word_emb():
    trxl, _ = helm_ppo.build_trxl("tiny-random", 1, 4, "cpu")
    return trxl.word_emb


def hopfield_cosines(encoder, obs):
    """HELM's cosines of each observation's projection with every word's embedding, in float64."""
    pixels = torch.from_numpy(obs).double().div(255.0).mean(dim=3).reshape(len(obs), -1)
    x = torch.nn.functional.normalize(pixels @ encoder.projection.double().T, dim=-1)
    return x @ torch.nn.functional.normalize(encoder.embeddings.double(), dim=-1).T


def test_helm_cache_gives_the_uncached_soft_tokens(word_emb):
    rng = np.random.default_rng(1)
    pool = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    plain = helm_ppo.FrozenHopfield(word_emb, 2000, (5, 7), 100.0, 0, 1)
    cached = helm_ppo.FrozenHopfield(word_emb, 2000, (5, 7), 100.0, 0, 1, cache_size=4)
    assert_no_near_ties(hopfield_cosines(plain, pool))  # so that the tokens may be compared exactly
    for ids in rng.integers(0, 6, (12, 5)):
        (soft, tokens), (soft_c, tokens_c) = plain(pool[ids]), cached(pool[ids])
        # equal up to float rounding: a matrix product's rounding depends on how many rows it has
        torch.testing.assert_close(soft_c, soft, rtol=1e-4, atol=1e-5)
        assert torch.equal(tokens_c, tokens)
    logged, logged_c = plain.log_scalars(), cached.log_scalars()
    # the weights are softmax(beta * cosine), beta 100: rounding of 1e-7 in a cosine moves them by ~1e-5 of theirs
    assert logged_c["charts/hopfield_top_weight"] == pytest.approx(logged["charts/hopfield_top_weight"], rel=1e-4)
    assert 0 < logged_c["charts/observation_cache_hit_rate"] < 1
    # a new projection (a resumed run) empties the cache: what it held is stale
    other = helm_ppo.FrozenHopfield(word_emb, 2000, (5, 7), 100.0, 0, 2)
    cached.load_encoder_state(other.encoder_state())
    torch.testing.assert_close(cached(pool[:3])[0], other(pool[:3])[0], rtol=1e-4, atol=1e-5)


def test_helm_one_piece_retrieval_equals_streamed(word_emb):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    encoder = helm_ppo.FrozenHopfield(word_emb, 2000, (5, 7), 100.0, 0, 1)
    whole = encoder.retrieve(x)
    streamed = helm_ppo.FrozenHopfield(word_emb, 2000, (5, 7), 100.0, 333, 1).retrieve(x)
    # one softmax or a running one over chunks: the same up to rounding (scalar kernels, ATEN_CPU_CAPABILITY=default,
    # move the soft tokens by ~1e-6 of the embeddings' scale); the most attended ids exactly, the words being set
    # apart by more than rounding
    (soft, best, top), (soft_s, best_s, top_s) = whole, streamed
    torch.testing.assert_close(soft_s, soft, rtol=0, atol=1e-5 * encoder.embeddings.abs().max().item())
    assert_no_near_ties(torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(encoder.embeddings).T)
    assert torch.equal(best_s, best)
    torch.testing.assert_close(top_s, top, rtol=1e-4, atol=0)


def test_helmv2_cache_gives_the_uncached_embeddings():
    args = helmv2_ppo.Args(
        trxl_model="tiny-random", clip_model="tiny-random", n_layer=1, mem_len=4, frozen_dtype="float32"
    )
    args.observation_cache_size = 0  # plain: without a cache (the scripts' default has one)
    trxl, _, plain = helmv2_ppo.build_memory(args, torch.device("cpu"), verbose=False)
    assert plain.cache.size == 0
    cached = helmv2_ppo.CLIPRescale(plain.frozen["clip"], plain.frozen["word_emb"], "running", cache_size=100)
    features = {}  # the CLIP embeddings each encoder standardises: computed, or from the cache
    for name, encoder in [("plain", plain), ("cached", cached)]:
        embed = encoder.embed
        encoder.embed = lambda f, embed=embed, name=name: embed(features.setdefault(name, f))
    full = plain.frozen["word_emb"](torch.arange(len(plain.word_norms))).double()
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 256, (5, 56, 56, 3), dtype=np.uint8)
    for ids in rng.integers(0, 5, (6, 4)):
        features.clear()
        (x, tokens), (x_c, tokens_c) = plain(pool[ids]), cached(pool[ids])
        # The cache computes an observation in another batch, which CLIP may round otherwise: ~1e-7 of its
        # features' scale. The tiny random CLIP hardly tells images apart (a dimension's std may be 1e-5 of its
        # scale), so the standardisation magnifies that rounding by we_std / std: compare in CLIP's units.
        f, f_c = features["plain"], features["cached"]
        torch.testing.assert_close(f_c, f, rtol=0, atol=1e-6 * f.abs().max().item())
        magnified = 1e-6 * f.abs().max() * plain.we_std / (plain.var.sqrt().float() + 1e-8)
        assert ((x_c - x).abs() <= magnified).all()  # the statistics move the same way
        # env 0's nearest word: the same, but where the inputs' difference could swap two words' cosines
        sims = torch.nn.functional.normalize(x[0, :1].double(), dim=-1) @ torch.nn.functional.normalize(full).T
        moved = 2 * ((x_c - x)[0, 0].norm() / x[0, 0].norm()).item()
        assert_same_choices(tokens_c, tokens, sims, tie=moved + 1e-6)
    assert torch.equal(cached.count, plain.count)
    torch.testing.assert_close(cached.mean, plain.mean, rtol=0, atol=1e-6 * f.abs().max().item())
    torch.testing.assert_close(cached.var.sqrt(), plain.var.sqrt(), rtol=0, atol=1e-6 * f.abs().max().item())
    assert cached.log_scalars()["charts/observation_cache_hit_rate"] > 0


def test_laps_add_up():
    lap = timing.Laps()
    for name in ("a", "b", "a"):
        lap(name)
    totals, cpu = lap.pop()
    assert set(totals) == {"a", "b"} and all(v >= 0 and math.isfinite(v) for v in totals.values())
    assert cpu >= 0 and lap.pop()[0] == {}


def test_throughput_benchmark_reads_the_scripts_timers(tmp_path):
    # one tiny update of the real script, read back the way benchmark/throughput.py does
    import sys

    sys.path.insert(0, str(ROOT / "benchmark"))
    import throughput

    from conftest import QUICK, run_in_process, tiny_args

    proc = run_in_process("helm_ppo.py", [*QUICK, *tiny_args("helm_ppo.py", tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    perf = throughput.read_perf(run_dir)
    for phase in ("env", "encoder", "trxl", "agent", "update", "cpu"):
        assert len(perf[f"perf/{phase}_s"]) == 2 and min(perf[f"perf/{phase}_s"]) > 0, phase
    # the phases cover the whole loop: its steps over their sum is the logged per-update rate
    per_update = [sum(perf[f"perf/{p}_s"][i] for p in throughput.PHASES if f"perf/{p}_s" in perf) for i in range(2)]
    assert perf["perf/update_sps"] == pytest.approx([64 / t for t in per_update], rel=1e-4)


def test_the_baselines_are_the_baseline_script():
    """throughput.py's cnn-ppo runs the CNN-PPO baseline, benchmark/baselines/lstm_ppo.py --no-lstm, and its
    lstm-ppo the same with the LSTM, with the memory scripts' loop flags; they log the same perf/* timers
    (tests/test_baselines.py)."""
    import sys

    import tyro

    sys.path.insert(0, str(ROOT / "benchmark"))
    sys.path.insert(0, str(ROOT / "benchmark" / "baselines"))
    import lstm_ppo
    import throughput

    args = throughput.Args(env_id="MiniGrid-DoorKey-5x5-v0", num_envs=2, num_steps=4, warmup_updates=1)
    cmd = throughput.baseline_command(args)
    assert cmd[1] == str(ROOT / "benchmark" / "baselines" / "lstm_ppo.py")
    loop = throughput.loop_flags(args)
    assert cmd[-len(loop) :] == loop == throughput.script_command(args, "helm_ppo.py", 2, "data")[-len(loop) :]
    parsed = tyro.cli(lstm_ppo.Args, args=cmd[2:])
    lstm_ppo.check_args(parsed)
    assert (parsed.lstm, parsed.d_model, parsed.env_id, parsed.num_envs, parsed.num_steps) == (
        False,
        1024,
        "MiniGrid-DoorKey-5x5-v0",
        2,
        4,
    )
    assert parsed.total_timesteps == 2 * 4 * (args.warmup_updates + args.measured_updates)
    # lstm-ppo (--scripts lstm_ppo.py): the same loop with the LSTM; --num-minibatches for every loop
    args.num_minibatches = 2
    lstm_cmd = throughput.baseline_command(args, lstm=True)
    assert (
        lstm_cmd[-len(loop) :]
        == throughput.loop_flags(args)
        == throughput.script_command(args, "helm_ppo.py", 2, "")[-len(loop) :]
    )
    parsed = tyro.cli(lstm_ppo.Args, args=lstm_cmd[2:])
    lstm_ppo.check_args(parsed)
    assert (parsed.lstm, parsed.d_model, parsed.lstm_hidden_size, parsed.num_minibatches) == (True, 1024, 256, 2)


def test_async_envs_train_the_same_run(tmp_path):
    """--async-envs steps each env in a worker process: the same observations, rewards and episode ends, so the
    same run, bitwise (the same checkpoint and the same logged losses and returns)."""
    from test_reliability import assert_same, scalars

    from conftest import QUICK, run_script, tiny_args

    final = {}
    for mode in ["sync", "async"]:
        args = [*QUICK, *tiny_args("helm_ppo.py", tmp_path), "--env-id", "MiniGrid-Dynamic-Obstacles-5x5-v0"]
        (tmp_path / mode).mkdir()
        proc = run_script("helm_ppo.py", [*args, *(["--async-envs"] if mode == "async" else [])], tmp_path / mode)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (run_dir,) = (tmp_path / mode / "runs").iterdir()
        final[mode] = torch.load(run_dir / "checkpoint.pt", weights_only=True), scalars(run_dir)
    (sync, sync_logged), (asynchronous, async_logged) = final["sync"], final["async"]
    assert asynchronous["args"].pop("async_envs") and not sync["args"].pop("async_envs")
    for part in ["agent", "optimizer", "reward_rms", "recent_returns", "rng", "args"]:
        assert_same(asynchronous[part], sync[part], part)
    sync_logged.pop("charts/SPS"), async_logged.pop("charts/SPS")
    assert async_logged == sync_logged and "charts/episodic_return" in sync_logged


# ---------------------------------------------------------------------------------------------
# benchmark/throughput.py and speed.py: inputs checked before any measurement, outputs written safely (issue 24)
# ---------------------------------------------------------------------------------------------


def benchmark_module(name):
    import sys

    sys.path.insert(0, str(ROOT / "benchmark"))
    return __import__(name)


DOCS = "# Benchmarks\n\nbefore\n<!-- throughput:begin -->\nold table\n<!-- throughput:end -->\nafter\n"
MEASURED = {"sps": 100.0, "rollout_sps": 120.0, "cpu_sps": 90.0, "env_ms_per_step": 1.5, "peak_rss_gb": 0.5}


@pytest.fixture
def throughput_setup(tmp_path, monkeypatch):
    """throughput.py with its measurements faked (MEASURED), an earlier results file with a note, and a docs file."""
    throughput = benchmark_module("throughput")
    calls = []

    def measured(args, *rest):
        calls.append(rest)
        return dict(MEASURED)

    monkeypatch.setattr(throughput, "run_baseline", measured)
    monkeypatch.setattr(throughput, "run_script", measured)
    earlier = {"runs": {"before": throughput.json.loads(throughput.json.dumps(EARLIER_RUN))}, "note": "by hand"}
    (tmp_path / "t.json").write_text(throughput.json.dumps(earlier, indent=1))
    (tmp_path / "docs.md").write_text(DOCS)
    argv = ["--tiny", "--scripts", "helm_ppo.py", "--n-layers", "2", "--repeats", "1", "--num-envs", "2"]
    argv += ["--num-steps", "8", "--warmup-updates", "0", "--measured-updates", "1"]
    argv += ["--out", str(tmp_path / "t.json"), "--docs", str(tmp_path / "docs.md")]
    return throughput, argv, calls


EARLIER_RUN = {
    "date": "2026-01-01 00:00 UTC",
    "command": "python benchmark/throughput.py",
    "device": "x86_64",
    "cpus": 2,
    "threads": 1,
    "repeats": 1,
    "load_before": [1.0, 1.0, 1.0],
    "load_after": None,
    "steps_measured": 16,
    "warmup_steps": 0,
    "variants": {"env": dict(MEASURED, ratio_to_cnn_ppo=1.0, cpu_ratio_to_cnn_ppo=1.0)},
    "all_runs": {"env": [MEASURED]},
}


def throughput_error(throughput, argv):
    with pytest.raises(SystemExit) as stop:
        throughput.main(tyro.cli(throughput.Args, args=argv))
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


THROUGHPUT_CASES = [
    (["--repeats", "0"], "--repeats must be in [1, 100]"),
    (["--repeats", "1000000"], "--repeats must be in [1, 100]"),
    (["--threads", "0"], "--threads must be in [1, 1024]"),
    (["--num-envs", "0"], "--num-envs must be >= 1"),
    (["--warmup-updates", "-1"], "--warmup-updates and --measured-updates must be at most"),
    (["--label", ""], "--label must be a printable name"),
    (["--scripts", "nope.py"], "--scripts: give one or more of"),
    (["--n-layers", "0"], "--n-layers: distinct values in [1, 18]"),
    (["--n-layers", "2", "2"], "--n-layers: distinct values"),
    # the tool's own flags: a changed --num-envs in one loop made its SPS wrong, silently
    (["--extra=--num-envs 4"], "--extra: --num-envs is not for a script here"),
    (["--extra=--no-cuda"], "--extra: --no-cuda is not for a script here"),
    (["--extra=--mem-len 0"], "variant helm_ppo.py --n-layer 2: --mem-len must be >= 1, got 0"),
    (["--extra='unclosed"], '--extra "\'unclosed": No closing quotation'),
    (["--env-id", "Nope-v0"], "unknown or unusable environment 'Nope-v0'"),
    (["--num-envs", str(10**9)], "the rollout buffers alone take at least"),
    (["--out", "{tmp}/link.json"], "link.json is a link, which an output never replaces"),
    (["--out", "{tmp}"], "is not a plain file, which an output never replaces"),
    (
        ["--out", "{tmp}/bad.json"],
        "{tmp}/bad.json is not of the expected structure: runs.x.variants.env.sps: Input should",
    ),
    (["--docs", "{tmp}/plain.md"], "has no <!-- throughput:begin --> ... <!-- throughput:end --> section"),
    (["--docs", "{tmp}/missing.md"], "--docs {tmp}/missing.md does not exist"),
]


@pytest.mark.parametrize("argv, phrase", THROUGHPUT_CASES, ids=[" ".join(a)[:30] for a, _ in THROUGHPUT_CASES])
def test_throughput_refuses_bad_input_before_measuring(argv, phrase, throughput_setup, tmp_path):
    """One line before the first measurement (they failed in a measured run, after the earlier ones, or never), and
    the files it names untouched: a link's target, a malformed results file, a docs file without the section."""
    throughput, base, calls = throughput_setup
    (tmp_path / "target").write_text("someone's file")
    (tmp_path / "link.json").symlink_to(tmp_path / "target")
    bad = dict(EARLIER_RUN, variants={"env": dict(EARLIER_RUN["variants"]["env"], sps="fast")})
    (tmp_path / "bad.json").write_text(throughput.json.dumps({"runs": {"x": bad}}))
    (tmp_path / "plain.md").write_text("no section")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert phrase.replace("{tmp}", str(tmp_path)) in throughput_error(throughput, [*base, *argv])
    assert calls == []
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_throughput_replaces_results_and_docs_together(throughput_setup, tmp_path, monkeypatch):
    throughput, argv, calls = throughput_setup
    throughput.main(tyro.cli(throughput.Args, args=[*argv, "--label", "after"]))
    results = throughput.json.loads((tmp_path / "t.json").read_text())
    assert list(results["runs"]) == ["before", "after"] and results["note"] == "by hand"  # the earlier kept
    assert results["runs"]["after"]["variants"]["helm_ppo.py --n-layer 2"]["ratio_to_cnn_ppo"] == 1.0
    docs = (tmp_path / "docs.md").read_text()
    assert docs.startswith("# Benchmarks\n\nbefore\n<!-- throughput:begin -->\n") and docs.endswith("end -->\nafter\n")
    assert "**after**" in docs and "**before**" in docs and "old table" not in docs
    assert len(calls) == 3  # env, cnn-ppo, helm_ppo.py --n-layer 2
    good = {p: p.read_bytes() for p in tmp_path.iterdir()}

    # a measurement that fails: nothing replaced
    def failed(args, *rest):
        throughput.fail("a run failed")

    monkeypatch.setattr(throughput, "run_script", failed)
    assert "a run failed" in throughput_error(throughput, [*argv, "--label", "failed"])
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == good

    # the docs lose their section during the measurement: the results are not written without their table either
    def docs_edited(args, *rest):
        (tmp_path / "docs.md").write_text("rewritten meanwhile")
        return dict(MEASURED)

    monkeypatch.setattr(throughput, "run_script", docs_edited)
    assert "has no <!-- throughput:begin -->" in throughput_error(throughput, [*argv, "--label", "late"])
    assert (tmp_path / "t.json").read_bytes() == good[tmp_path / "t.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_throughput_report_checks_the_results_file(throughput_setup, tmp_path):
    throughput, _, _ = throughput_setup
    (tmp_path / "bad.json").write_text('{"runs": {"x": {"date": 1}}}')
    argv = ["--report", "--out", str(tmp_path / "bad.json"), "--docs", str(tmp_path / "docs.md")]
    assert "is not of the expected structure: runs.x.date: Input should be a valid string" in throughput_error(
        throughput, argv
    )
    assert (tmp_path / "docs.md").read_text() == DOCS
    # the repository's own results file passes, and --report gives the docs table it was made with
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    (tmp_path / "benchmarks.md").write_text(docs)
    out = str(ROOT / "docs" / "results" / "throughput.json")
    throughput.main(
        tyro.cli(throughput.Args, args=["--report", "--out", out, "--docs", str(tmp_path / "benchmarks.md")])
    )
    assert (tmp_path / "benchmarks.md").read_text() == docs


@pytest.fixture
def speed_setup(monkeypatch):
    speed = benchmark_module("speed")
    calls = []

    def measured(name):
        def bench(args, device):
            calls.append(name)
            return {"measured": 1.0}

        return bench

    monkeypatch.setattr(speed, "bench_trxl", measured("trxl"))
    monkeypatch.setattr(speed, "bench_cache", measured("cache"))
    return speed, calls


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--repeats", "0"], "--repeats must be in [1, 100000]"),
        (["--cache-steps", "0"], "--cache-steps must be in [1, 100000]"),
        (["--cache-steps", str(10**9)], "--cache-steps must be in [1, 100000]"),
        (["--out", "{tmp}/link.json"], "link.json is a link, which an output never replaces"),
        (["--out", "{tmp}/file/speed.json"], "lies inside {tmp}/file, which is not a folder"),
        (["--only", "trxl", "--out", "{tmp}/bad.json"], "--out {tmp}/bad.json is not of the expected structure"),
    ],
)
def test_speed_refuses_bad_input_before_measuring(argv, phrase, speed_setup, tmp_path):
    speed, calls = speed_setup
    (tmp_path / "target").write_text("someone's file")
    (tmp_path / "link.json").symlink_to(tmp_path / "target")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "bad.json").write_text('{"device": "cpu", "torch_threads": 1, "cache": {"hit_rate": "high"}}')
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as stop:
        speed.main(tyro.cli(speed.Args, args=["--out", str(tmp_path / "speed.json"), *argv]))
    message = str(stop.value.code)
    assert message.startswith("error: ") and phrase.replace("{tmp}", str(tmp_path)) in message, message
    assert calls == [] and {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_speed_only_keeps_the_other_section(speed_setup, tmp_path):
    speed, calls = speed_setup
    out = tmp_path / "speed.json"
    out.write_text('{"device": "cpu", "torch_threads": 2, "cache": {"hit_rate": 0.5, "tokens_identical": true}}')
    speed.main(tyro.cli(speed.Args, args=["--only", "trxl", "--out", str(out)]))
    written = speed.json.loads(out.read_text())
    assert written["cache"] == {"hit_rate": 0.5, "tokens_identical": True} and written["trxl"] == {"measured": 1.0}
    assert calls == ["trxl"] and sorted(p.name for p in tmp_path.iterdir()) == ["speed.json"]
