"""SHELM's frozen encoder: the shared vocabulary, its CLIP embeddings file, image preprocessing,
token retrieval and its cache, and how the Transformer-XL memory is reset between episodes."""

import copy
import errno
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from open_clip.tokenizer import SimpleTokenizer, tokenize

import prepare_embeddings
import shelm_ppo
from conftest import ROOT, assert_no_near_ties
from helm_utils import files, frozen_models

TINY = frozen_models.TINY
FIXTURE_TRXL = ROOT / "tests" / "fixtures" / "tiny_trxl"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def clip():
    return frozen_models.load_clip(TINY, "openai", "cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer()


def clip_key(tokenizer, word):
    """CLIP's BPE spelling of a whole word: its UTF-8 bytes mapped to printable characters."""
    return "".join(tokenizer.byte_encoder[b] for b in word.encode("utf-8")) + "</w>"


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------


def brute_force_retrieval(image_features, text_embeddings, trxl_ids, k):
    out = []
    for a in image_features.tolist():
        norm_a = math.sqrt(sum(x * x for x in a))
        sims = []
        for j, b in enumerate(text_embeddings.tolist()):
            norm_b = math.sqrt(sum(x * x for x in b))
            sims.append((sum(x * y for x, y in zip(a, b)) / (norm_a * norm_b), j))
        sims.sort(reverse=True)
        # the data must not hold near-ties, or the order would be a matter of rounding
        assert all(sims[i][0] - sims[i + 1][0] > 1e-5 for i in range(k))
        out.append([int(trxl_ids[j]) for _, j in sims[:k]])
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_retrieve_tokens_matches_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    image_features = torch.randn(9, 16, generator=gen) * 5  # not normalised: cosine must not care
    text_embeddings = F.normalize(torch.randn(60, 16, generator=gen), dim=-1)
    trxl_ids = torch.randperm(1000, generator=gen)[:60]
    got = shelm_ppo.retrieve_tokens(image_features, text_embeddings, trxl_ids, k)
    assert got.dtype == torch.long and got.shape == (9, k)
    assert got.tolist() == brute_force_retrieval(image_features, text_embeddings, trxl_ids, k)


# ---------------------------------------------------------------------------------------------
# shared vocabulary and word embeddings
# ---------------------------------------------------------------------------------------------


def test_shared_vocabulary_maps_whole_words_only(tokenizer):
    encoder = tokenizer.encoder
    # BPE pieces CLIP has only as the start of longer words (no 'piece</w>')
    pieces = [t for t in encoder if t.isascii() and t.isalpha() and len(t) > 3 and t + "</w>" not in encoder][:3]
    assert len(pieces) == 3
    trxl_vocab = ["<eos>", "<unk>", "dog", "key", "dogs", "café", "xqztv", "the", "dog", "door", *pieces, "ing", ","]
    clip_ids, trxl_ids, words = prepare_embeddings.shared_vocabulary(trxl_vocab)

    expected = set()
    for i, word in enumerate(trxl_vocab):
        key = clip_key(tokenizer, word)
        if key in encoder and trxl_vocab.index(word) == i:  # a repeated word keeps its first id
            expected.add((encoder[key], i, word))
    assert {"dog", "key", "dogs", "café", "the", "door", "ing", ","} == {w for _, _, w in expected}
    assert set(zip(clip_ids, trxl_ids, words)) == expected
    assert len(words) == len(expected)  # no duplicates
    assert not set(pieces) & set(words) and "xqztv" not in words
    for clip_id, trxl_id, word in zip(clip_ids, trxl_ids, words):
        assert tokenizer.decoder[clip_id].endswith("</w>")
        assert tokenizer.decode([clip_id]).strip() == word == trxl_vocab[trxl_id]


def test_clip_words_are_those_of_the_clip_tokenizer(tokenizer):
    # frozen_models reads CLIP's merges file itself (importing open_clip costs seconds): the same words, in order
    words = [t[:-4] for t in tokenizer.encoder if t.endswith("</w>") and len(t) > 5]
    assert frozen_models.clip_words() == [w for w in words if w.isascii() and w.isalpha() and w.islower()]
    assert frozen_models.tiny_vocab()[:6] == ["<eos>", "<unk>", "the", "ing", "on", "er"]


def test_shared_vocabulary_of_tiny_and_fixture_models(tokenizer):
    tiny = frozen_models.tiny_vocab()
    _, trxl_ids, words = prepare_embeddings.shared_vocabulary(tiny)
    # the tiny vocabulary is made of CLIP words: all but <eos> and <unk> are shared
    assert sorted(trxl_ids) == list(range(2, len(tiny)))
    fixture = frozen_models.read_vocab(FIXTURE_TRXL / "vocab.pkl")
    _, trxl_ids, words = prepare_embeddings.shared_vocabulary(fixture)
    expected = {w for w in fixture if clip_key(tokenizer, w) in tokenizer.encoder}
    assert set(words) == expected and {"dog", "key", "ball", "café", "the"} <= expected
    assert [fixture[i] for i in trxl_ids] == words


def test_encode_words_equals_encode_text(clip, tokenizer):
    words = ["dog", "key", "door", "ball", "green", "café", "the"]
    clip_ids = [tokenizer.encoder[clip_key(tokenizer, w)] for w in words]
    # the tokenizer really spells each as one token between start and end of text
    text = tokenize(words)
    assert (text[:, 1] == torch.tensor(clip_ids)).all() and (text[:, 3] == 0).all()
    with torch.no_grad():
        expected = clip.encode_text(text).float()
    got = prepare_embeddings.encode_words(clip, clip_ids, batch_size=3)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_encode_prompted_words_is_the_mean_of_encode_text(clip):
    words, templates = ["dog", "key", "café"], ["a render of {}", "{}", "a screenshot of many {} in a maze"]
    with torch.no_grad():
        expected = torch.stack([clip.encode_text(tokenize([t.format(w) for t in templates])).mean(0) for w in words])
    got = prepare_embeddings.encode_prompted_words(clip, words, templates, batch_size=4)  # batches of mixed lengths
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    # one template "{}" is the word alone, as encode_words embeds it
    alone = prepare_embeddings.encode_prompted_words(clip, words, ["{}"])
    assert (alone - prepare_embeddings.encode_words(clip, tokenize(words)[:, 1].tolist())).abs().max().item() <= 1e-5


def test_prompt_templates_and_presets():
    assert prepare_embeddings.prompt_templates([]) == []
    dmlab = prepare_embeddings.prompt_templates(["dmlab"])
    assert len(dmlab) == 6 and all(t.count("{}") == 1 for t in dmlab)
    assert prepare_embeddings.prompt_templates(["a {} here", "avalon"])[:2] == ["a {} here", "a screenshot of {}"]
    for bad in ["a photo", "a {} and a {}", "a {0}", "{x} of {}"]:
        with pytest.raises(SystemExit, match="neither a template"):
            prepare_embeddings.prompt_templates([bad])


# ---------------------------------------------------------------------------------------------
# image preprocessing
# ---------------------------------------------------------------------------------------------


class PixelsOut:
    """Stands in for a CLIP model whose image encoder returns its input, to see the preprocessing."""

    def __init__(self, size):
        self.visual = type("Visual", (), {"image_size": size})()

    def encode_image(self, x):
        return x


def torchvision_reference(images, size):
    # the batched resize is torch's antialiased bicubic (PIL's kernel, a=-0.5); PIL, which CLIP's own
    # preprocessing uses, also rounds to uint8 (see the PIL test below)
    resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    crop, normalize = T.CenterCrop(size), T.Normalize(CLIP_MEAN, CLIP_STD)
    out = []
    for image in images:
        x = image.permute(2, 0, 1).float() / 255.0
        out.append(normalize(crop(resize(x).clamp(0.0, 1.0))))  # PIL clamps the bicubic overshoot
    return torch.stack(out)


def random_images(n, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=gen, dtype=torch.uint8)


# (56, 56): MiniGrid; (56, 72): wider than tall; (128, 96): shrinking
@pytest.mark.parametrize("shape", [(56, 56), (56, 72), (128, 96)])
def test_clip_preprocessing_matches_torchvision(shape):
    images = random_images(4, *shape, seed=1)
    got = frozen_models.clip_image_features(PixelsOut(64), images)
    assert got.shape == (4, 3, 64, 64)
    assert (got - torchvision_reference(images, 64)).abs().max().item() <= 1e-5


# torchvision's Resize (and so CLIP's preprocessing) truncates the long side: a 56x76 image becomes
# 64x86, not 64x87, or every pixel of the crop moves.
def test_clip_preprocessing_long_side_truncated_like_torchvision():
    images = random_images(2, 56, 76, seed=2)  # 64 * 76 / 56 = 86.86
    got = frozen_models.clip_image_features(PixelsOut(64), images)
    assert (got - torchvision_reference(images, 64)).abs().max().item() <= 1e-5


def test_clip_preprocessing_close_to_clip_own_on_minigrid():
    # CLIP's own preprocessing is PIL's bicubic on the uint8 image; the batched one is an
    # approximation of it that must stay close on what the agents see: MiniGrid views, at ViT-B/16's 224
    import gymnasium as gym
    import minigrid
    from PIL import Image

    env = minigrid.wrappers.RGBImgPartialObsWrapper(gym.make("MiniGrid-DoorKey-5x5-v0"), tile_size=8)
    images = torch.stack([torch.from_numpy(env.reset(seed=s)[0]["image"]) for s in range(3)])
    clip_own = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    expected = torch.stack([clip_own(Image.fromarray(image.numpy())) for image in images])
    got = frozen_models.clip_image_features(PixelsOut(224), images)
    diff = (got - expected).abs()
    assert diff.mean().item() < 0.02 and diff.max().item() < 0.5  # normalised units (pixel / ~0.27)


def test_clip_image_features_batch_invariant_and_reference(clip):
    images = random_images(5, 56, 56, seed=3)
    batched = frozen_models.clip_image_features(clip, images)
    single = torch.cat([frozen_models.clip_image_features(clip, images[i : i + 1]) for i in range(5)])
    assert batched.shape == (5, clip.visual.output_dim)
    assert (batched - single).abs().max().item() <= 1e-5
    with torch.no_grad():
        reference = clip.encode_image(torchvision_reference(images, 64)).float()
    assert (batched - reference).abs().max().item() <= 1e-5
    # and the features tell the images apart
    assert torch.cdist(batched, batched).add(torch.eye(5) * 1e9).min().item() > 1e-3


# ---------------------------------------------------------------------------------------------
# the embeddings file
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_vocab():
    return frozen_models.read_vocab(FIXTURE_TRXL / "vocab.pkl")


def build(clip, vocab, out_dir, **kwargs):
    return prepare_embeddings.build_embeddings(
        clip, TINY, "openai", str(FIXTURE_TRXL), vocab, out_dir, verbose=True, **kwargs
    )


def expected_meta(clip, vocab):
    return prepare_embeddings.expected_metadata(clip, TINY, "openai", str(FIXTURE_TRXL), vocab)


def read(path, clip, vocab, meta=None):
    meta = meta or expected_meta(clip, vocab)
    return prepare_embeddings.read_embeddings(path, meta, prepare_embeddings.clip_text_dim(clip), len(vocab))


def test_embeddings_file_build_and_skip(tmp_path, clip, fixture_vocab, capsys):
    path = build(clip, fixture_vocab, tmp_path)
    assert "wrote" in capsys.readouterr().out
    assert os.listdir(tmp_path) == [path.name]  # written through a temporary file, renamed

    table = read(path, clip, fixture_vocab)
    clip_ids, trxl_ids, words = prepare_embeddings.shared_vocabulary(fixture_vocab)
    assert table["clip_ids"].tolist() == clip_ids and table["trxl_ids"].tolist() == trxl_ids
    assert len(words) >= 10
    expected = F.normalize(prepare_embeddings.encode_words(clip, clip_ids), dim=-1)
    assert (table["text_embeddings"] - expected).abs().max().item() <= 1e-6
    assert torch.allclose(table["text_embeddings"].norm(dim=-1), torch.ones(len(words)))

    mtime = path.stat().st_mtime_ns
    assert build(clip, fixture_vocab, tmp_path) == path
    assert "up to date" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime and os.listdir(tmp_path) == [path.name]


def test_embeddings_file_of_other_models_refused(tmp_path, clip, fixture_vocab):
    path = build(clip, fixture_vocab, tmp_path)
    content = path.read_bytes()
    other_vocab = [w if w != "dog" else "cat" for w in fixture_vocab]
    retrained = copy.deepcopy(clip)
    with torch.no_grad():
        retrained.token_embedding.weight[5] += 1.0
    for vocab, model, field in [
        (other_vocab, clip, "trxl_vocab_sha256"),
        (fixture_vocab, retrained, "clip_text_sha256"),
    ]:
        # models named alike but with other contents (two local directories of the same base name) get a file
        # of their own, keyed by the contents' fingerprint: neither build overwrites the other's
        other = build(clip=model, vocab=vocab, out_dir=tmp_path)
        assert other != path and other.name.rsplit("__", 1)[0] == path.name.rsplit("__", 1)[0]
        assert path.read_bytes() == content
        with pytest.raises(SystemExit) as e:  # and a file named explicitly (--embeddings-file) is checked
            read(path, model, vocab)
        message = str(e.value.code)
        assert message.startswith("error: embeddings file ") and "\n" not in message
        assert field in message and "--force" in message
    # the text embeddings do not depend on the image tower: the file stays valid for another one
    other_image_tower = copy.deepcopy(clip)
    with torch.no_grad():
        next(other_image_tower.visual.parameters()).add_(1.0)
    assert build(other_image_tower, fixture_vocab, tmp_path) == path


def test_embeddings_file_with_prompts(tmp_path, clip, fixture_vocab):
    """Prompted embeddings get their own file, record their templates, and refuse other templates."""
    plain = build(clip, fixture_vocab, tmp_path)
    templates = prepare_embeddings.prompt_templates(["dmlab"])
    path = build(clip, fixture_vocab, tmp_path, templates=templates)
    assert path != plain and sorted(os.listdir(tmp_path)) == sorted([plain.name, path.name])
    meta = prepare_embeddings.expected_metadata(clip, TINY, "openai", str(FIXTURE_TRXL), fixture_vocab, templates)
    table = read(path, clip, fixture_vocab, meta)
    _, _, words = prepare_embeddings.shared_vocabulary(fixture_vocab)
    expected = F.normalize(prepare_embeddings.encode_prompted_words(clip, words, templates), dim=-1)
    assert (table["text_embeddings"] - expected).abs().max().item() <= 1e-6
    plain_table = read(plain, clip, fixture_vocab)
    assert (table["text_embeddings"] - plain_table["text_embeddings"]).abs().max().item() > 1e-3
    for file, other in [(path, []), (path, templates[:3]), (plain, templates)]:
        wanted = prepare_embeddings.expected_metadata(clip, TINY, "openai", str(FIXTURE_TRXL), fixture_vocab, other)
        with pytest.raises(SystemExit, match="made with the prompt templates .*--prompts") as e:
            read(file, clip, fixture_vocab, wanted)
        assert "\n" not in str(e.value.code)


def test_embeddings_file_from_before_prompts_reads_as_the_word_alone(tmp_path, clip, fixture_vocab):
    from safetensors.torch import load_file, save_file

    path = build(clip, fixture_vocab, tmp_path)
    meta = expected_meta(clip, fixture_vocab)
    old = {k: v for k, v in meta.items() if k != "prompts"}
    save_file(load_file(path), path, metadata=old)
    assert read(path, clip, fixture_vocab, meta).keys() == {"text_embeddings", "trxl_ids", "clip_ids"}


def test_embeddings_file_corrupt_refused_then_force_rebuilds(tmp_path, clip, fixture_vocab):
    import safetensors.torch

    path = build(clip, fixture_vocab, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) - 100])
    meta = expected_meta(clip, fixture_vocab)
    for attempt in (
        lambda: build(clip, fixture_vocab, tmp_path),
        lambda: read(path, clip, fixture_vocab, meta),
    ):
        with pytest.raises(SystemExit) as e:
            attempt()
        message = str(e.value.code)
        assert message.startswith("error: embeddings file ") and "corrupt" in message and "--force" in message
    assert build(clip, fixture_vocab, tmp_path, force=True) == path
    assert os.listdir(tmp_path) == [path.name]
    # the same content (safetensors may order the metadata keys differently, so not the same bytes)
    rebuilt = read(path, clip, fixture_vocab, meta)
    original = safetensors.torch.load(good)
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in rebuilt)


