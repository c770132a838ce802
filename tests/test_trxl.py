"""Our Transformer-XL against Hugging Face's (transformers 4.37.2, stored reference outputs), and the
ways its weights and vocabulary are read. The comparisons with the reference run on the CPU and, marked
`cuda` (the `device` fixture of conftest.py), on the GPU: float32 to the same tolerance, bfloat16 to that
of the bfloat16 tests (tests/test_speed.py)."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import shelm_ppo
from conftest import ROOT
from helm_utils import frozen_models

FIXTURE = ROOT / "tests" / "fixtures" / "tiny_trxl"
REFERENCE = ROOT / "tests" / "fixtures" / "tiny_trxl_reference.safetensors"
TOL = 1e-5
# bfloat16 frozen weights (--frozen-dtype): outputs (layer-normed, about unit scale) within 0.1 absolute and
# 2% of their norm, as tests/test_speed.py states for bfloat16 against float32
BF16_ABS, BF16_REL = 0.1, 0.02


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(REFERENCE))
    qlens = json.loads(meta["qlens"])
    config = json.loads(meta["config"])
    assert len(qlens) == int(meta["n_steps"])
    return tensors, qlens, config


@pytest.fixture(scope="module")
def trxl4(reference):
    _, _, config = reference
    trxl, vocab = shelm_ppo.build_trxl(str(FIXTURE), config["n_layer"], config["mem_len"], "cpu")
    return trxl, vocab


def model_device(trxl):
    return trxl.word_emb.emb_projs[0].device


def fixture_trxl(reference, device, n_layer=None):
    """The fixture's Transformer-XL (all its layers, or the first n_layer) on `device`."""
    config = reference[2]
    return shelm_ppo.build_trxl(str(FIXTURE), n_layer or config["n_layer"], config["mem_len"], device)[0]


def rollout(trxl, inputs, memory_reset):
    """Feed (batch, seq, ...) inputs step by step as HF did, from an empty memory, on the model's device;
    yield (out, mems) on the CPU, back in HF's (batch, seq, d) layout; mems hold keys and values (compare
    with hf_mems(trxl, ...))."""
    device = model_device(trxl)
    batch = inputs[0].shape[0]
    mems, memory_mask = shelm_ppo.init_memory(trxl, batch, memory_reset or "zero", device)
    if memory_reset is None:
        memory_mask = None  # HF's model has no memory mask at all
    for x in inputs:
        # no_grad around each step, not around the yields: a generator left suspended (zip of two rollouts)
        # would leave gradients off for the tests that run after it
        with torch.no_grad():
            x = x.to(device)
            x = trxl.word_emb(x.T) if x.dtype == torch.long else x.transpose(0, 1)
            out, mems, memory_mask = trxl(x, mems, memory_mask)
        yield out.transpose(0, 1).cpu(), mems.cpu()


def hf_mems(trxl, hidden):
    """HF's mems (each layer's past inputs) as our model keeps them: their attention keys and values (on the
    CPU, in the model's dtype)."""
    with torch.no_grad():
        return trxl.keys_values(hidden.to(model_device(trxl), trxl.dtype)).cpu()


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# HF starts from mems=None, i.e. zero memories every slot of which is visible: our "zero" reset with
# its all-visible mask must be exactly that, as must running without any mask.
@pytest.mark.parametrize("memory_reset", [None, "zero"])
def test_inputs_embeds_rollout_matches_hf(reference, device, memory_reset):
    tensors, qlens, _ = reference
    trxl = fixture_trxl(reference, device)
    inputs = [tensors[f"embeds_in_{t}"] for t in range(len(qlens))]
    for t, (out, mems) in enumerate(rollout(trxl, inputs, memory_reset)):
        assert out.shape[1] == qlens[t]
        assert max_diff(out, tensors[f"embeds_out_{t}"]) <= TOL, f"step {t} output"
        assert max_diff(mems, hf_mems(trxl, tensors[f"embeds_mems_{t}"])) <= TOL, f"step {t} mems"


