"""The GPU check of issue 19, after benchmark/gpu_check.sh has installed the wheels of .whl/ (its step 0):

    bash benchmark/gpu_check.sh OUT_DIR                 # on the GPU machine: at most 8 minutes
    bash benchmark/gpu_check.sh OUT_DIR --cpu-dry-run   # here: the same steps on the CPU, tiny models

Steps, each timed, each recorded whatever the others did (a failed step never stops the check):
1. environment: nvidia-smi, Python, torch and its CUDA, the GPU, the versions of the packages the project
   needs, the imports of those the wheels bring, and their Requires-Dist against what is installed;
2. pytest: `pytest -m cuda tests`, the `cuda` cases of the tests parametrized by the `device` fixture, with
   HELM_TEST_DEVICE=cuda (a missing GPU fails them) or, in the dry run, cpu (the same tests on the CPU);
3. throughput at --n-layer 2, then 18: benchmark/throughput.py --cuda with the real-size random models, one
   repeat, the CNN-PPO loop measured on the same GPU in the same run (dry run: the tiny models, one update).
gpu_check.sh runs this in a fresh folder of its own inside OUT_DIR (OUT_DIR/.gpu_check.XXXXXX), where
gpu_check.json is rewritten after every step (what a killed check got so far survives there), and moves the
results (gpu_check.json, gpu_check.log, pytest.xml, throughput_n*.json) into OUT_DIR together once the check has
finished: an earlier check's results are replaced only by a finished one's. Exit status 1 if any step failed.

Budget: GPU_CHECK_BUDGET_S (480 s) from the start of gpu_check.sh; each step's timeout is cut to what is
left of it. GPU_CHECK_WARMUP and GPU_CHECK_MEASURED set the throughput's updates (3 and 3), GPU_CHECK_N_LAYERS
its --n-layer values ("2 18"). These settings and OUT_DIR are checked before anything runs (`--check-only`, which
gpu_check.sh calls first): one `error:` line and exit status 2 otherwise. Only the standard library and
helm_utils.files are imported here: the check records what the machine lacks, it does not depend on it.
"""

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helm_utils import InputError  # noqa: E402
from helm_utils.files import output_files, write_atomically  # noqa: E402

BUDGET_S = 480
MAX_BUDGET_S = 24 * 3600
MAX_UPDATES = 10_000  # benchmark/throughput.py's bound of --warmup-updates and --measured-updates
MAX_N_LAYER = 18  # transfo-xl-wt103's layers: the most --n-layer can keep
USAGE = (
    "usage: bash benchmark/gpu_check.sh OUT_DIR [--cpu-dry-run] (gpu_check.py [--check-only] OUT_DIR [--cpu-dry-run])"
)
N_LAYERS = (2, 18)
# the slice of the budget each step may take at most (the last throughput step gets all that is left)
STEP_LIMITS_S = {"environment": 60, "pytest": 150, "throughput_n2": 170}
VIDEO_SKIP = (
    "video tests skipped: imageio_ffmpeg is not installed (its cp312 wheel is 64.85 MiB, more than can be carried "
    "to the GPU machine); tests/test_enjoy.py, which imports it, is left out of the pytest step"
)

# run in the checked Python: versions, the GPU, the imports, the wheels' Requires-Dist (stdout: one JSON line)
ENVIRONMENT_PROBE = r"""
import importlib, importlib.metadata as md, json, platform, re, sys, zipfile
from pathlib import Path
info = {"python": sys.version.split()[0], "python_executable": sys.executable, "platform": platform.platform()}
packages = ["torch", "torchvision", "numpy", "gymnasium", "minigrid", "pygame-ce", "tyro", "open_clip_torch", "timm",
            "huggingface_hub", "safetensors", "tensorboard", "pytest", "typing_extensions", "typeguard", "submitit",
            "moviepy", "imageio-ffmpeg", "pillow"]
versions = {}
for name in packages:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
info["versions"] = versions
failed = {}
for module in ["torch", "gymnasium", "minigrid", "tyro", "open_clip", "submitit", "tensorboard", "huggingface_hub"]:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - recorded
        failed[module] = f"{type(e).__name__}: {e}"
info["import_errors"] = failed
import torch
info["torch_cuda"] = torch.version.cuda
info["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1),
                   "count": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported(),
                   "cudnn": torch.backends.cudnn.version()}
unsatisfied = []
try:
    from packaging.requirements import Requirement
    env = {"extra": ""}
    for whl in sorted(Path(sys.argv[1]).glob("*.whl")) if len(sys.argv) > 1 else []:
        with zipfile.ZipFile(whl) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                have = None
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                unsatisfied.append(f"{whl.name.split('-')[0]} requires {req}, found {have}")
except ImportError as e:
    unsatisfied.append(f"not checked: {e}")
info["unsatisfied_requirements"] = unsatisfied
print(json.dumps(info))
"""


