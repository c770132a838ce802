"""Frozen-encoder outputs of the observations seen before: grid worlds show the same views again and again,
so exact repeats skip the frozen encoder. A speed-up only: the outputs are those without it, but for float
rounding (the encoder sees only the observations not seen before, so other batches, which round otherwise)."""

import collections
import hashlib

import torch


class ObservationCache:
    """What a frozen encoder computed for each observation seen, so exact repeats skip it: grid worlds
    show the same views again and again. Keys are 128-bit BLAKE2 hashes of the observation's bytes; at
    most `size` entries are kept, the least recently used go first; size 0 turns the cache off."""

    def __init__(self, size):
        self.size, self.entries = size, collections.OrderedDict()
        self.lookups = self.hits = 0

    def __len__(self):
        return len(self.entries)

    def __call__(self, obs, compute):
        """compute(observations) -> tuple of tensors with one row per observation. The same for obs
        (numpy, batch x ...), with compute run only on the observations not in the cache, each once."""
        if self.size == 0:
            return compute(obs)
        keys = [hashlib.blake2b(o.tobytes(), digest_size=16).digest() for o in obs]
        missing = {}  # key -> first index in the batch: an observation shown by several envs is computed once
        for i, key in enumerate(keys):
            if key not in self.entries:
                missing.setdefault(key, i)
        self.lookups += len(keys)
        self.hits += sum(key in self.entries for key in keys)
        rows = {key: self.entries[key] for key in keys if key in self.entries}
        if missing:
            computed = compute(obs[list(missing.values())])
            for j, key in enumerate(missing):
                rows[key] = tuple(t[j].clone() for t in computed)  # clone: a row alone, not a view of the batch
        for key in keys:  # most recently used last
            self.entries[key] = rows[key]
            self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return tuple(torch.stack(column) for column in zip(*(rows[key] for key in keys)))

    def log_scalars(self):
        """The share of lookups since the last call that the cache answered."""
        if not self.size:
            return {}
        rate = self.hits / self.lookups if self.lookups else float("nan")
        self.lookups = self.hits = 0
        return {"charts/observation_cache_hit_rate": rate}