def test_write_atomically_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old content")

    def half_written(interrupt):
        def write(f):
            f.write(b"new, but only half")
            raise interrupt

        return write

    with pytest.raises(SystemExit) as e:
        files.write_atomically(path, half_written(OSError(errno.ENOSPC, "No space left on device")))
    message = str(e.value.code)
    assert (
        message.startswith("error: could not write ")
        and "No space left on device" in message
        and "nothing was overwritten" in message
    )
    assert path.read_bytes() == b"old content" and os.listdir(tmp_path) == ["file.bin"]
    with pytest.raises(KeyboardInterrupt):  # an interrupt stays an interrupt, but cleans up too
        files.write_atomically(path, half_written(KeyboardInterrupt()))
    assert path.read_bytes() == b"old content" and os.listdir(tmp_path) == ["file.bin"]
    files.write_atomically(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["file.bin"]


def test_embeddings_file_unwritable(tmp_path, clip, fixture_vocab):
    # the file's place is taken by a directory: the rename fails, which must read as one clear line
    meta = expected_meta(clip, fixture_vocab)
    blocked = prepare_embeddings.embeddings_path(tmp_path, TINY, "none", str(FIXTURE_TRXL), meta)
    blocked.mkdir()
    with pytest.raises(SystemExit) as e:
        build(clip, fixture_vocab, tmp_path, force=True)
    assert str(e.value.code).startswith(f"error: could not write {blocked}")
    assert os.listdir(tmp_path) == [blocked.name] and blocked.is_dir()


# an --embeddings-dir (or a runs/ path) that is an existing file must end in one clear line.
def test_embeddings_dir_is_a_file(tmp_path, clip, fixture_vocab):
    (tmp_path / "data").write_text("not a directory")
    for out_dir in (tmp_path / "data", tmp_path / "data" / "sub"):
        with pytest.raises(SystemExit) as e:
            build(clip, fixture_vocab, out_dir)
        assert str(e.value.code).startswith("error: could not write ")
    assert os.listdir(tmp_path) == ["data"]


# ---------------------------------------------------------------------------------------------
# token retrieval and its cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    args = shelm_ppo.Args(
        trxl_model=TINY,
        clip_model=TINY,
        n_layer=2,
        mem_len=4,
        topk=2,
        embeddings_dir=str(tmp_path_factory.mktemp("data")),
        observation_cache_size=0,
        frozen_dtype="float32",
    )
    return shelm_ppo.build_memory(args, "cpu", verbose=False)


