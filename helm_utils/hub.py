"""The Hugging Face hub: download a shared agent (from the cache without network when it is there), and
upload one with its model card and a video of its memory."""

import shlex
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from helm_utils import fail
from helm_utils.files import write_new
from helm_utils.frozen_models import hub_offline

HUB_FILE = "model.pt"  # the checkpoint's name in a model repository written by push_to_hub


def download_checkpoint(repo_id, filename):
    """Local path of `filename` of a hub model repository: from the cache without network when it is
    there, else downloaded once into the cache."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached
        hub_offline()  # out of reach: the hub client goes cache-only, without retries
        return hf_hub_download(repo_id, filename)
    except HFValidationError:
        fail(f"{repo_id!r} is not a Hugging Face hub repository id (owner/name)")
    except RemoteEntryNotFoundError:
        fail(f"the hub repository {repo_id} has no file {filename} (--hub-file names the checkpoint)")
    except RepositoryNotFoundError:
        fail(f"{repo_id} is not a model repository on the Hugging Face hub (or it is private)")
    except LocalEntryNotFoundError:
        fail(f"cannot download {filename} of {repo_id}: no network, and the hub cache does not hold it")
    except Exception as e:  # noqa: BLE001 - network and disk failures all mean the same to the user
        fail(f"cannot download {filename} of {repo_id}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


def training_command(algorithm, args, defaults):
    """The command line that reproduces a run: its script and the arguments that differ from the defaults."""
    skip = {"batch_size", "minibatch_size", "num_iterations", "resume", "upload_model", "hf_entity"}
    parts = [f"python {algorithm}_ppo.py"]
    for name, value in args.items():
        if name in skip or value == defaults.get(name, object()):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts.append(" ".join([flag, *(shlex.quote(str(v)) for v in value)]))
        elif value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def model_card(ckpt, repo_id, returns, video_name, script):
    """README.md of the model repository: what was trained, how, how well it plays, how to watch it."""
    algorithm, args = ckpt["algorithm"], ckpt["args"]
    command = training_command(algorithm, args, asdict(script.Args()))
    mean, std = float(np.mean(returns)), float(np.std(returns))
    name = {"helm": "HELM", "helmv2": "HELMv2", "shelm": "SHELM"}[algorithm]
    versions = "\n".join(f"- {k}: {v}" for k, v in ckpt.get("meta", {}).get("versions", {}).items())
    arguments = "\n".join(f"| {k} | {v} |" for k, v in args.items())
    return f"""---
tags:
- reinforcement-learning
- {args["env_id"]}
- {algorithm}
- ppo
- custom-implementation
model-index:
- name: {algorithm}_ppo
  results:
  - task:
      type: reinforcement-learning
      name: reinforcement-learning
    dataset:
      name: {args["env_id"]}
      type: {args["env_id"]}
    metrics:
    - type: mean_reward
      value: {mean:.2f} +/- {std:.2f}
      name: mean_reward
      verified: false
---

# {name} (PPO) playing {args["env_id"]}

A {name} agent trained with `{algorithm}_ppo.py`: a PPO agent whose memory is a frozen, pretrained
Transformer-XL ({args["trxl_model"]}, first {args["n_layer"]} layers). This repository holds its trainable
weights (`{HUB_FILE}`, {ckpt.get("global_step")} steps); the frozen models are rebuilt from their sources.

## Evaluation

Mean return over {len(returns)} episodes: **{mean:.3f} +- {std:.3f}** (sampled actions, seeds new to training).
Returns: {", ".join(f"{r:.3f}" for r in returns)}

`{video_name}` shows one episode, with the memory's text under each frame.

## Watch it

```bash
pip install -r requirements/requirements.txt   # in a checkout of the HELM/SHELM scripts
python enjoy.py --hub {repo_id} --episodes 3 --capture-video --attention
```

## Command

```bash
{command}
```

## Arguments

| argument | value |
|---|---|
{arguments}

## Library versions

{versions}
"""


def push_to_hub(checkpoint, repo_id, returns, video, script=None):
    """Upload a checkpoint (as model.pt), its model card (README.md) and an evaluation video (replay.mp4)
    to a hub model repository; one line and exit status 1 when it cannot, the local files untouched.
    script: the training script's module (None: the one the checkpoint's algorithm names)."""
    import huggingface_hub
    from huggingface_hub import constants

    remedy = f"the run is saved; upload it later with: python enjoy.py {checkpoint} --upload {repo_id}"
    if constants.HF_HUB_OFFLINE:
        fail(f"cannot upload to the Hugging Face hub while offline (HF_HUB_OFFLINE is set); {remedy}")
    if not huggingface_hub.get_token():
        fail(f"no Hugging Face token (run `hf auth login` or set HF_TOKEN); {remedy}")
    if hub_offline():  # one quick probe, instead of the client's retries for half a minute
        fail(f"cannot upload: the Hugging Face hub is out of reach; {remedy}")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if script is None:
        from helm_utils.evaluation import script_of

        script = script_of(ckpt, checkpoint)
    with tempfile.TemporaryDirectory(prefix="helm-upload-") as folder:
        files = {
            HUB_FILE: Path(checkpoint).read_bytes(),
            "README.md": model_card(ckpt, repo_id, returns, "replay.mp4", script),
        }
        if video is not None:
            files["replay.mp4"] = Path(video).read_bytes()
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            write_new(Path(folder) / name, lambda f, data=data: f.write(data))
        try:
            api = huggingface_hub.HfApi()
            url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=f"{ckpt['algorithm']}_ppo.py agent for {ckpt['args']['env_id']}",
            )
        except Exception as e:  # noqa: BLE001 - network, permission and server errors all end here
            fail(f"upload to {repo_id} failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}; {remedy}")
    print(f"uploaded {', '.join(sorted(files))} to {url}")
    return sorted(files)