def test_input_ids_rollout_matches_hf(reference, device):
    tensors, qlens, _ = reference
    trxl = fixture_trxl(reference, device)
    inputs = [tensors[f"ids_in_{t}"] for t in range(len(qlens))]
    for t, (out, mems) in enumerate(rollout(trxl, inputs, "zero")):
        assert max_diff(out, tensors[f"ids_out_{t}"]) <= TOL, f"step {t} output"
        assert max_diff(mems, hf_mems(trxl, tensors[f"ids_mems_{t}"])) <= TOL, f"step {t} mems"


def test_pruned_model_matches_hf_n_layer_2(reference, device):
    tensors, qlens, _ = reference
    trxl = fixture_trxl(reference, device, n_layer=2)
    assert len(trxl.layers) == trxl.n_layer == 2
    inputs = [tensors[f"ids_in_{t}"] for t in range(len(qlens))]
    for t, (out, mems) in enumerate(rollout(trxl, inputs, "zero")):
        assert max_diff(out, tensors[f"ids_nlayer2_out_{t}"]) <= TOL, f"step {t} output"
        assert max_diff(mems, hf_mems(trxl, tensors[f"ids_nlayer2_mems_{t}"])) <= TOL, f"step {t} mems"
    # the pruned model is not just the full one: its last layer output differs
    assert max_diff(tensors["ids_nlayer2_out_6"], tensors["ids_out_6"]) > 1e-3


def test_word_embedding_of_whole_vocabulary(reference, trxl4, device):
    tensors, _, config = reference
    trxl, vocab = fixture_trxl(reference, device), trxl4[1]
    with torch.no_grad():
        emb = trxl.word_emb(torch.arange(config["vocab_size"], device=device)).cpu()
    assert len(vocab) == config["vocab_size"]
    assert max_diff(emb, tensors["word_emb_all"]) <= TOL
    # ids of every adaptive cluster at once, in an order that interleaves them, in (seq, batch) shape
    ids = torch.tensor([[299, 0, 59], [20, 150, 60]])
    with torch.no_grad():
        assert max_diff(trxl.word_emb(ids.to(device)).cpu(), tensors["word_emb_all"][ids]) <= TOL


def test_bfloat16_rollout_close_to_hf(reference, device):
    # --frozen-dtype bfloat16 (auto's choice on a GPU): the float32 reference within the bfloat16 tolerance;
    # the agent reads float32, the memory slots are bfloat16
    tensors, qlens, _ = reference
    f32 = fixture_trxl(reference, "cpu")
    trxl = fixture_trxl(reference, device).to(torch.bfloat16)
    inputs = [tensors[f"ids_in_{t}"] for t in range(len(qlens))]
    for t, (out, mems) in enumerate(rollout(trxl, inputs, "zero")):
        expected, expected_mems = tensors[f"ids_out_{t}"], hf_mems(f32, tensors[f"ids_mems_{t}"])
        assert out.dtype == torch.float32 and mems.dtype == torch.bfloat16
        assert max_diff(out, expected) < BF16_ABS, f"step {t} output"
        assert (out - expected).norm() < BF16_REL * expected.norm(), f"step {t} output"
        assert (mems.float() - expected_mems).norm() < BF16_REL * expected_mems.norm(), f"step {t} mems"


def test_frozen_and_in_eval_mode(trxl4):
    trxl, _ = trxl4
    assert not trxl.training
    assert not any(p.requires_grad for p in trxl.parameters())