def retrieval(encoder, cache_size):
    clip, word_emb = encoder.frozen["clip"], encoder.frozen["word_emb"]
    return shelm_ppo.TokenRetrieval(
        clip, encoder.text_embeddings, encoder.trxl_ids, word_emb, encoder.tokens_per_step, cache_size
    )


def observation_stream(encoder, n_distinct=10, steps=200, batch=8, seed=1):
    """A pool of observations and the batches of them to encode. The cache computes an observation in another
    batch than the uncached encoder, which CLIP may round otherwise: the pool's words must be set apart by more
    (seed 1: its closest pair of top words lies 5e-3 apart with the tiny models)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (n_distinct, 56, 56, 3), dtype=np.uint8)
    which = rng.integers(0, n_distinct, (steps, batch))
    features = frozen_models.clip_image_features(encoder.frozen["clip"], torch.from_numpy(pool))
    assert_no_near_ties(F.normalize(features, dim=-1) @ encoder.text_embeddings.T, k=encoder.tokens_per_step)
    return pool, which


def test_token_cache_same_tokens_and_hit_rate(memory):
    _, vocab, uncached = memory
    assert uncached.log_scalars() == {}  # no cache, no chart
    cached = retrieval(uncached, cache_size=1000)
    pool, which = observation_stream(uncached)
    seen, hits, lookups, interval = set(), 0, 0, 25
    for step, ids in enumerate(which):
        emb_off, tokens_off = uncached(pool[ids])
        emb_on, tokens_on = cached(pool[ids])
        assert tokens_on.shape == (8, 2) and emb_on.shape == (2, 8, 64)
        assert torch.equal(tokens_on, tokens_off)
        assert torch.equal(emb_on, emb_off)
        # a lookup hits when its observation was seen in an earlier batch
        hits += sum(int(i) in seen for i in ids)
        lookups += len(ids)
        seen.update(int(i) for i in ids)
        if (step + 1) % interval == 0:
            assert cached.log_scalars() == {
                "charts/observation_cache_hit_rate": pytest.approx(hits / lookups, abs=1e-12)
            }
            hits = lookups = 0
    assert len(cached.cache) == len(pool)
    assert all(vocab[t] != "<unk>" for t in tokens_off.flatten().tolist())


def test_token_cache_bounded_lru(memory):
    _, _, uncached = memory
    size = 3
    cached = retrieval(uncached, cache_size=size)
    pool, which = observation_stream(uncached, n_distinct=6, steps=80, batch=2, seed=1)
    flat, misses = [], 0
    for ids in which:
        # the cache holds the `size` observations used most recently: largest last use in the stream
        last_use = {i: t for t, i in enumerate(flat)}
        in_cache = set(sorted(last_use, key=last_use.get)[-size:])
        misses += sum(int(i) not in in_cache for i in ids)
        _, tokens = cached(pool[ids])
        _, expected = uncached(pool[ids])
        assert torch.equal(tokens, expected)  # evicted observations come back the same
        flat.extend(int(i) for i in ids)
        assert len(cached.cache) == min(size, len(set(flat)))
    rate = cached.log_scalars()["charts/observation_cache_hit_rate"]
    assert rate == pytest.approx(1 - misses / which.size, abs=1e-12)
    assert misses > 2 * len(pool)  # evictions happened and were recomputed


# a batch with more distinct observations than cache_size (e.g. --token-cache-size 2 --num-envs 4)
# must still get its tokens.
def test_token_cache_smaller_than_batch(memory):
    _, _, uncached = memory
    cached = retrieval(uncached, cache_size=2)
    pool, which = observation_stream(uncached, n_distinct=6, steps=3, batch=4, seed=2)
    for ids in [np.arange(4), *which]:
        _, tokens = cached(pool[ids])
        assert torch.equal(tokens, uncached(pool[ids])[1])
        assert len(cached.cache) <= 2


# ---------------------------------------------------------------------------------------------
# memory reset at episode boundaries
# ---------------------------------------------------------------------------------------------


def run_steps(trxl, inputs, mems, memory_mask):
    outs = []
    with torch.no_grad():
        for x in inputs:
            out, mems, memory_mask = trxl(x, mems, memory_mask)
            outs.append(out)
    return outs, mems, memory_mask


def step_inputs(trxl, n, batch, k, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [trxl.word_emb(torch.randint(0, 2000, (k, batch), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("memory_reset", ["mask", "zero"])
def test_memory_reset_forgets_only_the_finished_episode(memory, memory_reset):
    trxl = memory[0]
    batch, k, env = 3, 2, 1
    before = step_inputs(trxl, 6, batch, k, seed=0)
    after = step_inputs(trxl, 2 * trxl.mem_len, batch, k, seed=1)

    mems, mask = shelm_ppo.init_memory(trxl, batch, memory_reset, "cpu")
    _, mems, mask = run_steps(trxl, before, mems, mask)
    done = torch.tensor([i == env for i in range(batch)])
    reset_mems, reset_mask = shelm_ppo.reset_memory(mems, mask, done, memory_reset)
    # the other envs keep their memory untouched
    keep = ~done
    assert torch.equal(reset_mems[:, :, keep], mems[:, :, keep]) and torch.equal(reset_mask[:, keep], mask[:, keep])
    if memory_reset == "zero":
        assert (reset_mems[:, :, env] == 0).all() and reset_mask.all()
    else:
        assert not reset_mask[:, env].any()
    continued, _, _ = run_steps(trxl, after, reset_mems, reset_mask)

    fresh_mems, fresh_mask = shelm_ppo.init_memory(trxl, batch, memory_reset, "cpu")
    fresh, _, _ = run_steps(trxl, after, fresh_mems, fresh_mask)
    for t, (c, f) in enumerate(zip(continued, fresh)):
        assert (c[:, env] - f[:, env]).abs().max().item() <= 1e-5, f"step {t} after the reset"
    # the envs that were not reset still remember their episode
    assert (continued[0][:, keep] - fresh[0][:, keep]).abs().max().item() > 1e-3
