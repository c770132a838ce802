"""Bad input stops a training script before it writes anything, with one `error: ...` line and no
traceback.

Most cases run the script in this process (conftest.run_in_process, as `python script.py args` would): a script
stops by raising SystemExit("error: ..."), which the interpreter prints as the last stderr line with exit
status 1. Subprocesses, which cost an import of torch and open_clip each, are kept for what only a
real process shows: that it does end that way, and the offline hub lookup."""

import importlib
import json
import os
import pickle
import shutil
import signal
import sys

import pytest
import torch

from conftest import QUICK, ROOT, error_line, run_in_process, run_script, tiny_args
from helm_utils import frozen_models


def assert_clean_failure(proc, cwd, before, *phrases):
    line = error_line(proc)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith("error: "), proc.stderr[-3000:]
    assert sum(err.startswith("error:") for err in proc.stderr.splitlines()) == 1
    for phrase in phrases:
        assert phrase in line, line
    assert not (cwd / "runs").exists()
    assert sorted(os.listdir(cwd)) == before  # nothing written at all


def base_args(script, tmp_path):
    # a valid quick run: a case that is not refused trains for seconds, not for hours
    return [*QUICK, *tiny_args(script, tmp_path)]


def write_resume_files(tmp_path):
    torch.save({"format": "helm-checkpoint/1", "algorithm": "other", "args": {}}, tmp_path / "other.pt")
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(4096))
    return {"missing": tmp_path / "missing.pt", "corrupt": tmp_path / "corrupt.pt", "other": tmp_path / "other.pt"}


CASES = {
    "unknown-env": (["--env-id", "MiniGrid-NoSuchThing-v0"], ["MiniGrid-NoSuchThing-v0"]),
    "non-image-env": (["--env-id", "CartPole-v1"], ["CartPole-v1", "RGB images"]),
    "n-layer-0": (["--n-layer", "0"], ["--n-layer", "got 0"]),
    "n-layer-19": (["--n-layer", "19"], ["--n-layer", "between 1 and 18", "got 19"]),
    "trxl-missing-dir": (["--trxl-model", "/nonexistent/dir"], ["/nonexistent/dir"]),
    "resume-missing": (["--resume", "{missing}"], ["missing.pt", "does not exist"]),
    "resume-corrupt": (["--resume", "{corrupt}"], ["corrupt.pt", "corrupt"]),
    "resume-other-algorithm": (["--resume", "{other}"], ["other.pt", "other_ppo.py"]),
    "num-envs-0": (["--num-envs", "0"], ["--num-envs", "got 0"]),
    "learning-rate-negative": (["--learning-rate", "-1"], ["--learning-rate", "-1"]),
    "seed-negative": (["--seed", "-1"], ["--seed", "got -1"]),
    "seed-too-large": (["--seed", str(2**32)], ["--seed", str(2**32)]),
    "vf-coef-inf": (["--vf-coef", "inf"], ["--vf-coef", "inf"]),
    "ent-coef-nan": (["--ent-coef", "nan"], ["--ent-coef", "nan"]),
    "target-kl-inf": (["--target-kl", "inf"], ["--target-kl", "inf"]),
    "minibatch-of-one-sample": (
        ["--num-envs", "2", "--num-steps", "65", "--num-minibatches", "43", "--total-timesteps", "260"],
        ["--num-minibatches 43", "1 sample"],
    ),
    "minibatches-of-one": (["--num-minibatches", "64"], ["--num-minibatches 64", "1 sample"]),
    "exp-name-escapes": (["--exp-name", "x/../../../elsewhere"], ["--exp-name", "without '/'"]),
    "exp-name-too-long": (["--exp-name", "x" * 300], ["bytes long", "at most 200"]),
    "exp-name-not-utf8": (["--exp-name", "run\udcff"], ["not valid UTF-8"]),
    "exp-name-control-character": (["--exp-name", "a\nb"], ["control characters"]),
    "env-id-escapes": (["--env-id", "../../MiniGrid-DoorKey-5x5-v0"], ["leaves runs/"]),
    "env-id-unknown-module": (["--env-id", "nosuchmodule:Foo-v0"], ["nosuchmodule:Foo-v0", "No module"]),
    # sizes: what the run would allocate, estimated from the arguments, against this machine's memory
    # the memories, or a step's other tensors (its keys and values, positions and scores over all of them)
    "mem-len-beyond-memory": (["--mem-len", "1000000000"], ["--mem-len 1000000000", "memor", "more than"]),
    "observation-cache-beyond-memory": (["--observation-cache-size", str(10**15)], ["cache", "more than"]),
    # memories whose size torch cannot even compute (beyond int64): the same line, not its RuntimeError
    "mem-len-beyond-int64": (["--mem-len", str(10**18)], [f"--mem-len {10**18}", "memories", "more than"]),
    "total-timesteps-beyond-int64": (["--total-timesteps", str(2**70)], ["--total-timesteps", "2**63"]),
    # numbers checked in the precision they are used in: float32
    "learning-rate-zero-in-float32": (["--learning-rate", "1e-50"], ["--learning-rate", "float32", "1e-50"]),
    "target-kl-inf-in-float32": (["--target-kl", "1e39"], ["--target-kl", "float32", "1e+39"]),
}
# per script: the flags of its own algorithm (the cases above test the shared code, once, through SCRIPT)
HELM_CASES = {
    "beta-zero": (["--beta", "0"], ["--beta", "got 0"]),
    "beta-inf-in-float32": (["--beta", "1e39"], ["--beta", "float32", "1e+39"]),
    "hopfield-chunk-negative": (["--hopfield-chunk", "-1"], ["--hopfield-chunk", "got -1"]),
}
HELMV2_CASES = {
    "rescale-batch-one-env": (["--rescale", "batch", "--num-envs", "1", "--num-minibatches", "1"], ["--num-envs >= 2"]),
}
SHELM_CASES = {
    "embeddings-file-missing": (
        ["--embeddings-file", "/missing.safetensors"],
        ["/missing.safetensors", "does not exist"],
    ),
    "topk-0": (["--topk", "0"], ["--topk", "got 0"]),
    "prompt-without-slot": (["--prompts", "a photo of"], ["'a photo of'", "{}", "dmlab"]),
}