def test_pytorch_model_bin_loads_like_safetensors(tmp_path, reference, trxl4):
    # the official checkpoint on the hub is a pytorch_model.bin
    tensors, qlens, config = reference
    for name in ("config.json", "vocab.pkl"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    torch.save(load_file(str(FIXTURE / "model.safetensors")), tmp_path / "pytorch_model.bin")
    trxl, vocab = shelm_ppo.build_trxl(str(tmp_path), config["n_layer"], config["mem_len"], "cpu")
    assert vocab == trxl4[1]
    for key, value in trxl4[0].state_dict().items():
        assert torch.equal(trxl.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------
# vocab.pkl
# ---------------------------------------------------------------------------------------------


def fixture_vocab_dict():
    with open(FIXTURE / "vocab.pkl", "rb") as f:
        return pickle.load(f)  # our own fixture: trusted, so plain pickle is the independent reader


def test_read_vocab_of_fixture():
    expected = fixture_vocab_dict()["idx2sym"]
    vocab = frozen_models.read_vocab(FIXTURE / "vocab.pkl")
    assert vocab == expected
    assert len(vocab) == 300 and vocab[0] == "<eos>" and vocab[24] == "<unk>" and vocab[64] == "dog"
    assert vocab[100] == "café"


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("nested", [False, True], ids=["bare", "inside-vocab"])
def test_read_vocab_refuses_code(tmp_path, protocol, nested):
    marker = tmp_path / "pwned"
    obj = Payload(marker)
    if nested:  # a valid-looking vocabulary that also carries the payload
        obj = dict(fixture_vocab_dict(), extra=obj)
    path = tmp_path / "vocab.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    # the file is really dangerous: a plain unpickler runs the payload
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(SystemExit) as e:
        frozen_models.read_vocab(path)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "system" in message and str(path) in message
    assert not marker.exists()


def legacy_vocab_file(path, vocab):
    """A vocab.pkl as the original Transformer-XL wrote it with torch.save before torch 1.6: a
    stream of pickles (magic number, protocol version, system info, the object, storage keys)."""
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump(
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
            f,
            protocol=2,
        )
        pickle.dump(vocab, f, protocol=2)
        pickle.dump([], f, protocol=2)


def test_read_vocab_of_legacy_torch_save_stream(tmp_path):
    vocab = fixture_vocab_dict()
    legacy_vocab_file(tmp_path / "handmade.pkl", vocab)
    assert frozen_models.read_vocab(tmp_path / "handmade.pkl") == vocab["idx2sym"]
    # and what torch's own legacy writer produces
    torch.save(vocab, tmp_path / "torch.pkl", _use_new_zipfile_serialization=False)
    assert frozen_models.read_vocab(tmp_path / "torch.pkl") == vocab["idx2sym"]


@pytest.mark.parametrize(
    "content", [b"", b"\x80\x02}q\x00.", b"not a pickle at all"], ids=["empty", "no-idx2sym", "garbage"]
)
def test_read_vocab_of_unusable_file(tmp_path, content):
    path = tmp_path / "vocab.pkl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        frozen_models.read_vocab(path)
    assert str(e.value.code).startswith("error: vocabulary ") and str(path) in str(e.value.code)


# ---------------------------------------------------------------------------------------------
# build_trxl: refusals and the tiny random model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,n_layer,maximum",
    [(str(FIXTURE), 0, 4), (str(FIXTURE), 5, 4), ("tiny-random", 19, 18), ("tiny-random", -1, 18)],
)
def test_build_trxl_refuses_n_layer_out_of_range(source, n_layer, maximum):
    with pytest.raises(SystemExit) as e:
        shelm_ppo.build_trxl(source, n_layer, 5, "cpu")
    message = str(e.value.code)
    assert message.startswith("error: --n-layer must be between 1 and ") and "\n" not in message
    assert f"between 1 and {maximum}" in message and f"got {n_layer}" in message


def model_dir(tmp_path, state):
    for name in ("config.json", "vocab.pkl"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_build_trxl_refuses_wrong_shape(tmp_path):
    state = load_file(str(FIXTURE / "model.safetensors"))
    key = "transformer.layers.1.pos_ff.CoreNet.0.weight"
    state[key] = state[key][:-1].contiguous()
    source = model_dir(tmp_path, state)
    with pytest.raises(SystemExit) as e:
        shelm_ppo.build_trxl(str(source), 4, 5, "cpu")
    message = str(e.value.code)
    assert message.startswith("error: weights ") and "do not fit" in message and "\n" not in message
    assert "layers.1.pos_ff.CoreNet.0.weight" in message
    # a pruned model never reads the layers it drops, so the same file serves n_layer=1
    trxl, _ = shelm_ppo.build_trxl(str(source), 1, 5, "cpu")
    assert len(trxl.layers) == 1


def test_build_trxl_refuses_missing_tensor(tmp_path):
    state = load_file(str(FIXTURE / "model.safetensors"))
    del state["transformer.word_emb.emb_projs.2"]
    with pytest.raises(SystemExit) as e:
        shelm_ppo.build_trxl(str(model_dir(tmp_path, state)), 4, 5, "cpu")
    assert "do not fit" in str(e.value.code) and "word_emb.emb_projs.2" in str(e.value.code)


def test_build_trxl_refuses_corrupt_weights(tmp_path):
    source = model_dir(tmp_path, load_file(str(FIXTURE / "model.safetensors")))
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as e:
        shelm_ppo.build_trxl(str(source), 4, 5, "cpu")
    message = str(e.value.code)
    assert message.startswith("error: cannot read weights ") and "\n" not in message


@pytest.fixture(scope="module")
def tiny18():
    return shelm_ppo.build_trxl("tiny-random", 18, 4, "cpu")


def test_tiny_random_is_deterministic(tiny18):
    torch.manual_seed(123)  # the global seed must not matter
    again, vocab = shelm_ppo.build_trxl("tiny-random", 18, 4, "cpu")
    assert vocab == tiny18[1] and len(vocab) == again.word_emb.cutoff_ends[-1]
    state, state_again = tiny18[0].state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)


def test_tiny_random_pruned_is_prefix_of_full(tiny18):
    full = tiny18[0]
    pruned, _ = shelm_ppo.build_trxl("tiny-random", 2, 4, "cpu")
    assert len(pruned.layers) == pruned.n_layer == 2 and len(full.layers) == 18
    full_state = full.state_dict()
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, full_state[key]), key
    # so the pruned model's memories are the first two layers' memories of the full one
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, len(tiny18[1]), (3, q), generator=gen) for q in (1, 2, 1, 1, 3, 1)]
    for (out_p, mems_p), (out_f, mems_f) in zip(rollout(pruned, inputs, "mask"), rollout(full, inputs, "mask")):
        assert max_diff(mems_p, mems_f[:2]) <= TOL
        assert max_diff(out_p, out_f) > 1e-3


