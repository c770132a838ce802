"""Where the frozen models come from, and SHELM's vocabulary embeddings.

The one module the three training scripts share. It knows
- where a Transformer-XL comes from (Hugging Face hub id, local directory, or the tiny random model
  for tests) and how to read its vocabulary without unpickling arbitrary objects;
- how to load a frozen open_clip model (pretrained tag, local weights file, or a tiny random model);
- how to build SHELM's retrieval table: the CLIP text embedding of every word that CLIP's and the
  Transformer-XL's vocabularies share, with the id of that word in each vocabulary.

Run alone to build the table ahead of time (shelm_ppo.py builds it on first use otherwise):

    python prepare_embeddings.py --clip-model ViT-B-16 --clip-pretrained openai \
        --trxl-model transfo-xl/transfo-xl-wt103 --out-dir data

With --prompts, each word's embedding is the mean CLIP text embedding of the word in prompt templates
("a render of {}", ...), as the original SHELM offered for its 3D environments:

    python prepare_embeddings.py --prompts dmlab                 # the original's templates for Psychlab
    python prepare_embeddings.py --prompts "a photo of {}" "a render of {}"

File format (safetensors, see docs/shelm_ppo.md): tensors `text_embeddings` (n_shared, clip_dim) float32,
L2-normalised; `trxl_ids` and `clip_ids` (n_shared,) int64; metadata (strings) `format`, `clip_model`,
`clip_pretrained`, `clip_text_sha256` (fingerprint of the CLIP text tower), `trxl_model`,
`trxl_vocab_sha256`, `prompts` (JSON list of the templates; absent or [] for the word alone), `n_shared`.
A file whose metadata does not match the models and templates in use is refused.
"""

import collections
import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TINY = "tiny-random"
RANDOM_WT103 = "random-wt103"  # the transfo-xl-wt103 architecture with random weights: speed benchmarks only
RANDOM_CLIP = "random"  # --clip-pretrained random: the CLIP architecture with random weights: speed benchmarks only
EMBEDDINGS_FORMAT = "shelm-vocab-embeddings/1"
WEIGHTS_HELP = (
    "download it once with internet access (it is cached under ~/.cache/huggingface), or pass a local "
    "directory holding config.json, model.safetensors or pytorch_model.bin, and vocab.pkl, or use "
    "--trxl-model tiny-random --clip-model tiny-random for a test run (random weights, learns nothing)"
)


def fail(message):
    """Stop with one clear line on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Transformer-XL sources
# ---------------------------------------------------------------------------------------------


HUB_PROBE_TIMEOUT = 3  # seconds


def hub_offline():
    """Whether the Hugging Face hub is out of reach: HF_HUB_OFFLINE is set, or one request without retries
    fails within HUB_PROBE_TIMEOUT. Without this check the hub client retries for about 30 s before it
    gives up. Found out of reach, the hub client is put in its offline mode (cache only) for the rest
    of the process, so that open_clip's downloads fail at once too."""
    import httpx2  # the hub client's HTTP library
    from huggingface_hub import constants, get_session

    if not constants.HF_HUB_OFFLINE:
        try:  # through the hub client's own session, so that its proxy settings apply
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
        except httpx2.TransportError:
            constants.HF_HUB_OFFLINE = True
    return constants.HF_HUB_OFFLINE


def find_file(source, names):
    """First of `names` found in a local directory or a hub repository (downloaded once, then cached)."""
    source = os.path.expanduser(source)
    if Path(source).is_dir():
        for name in names:
            if (Path(source) / name).is_file():
                return Path(source) / name
        return None
    if Path(source).exists() or source.startswith((".", "/", "~")):
        fail(f"{source!r} is not a directory holding a Transformer-XL")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    for name in names:  # cached files need no network, which also makes offline runs start at once
        cached = try_to_load_from_cache(source, name)
        if isinstance(cached, str):
            return Path(cached)
    if hub_offline():
        fail(f"cannot download {names[0]} of {source!r} (no network, not in the cache): {WEIGHTS_HELP}")
    offline = None
    for name in names:
        try:
            return Path(hf_hub_download(source, name))
        except RemoteEntryNotFoundError:
            continue
        except LocalEntryNotFoundError as e:  # no network and not in the cache: another name may be cached
            offline = e
        except (RepositoryNotFoundError, HFValidationError):
            fail(f"{source!r} is neither a local directory nor a model repository on the Hugging Face hub")
    if offline is not None:
        fail(f"cannot download {names[0]} of {source!r} (no network, not in the cache): {WEIGHTS_HELP}")
    return None