def check_case(script, case, tmp_path):
    files = write_resume_files(tmp_path)
    before = sorted(os.listdir(tmp_path))
    extra, phrases = case
    extra = [a.format(**files) for a in extra]
    proc = run_in_process(script, [*base_args(script, tmp_path), *extra], tmp_path)
    assert_clean_failure(proc, tmp_path, before, *phrases)


# the checks of the shared code (helm_utils, and the copies tests/test_drift.py keeps equal) run through one
# script: HELM's, which imports no CLIP
SCRIPT = "helm_ppo.py"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_refused(case, tmp_path):
    check_case(SCRIPT, case, tmp_path)


@pytest.mark.parametrize(
    "script,case",
    [("helm_ppo.py", case) for case in HELM_CASES.values()]
    + [("helmv2_ppo.py", case) for case in HELMV2_CASES.values()]
    + [("shelm_ppo.py", case) for case in SHELM_CASES.values()],
    ids=[*HELM_CASES, *HELMV2_CASES, *SHELM_CASES],
)
def test_refused_by_the_algorithm(script, case, tmp_path):
    check_case(script, case, tmp_path)


def test_in_process_reads_like_a_real_process(tmp_path):
    # the same refusal, once as a real process: exit status, last line and silence agree
    args = [*base_args("shelm_ppo.py", tmp_path), "--env-id", "CartPole-v1"]
    real = run_script("shelm_ppo.py", args, tmp_path)
    emulated = run_in_process("shelm_ppo.py", args, tmp_path)
    assert real.returncode == emulated.returncode == 1
    assert error_line(real) == error_line(emulated)
    assert_clean_failure(real, tmp_path, [], "CartPole-v1")