def pytest_summary(junit_xml):
    """Counts of a pytest junit XML file, and the ids of the tests that failed or errored."""
    root = ET.parse(junit_xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failed.append({"test": name, "message": (problem.get("message") or "").splitlines()[0][:300]})
    counts["failed_tests"] = failed
    return counts


def throughput_summary(results_json, label, cuda):
    """The figures of one throughput.py measurement: per variant SPS, ratio to the CNN-PPO loop, peak GPU
    memory (GB, None where the process did not use the GPU) and peak RSS; and the problems, where a script
    meant to run on the GPU did not."""
    run = json.loads(Path(results_json).read_text())["runs"][label]
    variants, problems = {}, []
    for name, v in run["variants"].items():
        variants[name] = {
            "sps": round(v["sps"], 1),
            "ratio_to_cnn_ppo": round(v["ratio_to_cnn_ppo"], 3),
            "cuda_max_memory_gb": round(v["cuda_max_memory_gb"], 3) if "cuda_max_memory_gb" in v else None,
            "peak_rss_gb": round(v["peak_rss_gb"], 2),
        }
        if cuda and name != "env" and "cuda_max_memory_gb" not in v:
            problems.append(f"{name} did not run on the GPU (no peak CUDA memory)")
    return {
        "variants": variants,
        "steps_measured": run["steps_measured"],
        "warmup_steps": run["warmup_steps"],
        "command": run["command"],
        "problems": problems,
    }


def write_result(out_dir, result):
    """OUT_DIR/gpu_check.json, written whole (helm_utils.files: a temporary file of its own renamed, no link
    followed): a reader never sees half of it."""
    path = Path(out_dir) / "gpu_check.json"
    data = (json.dumps(result, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()
    write_atomically(path, lambda f: f.write(data))
    return path


class Check:
    def __init__(self, out_dir, dry_run, python, start, budget_s, settings=None):
        self.out, self.dry_run, self.python = Path(out_dir), dry_run, python
        self.start, self.budget_s = start, budget_s
        self.settings = settings or {"n_layers": list(N_LAYERS), "warmup": 3, "measured": 3}
        self.result = {
            "check": "benchmark/gpu_check.sh (issue 19)",
            "dry_run": dry_run,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
            "budget_s": budget_s,
            "host": platform.node(),
            "ok": None,
            "steps": {},
        }

    def left(self):
        return self.budget_s - (time.time() - self.start)

    def say(self, message):
        print(f"[gpu_check {time.time() - self.start:6.1f} s] {message}", flush=True)

    def save(self):
        steps = self.result["steps"].values()
        self.result["ok"] = all(s.get("ok") for s in steps)
        self.result["failed_steps"] = [name for name, s in self.result["steps"].items() if not s.get("ok")]
        self.result["elapsed_s"] = round(time.time() - self.start, 1)
        write_result(self.out, self.result)

    def run(self, cmd, timeout, env=None, capture=False):
        """(exit status, stdout if captured, whether it timed out); output goes to our stdout (the log). The
        command runs in its own process group, all of which a timeout ends (throughput.py's children too)."""
        shown = [c if len(str(c)) < 200 else "<script>" for c in cmd]  # the environment probe: not in the log
        self.say("$ " + shlex.join(map(str, shown)) + f"  (timeout {timeout:.0f} s)")
        proc = subprocess.Popen(
            list(map(str, cmd)),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE if capture else None,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout))
            return proc.returncode, out, False
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            out = proc.stdout.read() if capture and proc.stdout else None
            return None, out, True

    def step(self, name, fn):
        """Run one step, timed; an exception or a False return fails it, never the check."""
        self.say(f"step {name}: start ({self.left():.0f} s of the budget left)")
        record = {"ok": False}
        t = time.time()
        try:
            record.update(fn())
        except Exception as e:  # noqa: BLE001 - a failed step is recorded, the next one runs
            record["error"] = f"{type(e).__name__}: {e}"
        record["seconds"] = round(time.time() - t, 1)
        self.result["steps"][name] = record
        self.save()
        self.say(f"step {name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s")
        return record

    def limit(self, name):
        return min(STEP_LIMITS_S.get(name, self.left()), self.left() - 5)

    # ---- steps ------------------------------------------------------------------------------------------

    def environment(self):
        record = {}
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            print(smi.stdout + smi.stderr, flush=True)
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            record["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            record["nvidia_smi"] = f"not available: {e}"
        wheels = ROOT / ".whl"
        rc, out, timed_out = self.run(
            [self.python, "-c", ENVIRONMENT_PROBE, str(wheels)], self.limit("environment"), capture=True
        )
        if rc != 0 or not out:
            raise RuntimeError("the environment probe failed" + (" (timeout)" if timed_out else f" ({rc})"))
        info = json.loads(out.strip().splitlines()[-1])
        record.update(info)
        print(json.dumps(info, indent=1), flush=True)
        self.result["versions"] = {k: info[k] for k in ("python", "torch_cuda")} | info["versions"]
        self.result["device"] = (info.get("gpu") or {}).get("name", "cpu")
        problems = [f"cannot import {m}: {e}" for m, e in info["import_errors"].items()]
        problems += info["unsatisfied_requirements"]
        if not self.dry_run and not info["cuda_available"]:
            problems.append("torch.cuda.is_available() is False")
        record["problems"] = problems
        record["ok"] = not problems
        return record

    def pytest(self):
        junit = self.out / "pytest.xml"
        junit.unlink(missing_ok=True)
        cmd = [self.python, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider", "-rfEs"]
        cmd += ["--junitxml", junit]
        record = {"device": "cpu (dry run)" if self.dry_run else "cuda"}
        if subprocess.run([self.python, "-c", "import imageio_ffmpeg"], capture_output=True).returncode != 0:
            cmd += ["--ignore", "tests/test_enjoy.py"]
            record["video"] = VIDEO_SKIP
            self.say(VIDEO_SKIP)
        env = dict(os.environ, HELM_TEST_DEVICE="cpu" if self.dry_run else "cuda")
        rc, _, timed_out = self.run(cmd, self.limit("pytest"), env=env)
        record |= {"exit_status": rc, "timed_out": timed_out}
        if junit.exists():
            record |= pytest_summary(junit)
        record["ok"] = rc == 0 and record.get("passed", 0) > 0
        self.result["pytest"] = {k: record.get(k) for k in ("tests", "passed", "failures", "errors", "skipped")}
        return record

    def throughput(self, n_layer):
        label = f"gpu-check-n{n_layer}"
        out = self.out / f"throughput_n{n_layer}.json"
        out.unlink(missing_ok=True)
        cmd = [self.python, ROOT / "benchmark" / "throughput.py", "--label", label, "--n-layers", n_layer]
        cmd += ["--repeats", "1", "--out", out, "--docs", ""]
        if self.dry_run:  # the tiny models, one small update: the machinery, not a measurement
            cmd += ["--no-cuda", "--tiny", "--num-envs", "2", "--num-steps", "8"]
            cmd += ["--warmup-updates", "0", "--measured-updates", "1"]
        else:
            cmd += ["--cuda", "--warmup-updates", self.settings["warmup"]]
            cmd += ["--measured-updates", self.settings["measured"]]
        rc, _, timed_out = self.run(cmd, self.limit(f"throughput_n{n_layer}"))
        record = {"exit_status": rc, "timed_out": timed_out}
        if rc == 0:
            record |= throughput_summary(out, label, cuda=not self.dry_run)
            record["ok"] = not record["problems"]
            self.result.setdefault("throughput", {})[f"n_layer_{n_layer}"] = {
                name: {k: v[k] for k in ("sps", "ratio_to_cnn_ppo", "cuda_max_memory_gb")}
                for name, v in record["variants"].items()
            }
        return record

    def main(self, install):
        self.result["steps"]["install"] = install
        self.save()
        self.step("environment", self.environment)
        self.step("pytest", self.pytest)
        for n_layer in self.settings["n_layers"]:
            self.step(f"throughput_n{n_layer}", lambda n=n_layer: self.throughput(n))
        self.result["finished"] = True  # what gpu_check.sh waits for before the results replace earlier ones
        self.save()
        self.say(
            f"{'all steps ok' if self.result['ok'] else 'FAILED: ' + ', '.join(self.result['failed_steps'])}; "
            f"{self.out / 'gpu_check.json'}, {time.time() - self.start:.0f} s"
        )
        return 0 if self.result["ok"] else 1


def fail(message):
    """One `error:` line and exit status 2: the check's input, not one of its steps, is wrong."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def setting(name, default, parse, valid, wanted):
    """An environment variable's value, parsed and checked, or one line naming it."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        fail(f"{name} must be {wanted}, got {raw!r}")
    return value


def settings():
    """The GPU_CHECK_* settings, each checked before anything runs."""

    def layers(raw):
        values = [int(n) for n in raw.split()]
        return values if values and len(set(values)) == len(values) else None

    def install(raw):
        value = json.loads(raw)
        good = isinstance(value, dict) and isinstance(value.get("ok"), bool) and isinstance(value.get("detail"), str)
        return value if good else None

    now = time.time()
    return {
        "start": setting(
            "GPU_CHECK_START", now, float, lambda t: 0 < t <= now + 1, "a time (seconds since 1970) not ahead"
        ),
        "budget": setting(
            "GPU_CHECK_BUDGET_S", BUDGET_S, float, lambda b: 0 < b <= MAX_BUDGET_S, f"seconds in (0, {MAX_BUDGET_S}]"
        ),
        "warmup": setting(
            "GPU_CHECK_WARMUP", 3, int, lambda n: 0 <= n <= MAX_UPDATES, f"updates in [0, {MAX_UPDATES}]"
        ),
        "measured": setting(
            "GPU_CHECK_MEASURED", 3, int, lambda n: 1 <= n <= MAX_UPDATES, f"updates in [1, {MAX_UPDATES}]"
        ),
        "n_layers": setting(
            "GPU_CHECK_N_LAYERS",
            list(N_LAYERS),
            layers,
            lambda ns: all(1 <= n <= MAX_N_LAYER for n in ns),
            f"distinct --n-layer values in [1, {MAX_N_LAYER}], separated by spaces",
        ),
        "install": setting(
            "GPU_CHECK_INSTALL",
            {"ok": True, "detail": "not run by gpu_check.sh"},
            install,
            lambda v: True,
            'a JSON object {"ok": true or false, "detail": "..."} (gpu_check.sh sets it)',
        ),
    }


def result_files(n_layers):
    """The files of one check's results in OUT_DIR: one set, replaced together by gpu_check.sh."""
    return ["gpu_check.json", "gpu_check.log", "pytest.xml", *(f"throughput_n{n}.json" for n in n_layers)]


def main(argv):
    check_only = argv[:1] == ["--check-only"]
    argv = argv[1:] if check_only else argv
    if not argv or argv[0].startswith("-") or any(a != "--cpu-dry-run" for a in argv[1:]):
        fail(f"unknown arguments {' '.join(argv)}; {USAGE}")
    out_dir, dry_run = Path(argv[0]), "--cpu-dry-run" in argv[1:]
    chosen = settings()
    try:
        output_files(out_dir, result_files(chosen["n_layers"]), "OUT_DIR")
    except InputError as e:
        fail(str(e.code).removeprefix("error: "))
    if check_only:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(out_dir, dry_run, sys.executable, chosen["start"], chosen["budget"], chosen)
    return check.main(chosen["install"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