def tiny_vocab():
    """Vocabulary of the tiny random Transformer-XL: 2000 real English words, so SHELM's retrieval has
    something to find. Taken from CLIP's BPE vocabulary in merge order, which ships with open_clip."""
    return ["<eos>", "<unk>"] + clip_words()[:1998]


def clip_words():
    """The whole lower-case English words (longer than one letter) of CLIP's BPE vocabulary, in merge order."""
    from open_clip.tokenizer import SimpleTokenizer

    words = [t[:-4] for t in SimpleTokenizer().encoder if t.endswith("</w>") and len(t) > 5]
    return [w for w in words if w.isascii() and w.isalpha() and w.islower()]


def random_vocab(n_token):
    """A vocabulary of n_token distinct words for random-weight models: CLIP's words (so SHELM retrieves
    among about as many shared words as with the real wt103 vocabulary), then placeholders."""
    words = ["<eos>", "<unk>"] + clip_words()[: n_token - 2]
    return words + [f"<random-{i}>" for i in range(len(words), n_token)]


# config.json of transfo-xl/transfo-xl-wt103: random-wt103 has these shapes
WT103_CONFIG = {
    "vocab_size": 267735,
    "cutoffs": [20000, 40000, 200000],
    "div_val": 4,
    "d_model": 1024,
    "d_embed": 1024,
    "n_head": 16,
    "d_head": 64,
    "d_inner": 4096,
    "n_layer": 18,
    "clamp_len": 1000,
    "same_length": True,
    "untie_r": True,
    "pre_lnorm": False,
    "attn_type": 0,
    "adaptive": True,
    "layer_norm_epsilon": 1e-5,
}

# the same architecture at a tiny size (tests, and the machinery checks of `tiny-random`)
TINY_TRXL_CONFIG = WT103_CONFIG | {
    "vocab_size": 2000,
    "cutoffs": [200, 800],
    "d_model": 64,
    "d_embed": 64,
    "n_head": 4,
    "d_head": 16,
    "d_inner": 128,
}