def test_hub_weights_absent_offline(tmp_path):
    # a real process: the hub client reads HF_HUB_OFFLINE when it is first imported
    # (without HF_HUB_OFFLINE and without a network: tests/test_first_use.py)
    args = [*base_args(SCRIPT, tmp_path), "--trxl-model", "transfo-xl/transfo-xl-wt103"]
    proc = run_script(SCRIPT, args, tmp_path, timeout=60)  # no waiting on a network that is not there
    assert_clean_failure(proc, tmp_path, [], "transfo-xl/transfo-xl-wt103", "download it once", "tiny-random")


# ---------------------------------------------------------------------------------------------
# Model files from elsewhere: a Transformer-XL directory (config.json, weights, vocab.pkl) and SHELM's
# embeddings file. Each crafted file must end in one line, checked by the functions that read them.
# ---------------------------------------------------------------------------------------------

FIXTURE_TRXL = ROOT / "tests" / "fixtures" / "tiny_trxl"


def edit_config(drop=(), **changes):
    def edit(model):
        config = json.loads((model / "config.json").read_text())
        for key in [drop] if isinstance(drop, str) else drop:
            config.pop(key)
        (model / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def write_config(content):
    return lambda model: (model / "config.json").write_text(json.dumps(content))


def edit_weights(edit):
    def apply(model):
        from safetensors.torch import load_file

        state = load_file(model / "model.safetensors")
        (model / "model.safetensors").unlink()
        torch.save(edit(state), model / "pytorch_model.bin")  # a .bin can hold anything torch.save writes

    return apply


def nan_in(key):
    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
        return state

    return edit


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def write_vocab(content):
    def write(model):
        with open(model / "vocab.pkl", "wb") as f:
            pickle.dump(content, f)

    return write


MODEL_CASES = {
    "config-a-list": (write_config([1, 2]), ["holds a list", "not a Transformer-XL config"]),
    "config-null": (write_config(None), ["holds a NoneType"]),
    "config-without-d-model": (edit_config(drop="d_model"), ["lacks d_model"]),
    "config-without-n-layer": (edit_config(drop="n_layer"), ["lacks n_layer"]),
    "config-without-cutoffs": (edit_config(drop="cutoffs"), ["lacks cutoffs"]),
    "config-negative-size": (edit_config(d_inner=-64), ["d_inner must be a positive integer", "-64"]),
    "config-string-size": (edit_config(n_head="4"), ["n_head must be a positive integer", "'4'"]),
    "config-bool-size": (edit_config(n_layer=True), ["n_layer must be a positive integer"]),
    "config-odd-d-model": (edit_config(d_model=33), ["d_model must be even"]),
    "config-cutoffs-beyond-vocab": (edit_config(cutoffs=[20, 60, 400]), ["cutoffs", "vocab_size 300"]),
    "config-cutoffs-unsorted": (edit_config(cutoffs=[60, 20, 150]), ["cutoffs must be increasing"]),
    "config-cutoffs-a-string": (edit_config(cutoffs="20,60"), ["cutoffs"]),
    "config-huge": (edit_config(d_inner=10**12), ["parameters"]),
    "config-no-width-left": (edit_config(div_val=64), ["no width"]),
    "config-epsilon-a-string": (edit_config(layer_norm_epsilon="1e-5"), ["layer_norm_epsilon"]),
    "weights-nested": (edit_weights(lambda s: {"word_emb": s}), ["entry 'word_emb' is a dict"]),
    "weights-a-list": (edit_weights(lambda s: list(s.values())), ["hold a list"]),
    "weights-nan": (edit_weights(nan_in("transformer.layers.0.pos_ff.CoreNet.0.weight")), ["NaN", "CoreNet.0"]),
    "weights-inf-embedding": (edit_weights(nan_in("transformer.word_emb.emb_layers.0.weight")), ["NaN"]),
    "weights-odd-layer-key": (
        edit_weights(lambda s: {**s, "transformer.layers.x.bias": torch.zeros(1)}),
        ["do not fit", "layers.x.bias"],
    ),
    "weights-wrong-shape": (
        edit_weights(lambda s: {**s, "transformer.layers.0.dec_attn.r_w_bias": torch.zeros(3, 3)}),
        ["do not fit", "r_w_bias"],
    ),
    "vocab-a-list": (write_vocab(["<eos>", "a"]), ["not a plain Transformer-XL vocab.pkl"]),
    "vocab-idx2sym-of-numbers": (write_vocab({"idx2sym": [1, 2]}), ["no idx2sym list of strings"]),
    "vocab-other-size": (write_vocab({"idx2sym": ["<eos>", "a", "b"]}), ["3 words but the model 300"]),
    "vocab-runs-code": (write_vocab({"idx2sym": Payload()}), ["refusing to load posix.system"]),
}


@pytest.mark.parametrize("case", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_model_directory_refused(case, tmp_path, monkeypatch):
    import shelm_ppo

    model = tmp_path / "model"
    shutil.copytree(FIXTURE_TRXL, model)
    edit, phrases = case
    edit(model)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        shelm_ppo.build_trxl(str(model), 2, 5, "cpu")
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert not (tmp_path / "pwned").exists()


def test_the_fixture_model_loads(tmp_path):
    # the cases above start from a model that loads: each refusal is the edit's doing
    import shelm_ppo

    model = tmp_path / "model"
    shutil.copytree(FIXTURE_TRXL, model)
    edit_weights(lambda s: s)(model)  # the same weights through the .bin path
    trxl, vocab = shelm_ppo.build_trxl(str(model), 2, 5, "cpu")
    assert trxl.n_layer == 2 and len(vocab) == 300


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A valid embeddings file of the tiny models and what reading it needs: (tensors, meta, dim, vocab size)."""
    from safetensors import safe_open

    import prepare_embeddings

    clip = frozen_models.load_clip(frozen_models.TINY, "none", "cpu")
    vocab = frozen_models.tiny_vocab()
    out = tmp_path_factory.mktemp("embeddings")
    args = (clip, frozen_models.TINY, "none", frozen_models.TINY, vocab, out)
    path = prepare_embeddings.build_embeddings(*args, verbose=False)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    return tensors, meta, prepare_embeddings.clip_text_dim(clip), len(vocab)


def changed(key, edit):
    return lambda tensors, meta: ({**tensors, key: edit(tensors[key].clone())}, meta)


def set_first(value):
    def edit(t):
        t.view(-1)[0] = value
        return t

    return edit


EMBEDDINGS_CASES = {
    "narrower-embeddings": (changed("text_embeddings", lambda t: t[:, :-1].contiguous()), ["text_embeddings"]),
    "embeddings-1d": (changed("text_embeddings", lambda t: t[:, 0].contiguous()), ["text_embeddings"]),
    "integer-embeddings": (changed("text_embeddings", lambda t: t.long()), ["text_embeddings"]),
    "nan-embeddings": (changed("text_embeddings", set_first(float("nan"))), ["not finite unit vectors"]),
    "not-unit-embeddings": (changed("text_embeddings", lambda t: 2 * t), ["not finite unit vectors"]),
    "fewer-ids": (changed("trxl_ids", lambda t: t[:-1].contiguous()), ["int64"]),
    "float-ids": (changed("trxl_ids", lambda t: t.float()), ["int64"]),
    "id-beyond-vocab": (changed("trxl_ids", set_first(2000)), ["out of range", "[0, 2000)"]),
    "negative-id": (changed("trxl_ids", set_first(-1)), ["out of range"]),
    "negative-clip-id": (changed("clip_ids", set_first(-5)), ["out of range"]),
    "wrong-n-shared": (lambda tensors, meta: (tensors, {**meta, "n_shared": "3"}), ["n_shared '3'"]),
    "no-rows": (
        lambda tensors, meta: ({k: v[:0].contiguous() for k, v in tensors.items()}, {**meta, "n_shared": "0"}),
        ["text_embeddings"],
    ),
}


@pytest.mark.parametrize("case", EMBEDDINGS_CASES.values(), ids=EMBEDDINGS_CASES.keys())
def test_embeddings_file_refused(case, embeddings, tmp_path):
    # metadata right (the models in use), tensors wrong: what a file made elsewhere can hold
    from safetensors.torch import save_file

    import prepare_embeddings

    tensors, meta, dim, vocab_size = embeddings
    edit, phrases = case
    bad_tensors, bad_meta = edit(tensors, meta)
    save_file(bad_tensors, tmp_path / "bad.safetensors", metadata=bad_meta)
    with pytest.raises(SystemExit) as stop:
        prepare_embeddings.read_embeddings(tmp_path / "bad.safetensors", meta, dim, vocab_size)
    message = stop.value.code
    assert message.startswith(f"error: embeddings file {tmp_path / 'bad.safetensors'} is malformed: ")
    assert "\n" not in message and "--force" in message
    for phrase in phrases:
        assert phrase in message, message
    # and the unedited tensors pass the same checks
    save_file(tensors, tmp_path / "good.safetensors", metadata=meta)
    assert prepare_embeddings.read_embeddings(tmp_path / "good.safetensors", meta, dim, vocab_size).keys() == {
        "text_embeddings",
        "trxl_ids",
        "clip_ids",
    }


def test_bad_embeddings_file_stops_the_script(embeddings, tmp_path):
    # the same check on the script's path (--embeddings-file): one line, nothing written
    from safetensors.torch import save_file

    tensors, meta, _, _ = embeddings
    save_file({**tensors, "trxl_ids": -tensors["trxl_ids"]}, tmp_path / "bad.safetensors", metadata=meta)
    before = sorted(os.listdir(tmp_path))
    args = [*base_args("shelm_ppo.py", tmp_path), "--embeddings-file", "bad.safetensors"]
    proc = run_in_process("shelm_ppo.py", args, tmp_path)
    assert_clean_failure(proc, tmp_path, before, "bad.safetensors is malformed", "out of range")


def test_total_timesteps_rounded_down_with_a_line(tmp_path):
    # not a multiple of the batch (4 x 16): said, not silently truncated (the bad env then stops the run early)
    args = [*base_args("shelm_ppo.py", tmp_path), "--total-timesteps", "130", "--env-id", "CartPole-v1"]
    proc = run_in_process("shelm_ppo.py", args, tmp_path)
    assert "--total-timesteps 130 is not a multiple of the batch size 64: 2 updates, 128 steps" in proc.stdout
    assert_clean_failure(proc, tmp_path, [], "CartPole-v1")


def test_the_default_step_count_is_not_warned_about(monkeypatch, capsys):
    # the papers' 2,000,000 steps are no multiple of the default batch (16 x 128): the default run does
    # 976 updates without a word about it (README says so); --total-timesteps of one's own gets the line above
    from helm_utils import runs

    module = importlib.import_module("helm_ppo")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["helm_ppo.py"])
    try:
        args, ckpt = runs.parse(module)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert (args.total_timesteps, args.batch_size, args.num_iterations, ckpt) == (2_000_000, 2048, 976, None)
    assert capsys.readouterr().out == ""


def test_runs_is_a_file(tmp_path):
    # the first write of a run is its directory: it cannot be made, one line, the file untouched
    (tmp_path / "runs").write_text("not a directory")
    proc = run_in_process("shelm_ppo.py", base_args("shelm_ppo.py", tmp_path), tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert error_line(proc).startswith("error: cannot create the run directory runs/MiniGrid-DoorKey-5x5-v0__")
    assert (tmp_path / "runs").read_text() == "not a directory"


def test_videos_is_a_file(tmp_path):
    # --capture-video: gymnasium's recorder would make videos/<run> inside the envs (a traceback): checked first
    (tmp_path / "videos").write_text("not a directory")
    args = [*base_args(SCRIPT, tmp_path), "--capture-video"]
    proc = run_in_process(SCRIPT, args, tmp_path)
    assert_clean_failure(
        proc, tmp_path, sorted(os.listdir(tmp_path)), "--capture-video writes into videos/", "is a file"
    )
    assert (tmp_path / "videos").read_text() == "not a directory"