def test_hub_id_loads_from_the_cache_without_network(tmp_path, monkeypatch, trxl4):
    # the hub path of build_trxl, offline: a cache laid out as huggingface_hub lays it out, holding
    # the fixture under a hub id, must load without any network (the real model's files, once cached)
    import huggingface_hub.constants

    repo = tmp_path / "models--someone--tiny-trxl"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(FIXTURE, repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # not in offline mode, and nothing answers at the hub's address: the cache alone must do
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    trxl, vocab = shelm_ppo.build_trxl("someone/tiny-trxl", 4, 5, "cpu")
    assert not huggingface_hub.constants.HF_HUB_OFFLINE  # the hub was not even asked
    assert vocab == trxl4[1]
    for (name, a), (_, b) in zip(trxl.state_dict().items(), trxl4[0].state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def brute_force_attention(attn, h, mem, visible_mem, mem_len, clamp_len):
    """Attention probabilities (query, key, batch, head) of one layer, one score at a time from its
    weights: score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_r sinusoid(distance)) / sqrt(d_head) over
    the keys [memory slots, this step's tokens] that query i may see: not in the future, not a hidden
    memory slot, and (same_length) only the last mem_len positions up to its own. The memory slots hold
    their keys (then values) already (test_key_value_memory_equals_plain_forward checks those)."""
    qlen, bsz, d_model = h.shape
    mlen, n_head, d_head = mem.shape[0], attn.n_head, attn.d_head
    w_q, w_k, _ = attn.qkv_net.weight.double().chunk(3, dim=0)
    mem_keys = mem[..., : n_head * d_head].double()
    inv_freq = 1 / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    probs = torch.zeros(qlen, mlen + qlen, bsz, n_head, dtype=torch.float64)
    for b in range(bsz):
        for n in range(n_head):
            heads = slice(n * d_head, (n + 1) * d_head)
            for i in range(qlen):
                query = w_q[heads] @ h[i, b].double()
                scores = {}
                for j in range(mlen + qlen):
                    distance = mlen + i - j
                    hidden = j < mlen and not visible_mem[j, b]
                    if distance < 0 or distance >= mem_len or hidden:
                        continue
                    angles = min(distance, clamp_len) * inv_freq
                    r = attn.r_net.weight.double()[heads] @ torch.cat([angles.sin(), angles.cos()])
                    key = mem_keys[j, b, heads] if j < mlen else w_k[heads] @ h[j - mlen, b].double()
                    content = (query + attn.r_w_bias[n].double()) @ key
                    position = (query + attn.r_r_bias[n].double()) @ r
                    scores[j] = (content + position) / d_head**0.5
                weights = torch.stack(list(scores.values())).softmax(dim=0)
                for j, w in zip(scores, weights):
                    probs[i, j, b, n] = w
    return probs


@pytest.mark.parametrize("memory_reset", ["mask", "zero"])
def test_attention_probabilities_are_those_of_the_forward_pass(reference, trxl4, memory_reset):
    # what enjoy.py draws: the probabilities a layer kept when asked, equal to a brute-force
    # recomputation from the weights, the layer's inputs and the mask rules; rows sum to 1 over what
    # the query may see and are 0 elsewhere (an episode reset under mask hides the old episode)
    _, _, config = reference
    trxl = trxl4[0]
    attns = [layer.dec_attn for layer in trxl.layers]
    inputs = {}
    hooks = [a.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args)) for a in attns]
    gen = torch.Generator().manual_seed(3)
    mems, memory_mask = shelm_ppo.init_memory(trxl, 2, memory_reset, "cpu")
    try:
        for a in attns[:-1]:
            a.keep_probs = True
        with torch.no_grad():
            for step, qlen in enumerate([1, 2, 1, 3, 1, 1, 2]):
                if step == 4:  # env 1 starts a new episode
                    done = torch.tensor([False, True])
                    mems, memory_mask = shelm_ppo.reset_memory(mems, memory_mask, done, memory_reset)
                x = trxl.word_emb(torch.randint(0, len(trxl4[1]), (qlen, 2), generator=gen))
                before = memory_mask.clone()
                _, mems_after, memory_mask_after = trxl(x, mems, memory_mask)
                for layer, attn in enumerate(attns[:-1]):
                    h, _, _, mem = inputs[attn]
                    assert torch.equal(mem, mems[layer])
                    expected = brute_force_attention(attn, h, mem, before, config["mem_len"], config["clamp_len"])
                    assert attn.probs.shape == expected.shape
                    assert max_diff(attn.probs.double(), expected) < TOL
                    assert torch.allclose(attn.probs.sum(dim=1), torch.ones(()))
                    if step == 4 and memory_reset == "mask":
                        assert attn.probs[:, : trxl.mem_len, 1].abs().max() == 0  # nothing of the old episode
                assert attns[-1].probs is None  # not asked, not kept
                mems, memory_mask = mems_after, memory_mask_after
    finally:
        for a in attns:
            a.keep_probs, a.probs = False, None
        for hook in hooks:
            hook.remove()
