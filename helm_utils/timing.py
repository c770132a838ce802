"""Where a training update's time goes: the scripts time the phases of their loop (perf/* scalars), which
benchmark/throughput.py reads back."""

import collections
import time

import torch


class Laps:
    """Wall time of each phase of the training loop: lap(name) adds the time since the previous lap
    to that phase. Logged per update as perf/<phase>_s, so a run shows where its time goes. On a GPU
    a phase ends when its work is queued, not done: the phases shift, their sum stays right."""

    def __init__(self):
        self.totals, self.last = collections.defaultdict(float), time.perf_counter()
        self.cpu_start = time.process_time()

    def __call__(self, name):
        now = time.perf_counter()
        self.totals[name] += now - self.last
        self.last = now

    def pop(self):
        """(the phases' totals, the process's CPU time) since the last pop, and a fresh start."""
        totals, self.totals = dict(self.totals), collections.defaultdict(float)
        cpu, self.cpu_start = time.process_time() - self.cpu_start, time.process_time()
        return totals, cpu


def log_perf(writer, phases, cpu_seconds, batch_size, device, global_step):
    """perf/<phase>_s of one update, perf/rollout_s and perf/update_sps (this update's steps per second
    of wall time, the previous update's logging included), perf/cpu_s (the process's CPU time in that
    while, all threads: with one thread, what the update costs on a core of its own), and the peak CUDA
    memory on a GPU."""
    writer.add_scalar("perf/cpu_s", cpu_seconds, global_step)
    for name, seconds in phases.items():
        writer.add_scalar(f"perf/{name}_s", seconds, global_step)
    rollout = sum(v for k, v in phases.items() if k in ("agent", "env", "encoder", "trxl", "rollout_other"))
    writer.add_scalar("perf/rollout_s", rollout, global_step)
    writer.add_scalar("perf/update_sps", batch_size / sum(phases.values()), global_step)
    if device.type == "cuda":
        writer.add_scalar("perf/cuda_max_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30, global_step)