class _VocabUnpickler(pickle.Unpickler):
    """vocab.pkl is a pickled dict of plain containers; anything else in it is refused, so loading a
    vocabulary can never run code."""

    ALLOWED = {
        ("collections", "Counter"): collections.Counter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a vocabulary holds only plain containers")


def read_vocab(path):
    """idx2sym of a Transformer-XL vocab.pkl, read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            data = _VocabUnpickler(f).load()
            # a legacy torch.save file is a stream of pickles: magic number, protocol, sys info, object
            for _ in range(3):
                if isinstance(data, dict) and "idx2sym" in data:
                    break
                data = _VocabUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        fail(f"vocabulary {path} is not a plain Transformer-XL vocab.pkl ({e})")
    idx2sym = data.get("idx2sym") if isinstance(data, dict) else None
    if not isinstance(idx2sym, list) or not idx2sym or not all(isinstance(s, str) for s in idx2sym):
        fail(f"vocabulary {path} has no idx2sym list of strings")
    return idx2sym


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


# a config.json naming more parameters than this is a mistake or an attack, not a Transformer-XL (wt103: 0.3e9)
MAX_TRXL_PARAMETERS = 2**32


def validate_trxl_config(config, path):
    """The Transformer-XL config.json with every field the model reads checked for type and range, so a
    config from elsewhere ends in one line, not in a traceback or an allocation of absurd size."""
    if not isinstance(config, dict):
        fail(f"{path} holds a {type(config).__name__}, not a Transformer-XL config (a JSON object)")
    config = dict(config)
    config.setdefault("vocab_size", config.get("n_token"))
    sizes = ["vocab_size", "d_model", "d_embed", "n_head", "d_head", "d_inner", "n_layer", "div_val"]
    missing = [k for k in [*sizes, "cutoffs", "clamp_len", "same_length"] if config.get(k) is None]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}: not a Transformer-XL config")
    for key in sizes:
        if not is_int(config[key]) or config[key] < 1:
            fail(f"{path}: {key} must be a positive integer, got {config[key]!r}")
    if config["d_model"] % 2:
        fail(f"{path}: d_model must be even (sine and cosine positions), got {config['d_model']}")
    if not is_int(config["clamp_len"]) or not isinstance(config["same_length"], bool):
        fail(f"{path}: clamp_len must be an integer and same_length true or false")
    cutoffs = config["cutoffs"]
    if not (
        isinstance(cutoffs, list)
        and all(is_int(c) for c in cutoffs)
        and all(a < b for a, b in zip([0, *cutoffs], [*cutoffs, config["vocab_size"]]))
    ):
        fail(f"{path}: cutoffs must be increasing integers within vocab_size {config['vocab_size']}, got {cutoffs!r}")
    if config["d_embed"] // config["div_val"] ** len(cutoffs) < 1:
        fail(f"{path}: d_embed {config['d_embed']} leaves no width for the last cluster at div_val {config['div_val']}")
    eps = config.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        fail(f"{path}: layer_norm_epsilon must be a small positive number, got {eps!r}")
    d_model, width = config["d_model"], config["n_head"] * config["d_head"]
    per_layer = 4 * width * d_model + 2 * d_model * config["d_inner"]
    ends = [0, *cutoffs, config["vocab_size"]]
    embedding = sum(
        (ends[i + 1] - ends[i] + d_model) * (config["d_embed"] // config["div_val"] ** i) for i in range(len(ends) - 1)
    )
    if config["n_layer"] * per_layer + embedding > MAX_TRXL_PARAMETERS:
        fail(f"{path}: its sizes make a model of more than {MAX_TRXL_PARAMETERS:,} parameters")
    return config


def trxl_source(source, weights=True):
    """(config dict, weights file, idx2sym) of a Transformer-XL source; the weights file is None for
    the random models and when not asked for (the vocabulary alone needs no 1 GB download)."""
    if source == TINY:
        vocab = tiny_vocab()
        return dict(TINY_TRXL_CONFIG, vocab_size=len(vocab)), None, vocab
    if source == RANDOM_WT103:
        return dict(WT103_CONFIG), None, random_vocab(WT103_CONFIG["vocab_size"])
    config_file = find_file(source, ["config.json"])
    if config_file is None:
        fail(f"{source!r} has no config.json")
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as e:
        fail(f"{config_file} is not a readable JSON config ({e})")
    config = validate_trxl_config(config, config_file)
    weights_file = None
    if weights:
        weights_file = find_file(source, ["model.safetensors", "pytorch_model.bin"])
        if weights_file is None:
            fail(f"{source!r} has neither model.safetensors nor pytorch_model.bin")
    vocab_file = find_file(source, ["vocab.pkl"])
    if vocab_file is None:
        fail(f"{source!r} has no vocab.pkl")
    return config, weights_file, read_vocab(vocab_file)


def read_state_dict(path):
    """Tensors of a safetensors or torch checkpoint file, all finite; never unpickles arbitrary objects."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files written before torch's zip format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        fail(f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    validate_tensors(state, f"weights {path}")
    return state


def validate_tensors(state, what):
    """A state dict: a flat dict of named tensors, none of them NaN or infinite."""
    if not isinstance(state, dict):
        fail(f"{what} hold a {type(state).__name__}, not a dict of named tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            fail(f"{what}: entry {key!r} is a {type(value).__name__}, not a named tensor")
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            fail(f"{what}: tensor {key} holds NaN or infinite values")


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------

# Same architectures as ViT-B-16 and RN50, a few thousand times smaller: for tests and benchmarks only.
TINY_CLIP_CONFIGS = {
    "ViT": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "RN": {
        "embed_dim": 64,  # = the tiny Transformer-XL's d_model, as RN50's 1024 is wt103's
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
}


@contextlib.contextmanager
def root_log_level(level):
    """The root logger (open_clip logs there) at `level` within the block."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


def load_clip(name, pretrained, device, tiny_kind="ViT"):
    """Frozen open_clip model in eval mode. `pretrained` is an open_clip tag ('openai') or a weights file,
    or `random`: the architecture with random weights (the same in every process), for speed benchmarks."""
    import open_clip

    if name == TINY or (pretrained == RANDOM_CLIP and name in open_clip.list_models()):
        if name == TINY:
            name = f"helm-tiny-{tiny_kind.lower()}"
        if name not in open_clip.list_models():
            with tempfile.TemporaryDirectory(prefix="helm-tiny-clip-") as config_dir:  # read at once by open_clip
                (Path(config_dir) / f"{name}.json").write_text(json.dumps(TINY_CLIP_CONFIGS[tiny_kind]))
                open_clip.add_model_config(config_dir)
        # open_clip warns that random weights are random
        with root_log_level(logging.ERROR), torch.random.fork_rng(devices=[]):  # the same model in every process
            torch.manual_seed(0)
            model = open_clip.create_model(name, pretrained=None)
    else:
        if name not in open_clip.list_models():
            fail(f"unknown CLIP model {name!r} (open_clip knows e.g. ViT-B-16, RN50)")
        if not Path(pretrained).is_file():
            hub_offline()  # out of reach: open_clip then finds cached weights or fails at once, without retries
        try:
            with root_log_level(logging.CRITICAL):  # open_clip logs its failures before raising them
                model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
        except Exception as e:  # noqa: BLE001 - network, cache and format failures all end here
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            fail(
                f"cannot load CLIP {name} weights {pretrained!r} ({first}); download them once with internet "
                "access, or pass --clip-pretrained /path/to/open_clip_model.safetensors, or use "
                "--clip-model tiny-random for a test run"
            )
        bad = next((n for n, p in model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()), None)
        if bad is not None:
            fail(f"CLIP {name} weights {pretrained!r}: tensor {bad} holds NaN or infinite values")
    return model.to(device).eval().requires_grad_(False)


def clip_text_dim(clip):
    """Width of CLIP's text embeddings (the rows of the embeddings file)."""
    projection = clip.text_projection
    return projection.out_features if isinstance(projection, torch.nn.Linear) else projection.shape[-1]


def clip_image_features(clip, images):
    """CLIP image embeddings of a uint8 batch (B, H, W, 3): CLIP's resize, centre crop and
    normalisation applied to the whole batch on its device instead of image by image with PIL."""
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = torch.tensor(getattr(clip.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = torch.tensor(getattr(clip.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    x = images.permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    # sizes truncated as torchvision's Resize does; antialiasing matters only when shrinking, as PIL's
    x = F.interpolate(x, size=(int(h * scale), int(w * scale)), mode="bicubic", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0.0, 1.0)  # PIL clamps bicubic overshoot too
    x = (x - mean.to(x.device)[:, None, None]) / std.to(x.device)[:, None, None]
    weights = next(iter(clip.visual.parameters()), None) if isinstance(clip.visual, torch.nn.Module) else None
    return clip.encode_image(x if weights is None else x.to(weights.dtype)).float()  # CLIP may be bfloat16


def encode_words(clip, clip_ids, batch_size=1024):
    """CLIP text embedding of each single-token word, as clip.encode_text(tokenize(word)) computes it.
    The text tower is causal and pools at the end-of-text token, so [SOT, word, EOT] needs only the
    first 3 of the 77 positions: 25x less work, the same result."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    sot, eot = tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"]
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(clip_ids), batch_size):
        ids = torch.as_tensor(clip_ids[i : i + batch_size], dtype=torch.long, device=device)
        text = torch.stack([torch.full_like(ids, sot), ids, torch.full_like(ids, eot)], dim=1)
        with torch.no_grad():
            x = clip.token_embedding(text) + clip.positional_embedding[:3]
            x = clip.transformer(x, attn_mask=clip.attn_mask[:3, :3])
            x = clip.ln_final(x)[:, -1]
            x = (
                x @ clip.text_projection
                if not isinstance(clip.text_projection, torch.nn.Linear)
                else clip.text_projection(x)
            )
        out.append(x.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.text_projection.shape[-1])


# The prompt templates of the original SHELM (github ml-jku/helm, variables.py): dmlab for Psychlab (DeepMind Lab),
# avalon for Avalon. Its MiniGrid and MiniWorld runs embedded the word alone.
PROMPT_PRESETS = {
    "dmlab": [
        "a render of {}",
        "a render of a {}",
        "a screenshot of a {}",
        "a screenshot of {}",
        "a screen showing {}",
        "a screen showing a {}",
    ],
    "avalon": [
        "a screenshot of {}",
        "a screenshot of a {}",
        "a screenshot of many {}",
        "a biome containing {}",
        "a biome containing a {}",
        "a biome containing many {}",
        "a biome full of {}",
    ],
}


def prompt_templates(prompts):
    """The templates of --prompts: each given one holds {} once for the word; a preset name stands for its list."""
    templates = []
    for prompt in prompts:
        rest = prompt.replace("{}", "", 1)
        if prompt in PROMPT_PRESETS:
            templates += PROMPT_PRESETS[prompt]
        elif "{}" in prompt and "{" not in rest and "}" not in rest:
            templates.append(prompt)
        else:
            presets = ", ".join(PROMPT_PRESETS)
            fail(f"prompt {prompt!r} is neither a template with one {{}} for the word nor a preset ({presets})")
    return templates


def encode_prompted_words(clip, words, templates, batch_size=1024):
    """Mean over the templates of the CLIP text embedding of each word in each template, each text embedded
    as clip.encode_text(tokenize(text)) does. As in encode_words, the causal tower runs only as many
    positions as the longest text of a batch needs (shorter ones are padded after their end-of-text token)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    sot, eot = tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"]
    context = clip.positional_embedding.shape[0]
    texts = []
    for word in words:
        for template in templates:
            ids = [sot, *tok.encode(template.format(word)), eot]
            texts.append(ids[: context - 1] + [eot] if len(ids) > context else ids)  # truncated as tokenize does
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = texts[i : i + batch_size]
        n = max(len(ids) for ids in batch)
        text = torch.tensor([ids + [0] * (n - len(ids)) for ids in batch], dtype=torch.long, device=device)
        ends = torch.tensor([len(ids) - 1 for ids in batch], device=device)
        with torch.no_grad():
            x = clip.token_embedding(text) + clip.positional_embedding[:n]
            x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
            x = clip.ln_final(x)[torch.arange(len(batch), device=device), ends]
            x = (
                x @ clip.text_projection
                if not isinstance(clip.text_projection, torch.nn.Linear)
                else clip.text_projection(x)
            )
        out.append(x.float().cpu())
    return torch.cat(out).view(len(words), len(templates), -1).mean(dim=1)


def clip_text_sha256(clip):
    """Fingerprint of the CLIP text tower: a stale embeddings file made with other weights is detected."""
    h = hashlib.sha256()
    for name, p in clip.state_dict().items():
        if not name.startswith("visual.") and p.dtype.is_floating_point:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The shared vocabulary and its embeddings file
# ---------------------------------------------------------------------------------------------


def shared_vocabulary(trxl_vocab):
    """(clip_ids, trxl_ids, words) of the words both tokenizers have as one whole token.

    CLIP's BPE marks a token that ends a word with '</w>': 'dog</w>' is the word "dog", while 'dog'
    alone is only the start of a longer word ("dogs"). The original SHELM compared CLIP's decoded
    tokens ('dog ', with the marker turned into a trailing space) to Transformer-XL words, so no
    word-final token ever matched; here the marker is stripped before matching."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    trxl_index = {}
    for i, sym in enumerate(trxl_vocab):
        trxl_index.setdefault(sym, i)
    clip_ids, trxl_ids, words = [], [], []
    for bpe, clip_id in sorted(tok.encoder.items(), key=lambda kv: kv[1]):
        if not bpe.endswith("</w>"):
            continue
        try:
            word = bytearray(tok.byte_decoder[c] for c in bpe[:-4]).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if word in trxl_index:
            clip_ids.append(clip_id)
            trxl_ids.append(trxl_index[word])
            words.append(word)
    return clip_ids, trxl_ids, words


def embeddings_path(out_dir, clip_model, clip_pretrained, trxl_model, meta):
    """One file per (CLIP text tower, Transformer-XL vocabulary, prompt templates) content: the names make it
    readable, the fingerprint of the contents makes it unique (two local models named alike get two files)."""

    def slug(s):
        return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(s)).name if os.sep in str(s) else str(s)).strip("-")

    content = " ".join(meta[k] for k in ("clip_text_sha256", "trxl_vocab_sha256", "prompts"))
    name = f"shelm_vocab__{slug(clip_model)}__{slug(clip_pretrained)}__{slug(trxl_model)}"[:160]
    return Path(out_dir) / f"{name}__{hashlib.sha256(content.encode()).hexdigest()[:16]}.safetensors"


def expected_metadata(clip, clip_model, clip_pretrained, trxl_model, trxl_vocab, templates=()):
    clip_pretrained = "none" if clip_model == TINY else clip_pretrained
    return {
        "format": EMBEDDINGS_FORMAT,
        "clip_model": str(clip_model),
        "clip_pretrained": str(clip_pretrained),
        "clip_text_sha256": clip_text_sha256(clip),
        "trxl_model": str(trxl_model),
        "trxl_vocab_sha256": hashlib.sha256("\n".join(trxl_vocab).encode()).hexdigest(),
        "prompts": json.dumps(list(templates)),
    }


# what an embeddings file must agree on with the models in use; the names are for people (a model moved
# to another directory still has the same vocabulary, and so the same embeddings)
MATCHING_METADATA = ("format", "clip_text_sha256", "trxl_vocab_sha256", "prompts")


def read_embeddings(path, expected, dim, vocab_size):
    """Tensors of an embeddings file after checking it was made from the models in use, and that its
    tensors are what the retrieval reads: (n, dim) finite unit rows, n Transformer-XL ids in range."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("text_embeddings", "trxl_ids", "clip_ids")}
    except Exception as e:  # noqa: BLE001
        fail(f"embeddings file {path} is corrupt ({type(e).__name__}); rebuild it with prepare_embeddings.py --force")
    meta = {"prompts": "[]", **meta}  # written before prompts existed: the word alone
    if meta["prompts"] != expected["prompts"]:
        fail(
            f"embeddings file {path} was made with the prompt templates {meta['prompts']}, not "
            f"{expected['prompts']}; build one for these with prepare_embeddings.py --prompts ..."
        )
    stale = [k for k in MATCHING_METADATA if meta.get(k) != expected[k]]
    if stale:
        fail(
            f"embeddings file {path} was made from other models or an older format (differs in {', '.join(stale)}); "
            "rebuild it with prepare_embeddings.py --force"
        )
    emb, trxl_ids, clip_ids = tensors["text_embeddings"], tensors["trxl_ids"], tensors["clip_ids"]
    n = emb.shape[0] if emb.dim() == 2 else -1
    problem = None
    if not (emb.dim() == 2 and n >= 1 and emb.shape[1] == dim and emb.is_floating_point()):
        problem = f"text_embeddings is {emb.dtype} {tuple(emb.shape)}, not float (n, {dim})"
    elif any(t.dtype != torch.long or tuple(t.shape) != (n,) for t in (trxl_ids, clip_ids)):
        problem = f"trxl_ids and clip_ids must be int64 ({n},), got {tuple(trxl_ids.shape)} and {tuple(clip_ids.shape)}"
    elif meta.get("n_shared", str(n)) != str(n):
        problem = f"n_shared {meta.get('n_shared')!r} but {n} rows"
    elif not torch.isfinite(emb).all() or not torch.allclose(emb.norm(dim=-1), torch.ones(n), atol=1e-3):
        problem = "text_embeddings are not finite unit vectors"
    elif trxl_ids.min() < 0 or trxl_ids.max() >= vocab_size or clip_ids.min() < 0:
        problem = f"ids out of range (Transformer-XL ids must lie in [0, {vocab_size}), CLIP ids be >= 0)"
    if problem:
        fail(f"embeddings file {path} is malformed: {problem}; rebuild it with prepare_embeddings.py --force")
    return tensors


def write_atomically(path, write):
    """Call write(f) on a new temporary file in the same directory, fsync, rename it over `path`, fsync the
    directory: a crash or a full disk leaves any previous file untouched and no half-written one behind.
    The temporary file is created anew (O_EXCL, a random name), so a link planted in the directory
    is never followed; the rename replaces the name `path`, even if it is a link, never a link's target."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        # O_EXCL: a new file or an error, even if a link stands at that name; mode 0o666 less the umask
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        tmp = name  # ours to remove from here on
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut too
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        _remove(tmp)
        fail(f"could not write {path}: {e.strerror or e}; nothing was overwritten")
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    if path is not None:  # None: not created (the name was taken)
        with contextlib.suppress(OSError):  # already renamed, or its directory is not one
            path.unlink()


def build_embeddings(
    clip,
    clip_model,
    clip_pretrained,
    trxl_model,
    trxl_vocab,
    out_dir,
    force=False,
    verbose=True,
    templates=(),
    may_write=True,
):
    """Path of the embeddings file for these models and prompt templates, built if absent (or with force) and
    may_write."""
    from safetensors.torch import save

    meta = expected_metadata(clip, clip_model, clip_pretrained, trxl_model, trxl_vocab, templates)
    path = embeddings_path(out_dir, clip_model, meta["clip_pretrained"], trxl_model, meta)
    if path.exists() and not force:
        read_embeddings(path, meta, clip_text_dim(clip), len(trxl_vocab))
        if verbose:
            print(f"embeddings up to date: {path}")
        return path
    if not may_write:
        fail(
            f"embeddings file {path} does not exist, and the checkpoint's embeddings_dir is outside the working "
            "directory: a checkpoint cannot have files written there; give --embeddings-dir"
        )
    clip_ids, trxl_ids, words = shared_vocabulary(trxl_vocab)
    if not clip_ids:
        fail(f"CLIP and {trxl_model} share no word: is the vocabulary a Transformer-XL word vocabulary?")
    if verbose:
        print(f"CLIP and {trxl_model} share {len(words)} words; encoding them with CLIP {clip_model}")
    if templates:
        if verbose:
            print(f"each word in {len(templates)} prompt templates: {templates}")
        emb = F.normalize(encode_prompted_words(clip, words, templates), dim=-1)
    else:
        emb = F.normalize(encode_words(clip, clip_ids), dim=-1)
    tensors = {
        "text_embeddings": emb.contiguous(),
        "trxl_ids": torch.tensor(trxl_ids, dtype=torch.long),
        "clip_ids": torch.tensor(clip_ids, dtype=torch.long),
    }
    # serialized in memory, written by Python: safetensors reports a full disk as its own error, not OSError
    data = save(tensors, metadata=dict(meta, n_shared=str(len(words))))
    write_atomically(path, lambda f: f.write(data))
    if verbose:
        print(f"wrote {path}")
    return path


@dataclass
class Args:
    clip_model: str = "ViT-B-16"
    """open_clip model name, or tiny-random"""
    clip_pretrained: str = "openai"
    """open_clip pretrained tag or a local weights file"""
    trxl_model: str = "transfo-xl/transfo-xl-wt103"
    """Transformer-XL: hub id, local directory, or tiny-random"""
    out_dir: str = "data"
    """directory of the embeddings files"""
    prompts: tuple[str, ...] = ()
    """prompt templates with {} for the word, or a preset of the original (dmlab, avalon); none: the word alone"""
    force: bool = False
    """rebuild even if an up-to-date file exists"""
    cuda: bool = True
    """use CUDA when available"""


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    templates = prompt_templates(args.prompts)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    _, _, vocab = trxl_source(args.trxl_model, weights=False)
    clip = load_clip(args.clip_model, args.clip_pretrained, device)
    build_embeddings(
        clip,
        args.clip_model,
        args.clip_pretrained,
        args.trxl_model,
        vocab,
        args.out_dir,
        force=args.force,
        templates=templates,
    )
    sys.exit(0)
