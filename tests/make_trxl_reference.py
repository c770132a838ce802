"""Generate the tiny Transformer-XL reference fixtures from Hugging Face ``transformers``.

MAINTAINERS ONLY. This script is NOT run by the test suite and is NOT imported by the
package. The tests only read the committed files it produces:

    tests/fixtures/tiny_trxl/config.json          HF TransfoXLConfig (wt103 structure, tiny sizes)
    tests/fixtures/tiny_trxl/model.safetensors    state dict of a HF TransfoXLLMHeadModel
                                                  ("transformer." prefix + "crit.*" keys, like the
                                                  official transfo-xl-wt103 LM-head checkpoint)
    tests/fixtures/tiny_trxl/vocab.pkl            plain pickle of a dict shaped like the official
                                                  transfo-xl-wt103 vocab.pkl
    tests/fixtures/tiny_trxl_reference.safetensors  reference outputs of HF TransfoXLModel

It must be run in a SEPARATE reference virtualenv (outside the repository), because the
project itself must not depend on ``transformers``. transformers 4.37.2 is the version to
match (TransfoXL still works there on Python 3.11 with current torch; 4.38+ crash in
forward). Exact setup and regeneration commands, from the repository root:

    REFENV=~/trxl-refenv  # any directory outside the repository
    python3 -m venv $REFENV
    $REFENV/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    $REFENV/bin/pip install "transformers==4.37.2" safetensors numpy sacremoses
    $REFENV/bin/python tests/make_trxl_reference.py

(any CPU torch 2.x works; the fixtures were made with 2.13.0; sacremoses is only needed for the
optional check that HF's TransfoXLTokenizer can read the generated vocab.pkl).

Everything is deterministic (fixed seeds, single thread): re-running reproduces the files.

What the reference file holds (B = 3, d_model = 32, n_layer = 4, mem_len = 5); the
per-step query lengths QLENS are also stored as JSON in the safetensors metadata:
    word_emb_all              (n_token, d_model)  model.word_emb(arange(n_token)) (incl. sqrt(d_model) scale)
    embeds_in_{t}             (B, qlen_t, d_model) inputs_embeds fed at step t
    embeds_out_{t}            (B, qlen_t, d_model) last_hidden_state
    embeds_mems_{t}           (n_layer, mem_len, B, d_model) returned mems, stacked
    ids_in_{t}                (B, qlen_t) int64    input_ids fed at step t
    ids_out_{t}, ids_mems_{t}  as above
    ids_attn_{t}              (n_layer, B, n_head, qlen_t, mem_len + qlen_t) attention probabilities
    ids_nlayer2_out_{t}       TransfoXLModel built with n_layer=2 from the same checkpoint
    ids_nlayer2_mems_{t}      (2, mem_len, B, d_model)
Step 0 is run with mems=None (HF then uses zero mems of length mem_len); every later step
gets the mems returned by the previous step.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TransfoXLConfig, TransfoXLLMHeadModel, TransfoXLModel  # noqa: E402

HF_VERSION = "4.37.2"

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
MODEL_DIR = FIXTURES / "tiny_trxl"
REFERENCE_FILE = FIXTURES / "tiny_trxl_reference.safetensors"

SEED = 20240229
BSZ = 3
QLENS = [1, 2, 1, 3, 1, 1, 2]
EMBEDS_SCALE = 3.0
LAYER0_QKV_DAMP = 0.25  # see redraw_parameters()

# Tiny config with the structure of the official transfo-xl-wt103 config.json
# (adaptive, div_val > 1, 3 cutoffs, untied r biases, same_length, clamp_len < mem_len,
# post-LayerNorm, projections shared for all clusters but the first, tied embeddings).
N_TOKEN = 300
CONFIG_KWARGS = {
    "vocab_size": N_TOKEN,
    "cutoffs": [20, 60, 150],
    "d_model": 32,
    "d_embed": 32,
    "n_head": 4,
    "d_head": 8,
    "d_inner": 64,
    "div_val": 2,
    "pre_lnorm": False,
    "n_layer": 4,
    "mem_len": 5,
    "clamp_len": 3,
    "same_length": True,
    "proj_share_all_but_first": True,  # -> tie_projs = [False, True, True, True] as in wt103
    "attn_type": 0,
    "sample_softmax": -1,
    "adaptive": True,
    "dropout": 0.0,
    "dropatt": 0.0,
    "untie_r": True,
    "init": "normal",
    "init_range": 0.01,
    "proj_init_std": 0.01,
    "init_std": 0.02,
    "layer_norm_epsilon": 1e-5,
    "eos_token_id": 0,
    # extra keys present in the official wt103 config.json (ignored by the HF model code)
    "tgt_len": 7,
    "ext_len": 0,
    "tie_weight": True,
    "architectures": ["TransfoXLLMHeadModel"],
}

# Vocabulary: index 0 is the only `special` symbol ("<eos>"), the rest is ordered by
# (synthetic) frequency like the original Vocab.build_vocab(); "<unk>" is an ordinary
# corpus token and sits at index 24 exactly as in transfo-xl-wt103.
PLACED_SYMBOLS = {
    1: "the",
    2: ",",
    3: ".",
    4: "of",
    5: "and",
    6: "in",
    7: "to",
    8: "a",
    9: "was",
    10: "is",
    11: "@-@",
    12: "on",
    13: "as",
    14: "for",
    15: "with",
    16: "by",
    17: "that",
    18: "'s",
    19: "door",
    # cluster 1: [20, 60)
    20: "key",
    21: "ball",
    22: "box",
    23: "red",
    24: "<unk>",
    25: "green",
    26: "blue",
    27: "wall",
    # cluster 2: [60, 150)
    60: "yellow",
    61: "purple",
    62: "grey",
    63: "goal",
    64: "dog",
    100: "café",
    # cluster 3: [150, 300)
    150: "agent",
    151: "pick",
    152: "up",
    153: "go",
    154: "open",
    155: "put",
    156: "next",
    299: "w299",
}


def build_vocab_dict() -> dict:
    """Dict with the same structure as the official transfo-xl-wt103 vocab.pkl.

    The official file is ``corpus.vocab.__dict__`` of the original Transformer-XL ``Vocab``
    object (kimiyoung/transformer-xl, built by ``get_lm_corpus(..., "wt103")`` with
    ``special=["<eos>"]``, ``lower_case=False``), i.e. the attributes set by
    ``Vocab.__init__`` (counter, special, min_freq, max_size, lower_case, delimiter,
    vocab_file), then by ``build_vocab`` (idx2sym, sym2idx) and ``add_special``
    (eos_idx). ``counter`` is a collections.Counter over the training tokens (without
    "<eos>", since count_file used add_eos=False), ``sym2idx`` an OrderedDict.
    """
    idx2sym = []
    for i in range(N_TOKEN):
        idx2sym.append("<eos>" if i == 0 else PLACED_SYMBOLS.get(i, f"w{i}"))
    assert len(set(idx2sym)) == N_TOKEN

    # strictly decreasing counts, so counter.most_common() reproduces idx2sym[1:]
    counter = collections.Counter()
    for i in range(1, N_TOKEN):
        counter[idx2sym[i]] = 1000 * (N_TOKEN - i) + 7
    assert [s for s, _ in counter.most_common()] == idx2sym[1:]

    vocab = {}
    vocab["counter"] = counter
    vocab["special"] = ["<eos>"]
    vocab["min_freq"] = 0
    vocab["max_size"] = None
    vocab["lower_case"] = False
    vocab["delimiter"] = None
    vocab["vocab_file"] = None
    vocab["idx2sym"] = idx2sym
    vocab["sym2idx"] = collections.OrderedDict((s, i) for i, s in enumerate(idx2sym))
    vocab["eos_idx"] = 0
    return vocab


@torch.no_grad()
def redraw_parameters(model: TransfoXLLMHeadModel, gen: torch.Generator) -> None:
    """Re-draw every parameter at unit scale (HF's std-0.02 init gives ~uniform attention).

    Tied parameters (crit.out_layers[i].weight <-> word_emb.emb_layers[i].weight and
    crit.out_projs[1:] <-> word_emb.emb_projs[1:]) are the same Parameter objects, so
    named_parameters() yields each once and the ties are preserved.
    """

    def normal(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    for name, p in model.named_parameters():
        if p.dim() == 2 and ("emb_layers" in name or "out_layers" in name) and name.endswith("weight"):
            p.copy_(normal(p.shape))  # embedding tables (tied with the adaptive softmax)
        elif "emb_projs" in name or "out_projs" in name:
            # (d_model, d_emb_i): used as F.linear(emb, proj) -> fan_in = d_emb_i
            p.copy_(normal(p.shape, std=p.shape[1] ** -0.5))
        elif name.endswith("r_w_bias") or name.endswith("r_r_bias"):
            p.copy_(normal(p.shape))
        elif "layer_norm" in name and name.endswith("weight"):
            p.copy_(normal(p.shape, std=0.1, mean=1.0))
        elif "layer_norm" in name and name.endswith("bias"):
            p.copy_(normal(p.shape, std=0.1))
        elif name.endswith("layers.0.dec_attn.qkv_net.weight"):
            # layer 0 sees the raw (not layer-normed) input: sqrt(d_model)-scaled unit
            # embeddings (std ~5.7) or 3x inputs_embeds; damp q/k/v so its attention is
            # peaked but not one-hot
            p.copy_(normal(p.shape, std=LAYER0_QKV_DAMP * p.shape[1] ** -0.5))
        elif p.dim() == 2:  # nn.Linear weights (out, in) and cluster_weight
            p.copy_(normal(p.shape, std=p.shape[1] ** -0.5))
        elif p.dim() == 1:  # linear biases, out_layers biases, cluster_bias
            p.copy_(normal(p.shape, std=0.1))
        else:
            raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")


def cluster_of(idx: int, cutoffs) -> int:
    for c, end in enumerate(list(cutoffs) + [N_TOKEN]):
        if idx < end:
            return c
    raise ValueError(idx)


def make_input_ids(gen: torch.Generator) -> list[torch.Tensor]:
    steps = [torch.randint(0, N_TOKEN, (BSZ, q), generator=gen, dtype=torch.int64) for q in QLENS]
    # force cluster boundaries / special ids into the rollout (flattened slot order)
    forced = [0, 19, 20, 59, 60, 149, 150, 299, 24, 1]
    slots = [(t, b, j) for t, q in enumerate(QLENS) for b in range(BSZ) for j in range(q)]
    stride = len(slots) // len(forced)
    for k, tok in enumerate(forced):
        t, b, j = slots[k * stride + (k % 3)]
        steps[t][b, j] = tok
    flat = torch.cat([s.reshape(-1) for s in steps]).tolist()
    hit = {cluster_of(i, CONFIG_KWARGS["cutoffs"]) for i in flat}
    assert hit == {0, 1, 2, 3}, hit
    return steps


def rollout(model, inputs, key: str, want_attn: bool):
    """Run the 7-step rollout, carrying mems; return dict of output tensors."""
    out = {}
    mems = None
    for t, x in enumerate(inputs):
        kwargs = {"input_ids": x} if key == "ids" else {"inputs_embeds": x}
        res = model(mems=mems, output_attentions=want_attn, return_dict=True, **kwargs)
        out[t] = {
            "out": res.last_hidden_state.detach().clone().contiguous(),
            "mems": torch.stack(res.mems, 0).detach().clone().contiguous(),
            "attn": (torch.stack(res.attentions, 0).detach().clone().contiguous() if want_attn else None),
        }
        mems = res.mems
    return out


def attention_report(name: str, per_step) -> None:
    mem_len = CONFIG_KWARGS["mem_len"]
    uniform_entropy = math.log(mem_len)
    print(
        f"[attn] {name}: per layer mean / min of row-max prob; uniform over the {mem_len} visible keys "
        f"would be {1 / mem_len:.3f}; row-entropy mean (uniform = {uniform_entropy:.3f})"
    )
    n_layer = per_step[0]["attn"].shape[0]
    for layer in range(n_layer):
        rowmax, ent = [], []
        for t in per_step:
            a = per_step[t]["attn"][layer]  # (B, H, q, k)
            sums = a.sum(-1)
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
            visible = (a > 0).sum(-1)
            assert int(visible.max()) <= mem_len, "same_length should show at most mem_len keys"
            rowmax.append(a.amax(-1).reshape(-1))
            ent.append(-(a.clamp_min(1e-30).log() * a).sum(-1).reshape(-1))
        rm = torch.cat(rowmax)
        en = torch.cat(ent)
        print(
            f"    layer {layer}: rowmax mean {rm.mean():.3f} min {rm.min():.3f} max {rm.max():.3f} "
            f"(rows > 0.99: {(rm > 0.99).float().mean():.0%}); entropy mean {en.mean():.3f}"
        )
        assert rm.mean() > 2.0 / mem_len, "attention too close to uniform"


def main() -> int:
    if transformers.__version__ != HF_VERSION:
        print(f"ERROR: need transformers=={HF_VERSION}, found {transformers.__version__}", file=sys.stderr)
        return 1
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(SEED)

    MODEL_DIR.mkdir(parents=True, exist_ok=True)

    # ---- 1. config + LM-head checkpoint --------------------------------------------
    config = TransfoXLConfig(**CONFIG_KWARGS)
    assert config.tie_projs == [False, True, True, True], config.tie_projs
    lm = TransfoXLLMHeadModel(config).eval()
    redraw_parameters(lm, gen)
    # ties must survive the re-draw
    for i in range(len(config.cutoffs) + 1):
        assert lm.crit.out_layers[i].weight is lm.transformer.word_emb.emb_layers[i].weight
    for i in range(1, len(config.cutoffs) + 1):
        assert lm.crit.out_projs[i] is lm.transformer.word_emb.emb_projs[i]
    assert lm.crit.out_projs[0] is not lm.transformer.word_emb.emb_projs[0]

    config.save_pretrained(MODEL_DIR)
    state = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    save_file(state, MODEL_DIR / "model.safetensors", metadata={"format": "pt"})
    print(
        f"[ckpt] {len(state)} tensors, e.g. {sorted(state)[:3]} ... crit keys: "
        f"{sorted(k for k in state if k.startswith('crit.'))}"
    )
    assert "transformer.pos_emb.inv_freq" in state

    # ---- 2. vocab.pkl ------------------------------------------------------------------
    vocab = build_vocab_dict()
    with open(MODEL_DIR / "vocab.pkl", "wb") as f:
        pickle.dump(vocab, f, protocol=2)
    with open(MODEL_DIR / "vocab.pkl", "rb") as f:
        back = pickle.load(f)
    assert back == vocab and isinstance(back["counter"], collections.Counter)
    assert isinstance(back["sym2idx"], collections.OrderedDict)
    try:  # optional: HF's own tokenizer must accept the file
        os.environ["TRUST_REMOTE_CODE"] = "True"
        from transformers import TransfoXLTokenizer

        tok = TransfoXLTokenizer(pretrained_vocab_file=str(MODEL_DIR / "vocab.pkl"))
        ids = tok.convert_tokens_to_ids(["<eos>", "the", "dog", "<unk>", "not-in-vocab"])
        assert ids == [0, 1, 64, 24, 24], ids
        assert tok.vocab_size == N_TOKEN and tok.eos_token_id == 0 and tok.unk_token_id == 24
        print(
            f"[vocab] HF TransfoXLTokenizer reads vocab.pkl: vocab_size={tok.vocab_size} "
            f"ids(<eos>,the,dog,<unk>,oov)={ids}"
        )
    except ImportError as exc:  # sacremoses missing
        print(f"[vocab] skipped HF tokenizer check ({exc})")

    # ---- 3. reference outputs from TransfoXLModel loaded from the LM-head checkpoint ---
    model, info = TransfoXLModel.from_pretrained(str(MODEL_DIR), output_loading_info=True)
    model.eval()
    print(
        f"[load] TransfoXLModel(n_layer=4): missing={info['missing_keys']} "
        f"unexpected={info['unexpected_keys']} mismatched={info['mismatched_keys']} "
        f"errors={info['error_msgs']}"
    )
    assert info["missing_keys"] == [] and info["mismatched_keys"] == []
    assert all(k.startswith("crit.") for k in info["unexpected_keys"])
    for k, v in model.state_dict().items():  # weights really came from the file
        assert torch.equal(v, state["transformer." + k]), k

    model2, info2 = TransfoXLModel.from_pretrained(str(MODEL_DIR), n_layer=2, output_loading_info=True)
    model2.eval()
    print(
        f"[load] TransfoXLModel(n_layer=2): missing={info2['missing_keys']} "
        f"unexpected={sorted(info2['unexpected_keys'])} mismatched={info2['mismatched_keys']}"
    )
    assert info2["missing_keys"] == [] and len(model2.layers) == 2

    embeds = [torch.randn(BSZ, q, config.d_model, generator=gen) * EMBEDS_SCALE for q in QLENS]
    input_ids = make_input_ids(gen)

    tensors = {}
    with torch.no_grad():
        tensors["word_emb_all"] = model.word_emb(torch.arange(N_TOKEN)).contiguous()
        r_emb = rollout(model, embeds, "embeds", want_attn=True)
        r_ids = rollout(model, input_ids, "ids", want_attn=True)
        r_ids2 = rollout(model2, input_ids, "ids", want_attn=False)

    attention_report("embeds", r_emb)
    attention_report("ids", r_ids)

    for t in range(len(QLENS)):
        tensors[f"embeds_in_{t}"] = embeds[t].contiguous()
        tensors[f"embeds_out_{t}"] = r_emb[t]["out"]
        tensors[f"embeds_mems_{t}"] = r_emb[t]["mems"]
        tensors[f"ids_in_{t}"] = input_ids[t].contiguous()
        tensors[f"ids_out_{t}"] = r_ids[t]["out"]
        tensors[f"ids_mems_{t}"] = r_ids[t]["mems"]
        tensors[f"ids_attn_{t}"] = r_ids[t]["attn"]
        tensors[f"ids_nlayer2_out_{t}"] = r_ids2[t]["out"]
        tensors[f"ids_nlayer2_mems_{t}"] = r_ids2[t]["mems"]

    # sanity: the n_layer=2 model agrees with the first two layers' mems of the full model
    for t in range(len(QLENS)):
        assert torch.allclose(r_ids2[t]["mems"], r_ids[t]["mems"][:2], atol=1e-5)
        assert not torch.allclose(r_ids2[t]["out"], r_ids[t]["out"], atol=1e-3)
    for name, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int64), (name, v.dtype)
        assert torch.isfinite(v.float()).all(), name

    metadata = {
        "format": "pt",
        "qlens": json.dumps(QLENS),
        "bsz": str(BSZ),
        "n_steps": str(len(QLENS)),
        "embeds_scale": str(EMBEDS_SCALE),
        "seed": str(SEED),
        "config": json.dumps(
            {
                k: CONFIG_KWARGS[k]
                for k in (
                    "vocab_size",
                    "cutoffs",
                    "d_model",
                    "d_embed",
                    "n_head",
                    "d_head",
                    "d_inner",
                    "div_val",
                    "n_layer",
                    "mem_len",
                    "clamp_len",
                    "same_length",
                    "pre_lnorm",
                    "untie_r",
                    "attn_type",
                    "layer_norm_epsilon",
                    "proj_share_all_but_first",
                )
            }
            | {"tie_projs": config.tie_projs}
        ),
        "nlayer2": json.dumps({"n_layer": 2}),
        "generator": f"tests/make_trxl_reference.py; transformers {transformers.__version__}; "
        f"torch {torch.__version__}",
    }
    save_file(tensors, REFERENCE_FILE, metadata=metadata)

    # ---- 4. summary --------------------------------------------------------------------
    with safe_open(REFERENCE_FILE, "pt") as f:
        assert set(f.keys()) == set(tensors)
        assert json.loads(f.metadata()["qlens"]) == QLENS
    total = 0
    for p in sorted([*MODEL_DIR.iterdir(), REFERENCE_FILE]):
        size = p.stat().st_size
        total += size
        print(f"[file] {p.relative_to(REPO_ROOT)}: {size} bytes")
    print(f"[file] total {total} bytes")
    assert total < 1_000_000
    print(f"[ref] {len(tensors)} tensors: {sorted(tensors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
