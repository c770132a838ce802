"""Where the frozen models come from: the Transformer-XL (Hugging Face hub id, local directory, or random
models of the real or a tiny size) with its vocabulary, and CLIP (open_clip). Files from elsewhere are read
without running code and checked before use, so a bad one ends in one line, not a traceback."""

import collections
import contextlib
import gzip
import importlib.util
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from helm_utils import fail
from helm_utils.files import read_state_dict, write_new

TINY = "tiny-random"
WT103_HUB_ID = "transfo-xl/transfo-xl-wt103"  # the scripts' default: WT103_CONFIG below is its config.json
RANDOM_WT103 = "random-wt103"  # the transfo-xl-wt103 architecture with random weights: speed benchmarks only
RANDOM_CLIP = "random"  # --clip-pretrained random: the CLIP architecture with random weights: speed benchmarks only
WEIGHTS_HELP = (
    "download it once with internet access (it is cached under ~/.cache/huggingface), or pass a local "
    "directory holding config.json, model.safetensors or pytorch_model.bin, and vocab.pkl, or use "
    "--trxl-model tiny-random --clip-model tiny-random for a test run (random weights: they check the machinery)"
)


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
    """The whole lower-case English words (longer than one letter) of CLIP's BPE vocabulary, in merge order.

    Read from the merges file that ships with open_clip as its SimpleTokenizer reads it, without importing
    open_clip: that imports torchvision and timm, seconds that a run of HELM's tiny random model does not need
    (tests/test_shelm.py checks the words against SimpleTokenizer's)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        fail("the tiny random models take their words from open_clip (pip install open_clip_torch)")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    tokens = dict.fromkeys("".join(merge.split()) for merge in merges)  # SimpleTokenizer's encoder keeps the first
    words = [t[:-4] for t in tokens if t.endswith("</w>") and len(t) > 5]
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
    except (MemoryError, RecursionError, OverflowError) as e:  # a frame or a nesting of absurd size
        fail(f"vocabulary {path} is not a plain Transformer-XL vocab.pkl ({type(e).__name__})")
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
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested beyond Python's stack
        fail(f"{config_file} is not a readable JSON config ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
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


# what the scripts' Transformer-XL implements: the wt103 model's choices
SUPPORTED_TRXL = {"adaptive": True, "untie_r": True, "pre_lnorm": False, "attn_type": 0}


def check_supported(config, vocab, source, n_layer):
    """One line for a Transformer-XL the scripts cannot run, or an --n-layer it does not have."""
    for key, want in SUPPORTED_TRXL.items():
        if config.get(key, want) != want:
            fail(f"{source}: {key}={config.get(key)} is not supported (the wt103 model has {key}={want})")
    if config.get("div_val", 1) < 2:
        fail(f"{source}: div_val={config.get('div_val')} is not supported (adaptive embeddings need div_val > 1)")
    if not 1 <= n_layer <= config["n_layer"]:
        fail(f"--n-layer must be between 1 and {config['n_layer']} for {source}, got {n_layer}")
    if len(vocab) != config["vocab_size"]:
        fail(f"{source}: the vocabulary has {len(vocab)} words but the model {config['vocab_size']}")


def load_trxl_weights(trxl, weights, n_layer, source):
    """Load the first n_layer layers of a Transformer-XL weights file (the official checkpoint is the LM-head
    model: its `transformer.` prefix is dropped, its softmax head and inv_freq buffer skipped) into trxl."""
    state = {}
    for key, value in read_state_dict(weights).items():
        key = key.removeprefix("transformer.")
        if key.startswith("crit.") or key == "pos_emb.inv_freq":
            continue
        layer = key.split(".")[1] if key.startswith("layers.") else ""
        if layer.isdigit() and int(layer) >= n_layer:  # other keys that are no parameter fail to load below
            continue
        state[key] = value
    try:
        trxl.load_state_dict(state)
    except RuntimeError as e:
        fail(f"weights {weights} do not fit the Transformer-XL of {source}: {' '.join(str(e).split())[:300]}")


def resolve_frozen_dtype(name, device):
    """torch dtype of --frozen-dtype: auto is bfloat16 where matrix products in it are fast (CUDA, CPUs
    with AVX512-BF16 or AMX), float32 elsewhere."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            name = "bfloat16" if torch.backends.mkldnn.is_available() and mkldnn_bf16_supported() else "float32"
    return getattr(torch, name)


def mkldnn_bf16_supported():
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------

# Same architectures as ViT-B-16 and RN50, a few thousand times smaller: for tests and benchmarks only.
TINY_CLIP_CONFIGS = {
    "ViT": {
        "embed_dim": 32,
        # the patch tokens' mean rather than the class token, which starts as the same vector for every image
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 8, "pool_type": "avg"},
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
                config = json.dumps(TINY_CLIP_CONFIGS[tiny_kind]).encode()
                write_new(Path(config_dir) / f"{name}.json", lambda f: f.write(config))
                open_clip.add_model_config(config_dir)
        # open_clip warns that random weights are random
        with root_log_level(logging.ERROR), torch.random.fork_rng(devices=[]):  # the same model in every process
            torch.manual_seed(0)
            model = open_clip.create_model(name, pretrained=None)
        if name == "helm-tiny-vit":
            spread_tiny_vit(model)
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


def spread_tiny_vit(model):
    """Make the tiny random ViT tell frames apart, as SHELM's retrieval needs (test models only: the real models
    and `random` weights of the real architectures stay as open_clip makes them).

    At open_clip's initialisation a transformer is close to the identity (each block's output projection is
    scaled down by the depth), so a random ViT maps every frame to nearly one direction (cosine 0.99 between
    frames) and SHELM retrieved one word for all of them: no test, probe or study could see its memory. A
    trained CLIP separates images. Here the vision blocks' weights are three times larger, a more non-linear
    map (cosine about 0.5 to 0.8 between frames), and a word's text embedding depends on the word alone: the
    start and end tokens and the positions, the same in every prompt, are zero. Different frames then retrieve
    different words, and the context of MiniGrid-Memory and bsuite's memory tasks shows in the words
    (docs/probe.md)."""
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            for weight in (
                block.attn.in_proj_weight,
                block.attn.out_proj.weight,
                block.mlp.c_fc.weight,
                block.mlp.c_proj.weight,
            ):
                weight.mul_(3.0)
        model.token_embedding.weight[-2:].zero_()  # <start_of_text> and <end_of_text>, the vocabulary's last two
        model.positional_embedding.zero_()


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
