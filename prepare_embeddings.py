"""SHELM's vocabulary embeddings: the table its token retrieval searches.

For every word that CLIP's and the Transformer-XL's vocabularies share, the CLIP text embedding of that
word, with the word's id in each vocabulary. shelm_ppo.py builds the table on first use; run this file to
build it ahead of time:

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
A file whose metadata does not match the models and templates in use is refused. Where the models
themselves come from: helm_utils/frozen_models.py.
"""

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from helm_utils import fail
from helm_utils.files import write_atomically
from helm_utils.frozen_models import TINY, load_clip, trxl_source

EMBEDDINGS_FORMAT = "shelm-vocab-embeddings/1"


# ---------------------------------------------------------------------------------------------
# CLIP's text embeddings of the words
# ---------------------------------------------------------------------------------------------


def clip_text_dim(clip):
    """Width of CLIP's text embeddings (the rows of the embeddings file)."""
    projection = clip.text_projection
    return projection.out_features if isinstance(projection, torch.nn.Linear) else projection.shape[-1]


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
