"""The three training scripts are copies of one another outside their [algorithm-specific] sections:
the Transformer-XL, the agent, the PPO loop, logging and checkpoints must not drift apart.

    python tests/test_drift.py --sync shelm_ppo.py   # copy the shared code of one script into the others
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["shelm_ppo.py", "helm_ppo.py", "helmv2_ppo.py"]
BEGIN, END = "# [algorithm-specific]", "# [end algorithm-specific]"


def split(text):
    """[shared, specific, shared, specific, ..., shared]: the marker lines stay with the shared parts."""
    parts = re.split(rf"(?<={re.escape(BEGIN)}\n)(.*?)(?=^[ \t]*{re.escape(END)}$)", text, flags=re.S | re.M)
    return parts


def shared_parts(text):
    return split(text)[0::2]


def test_markers_are_balanced():
    for name in SCRIPTS:
        lines = [line.strip() for line in (ROOT / name).read_text().splitlines()]
        markers = [line for line in lines if line in (BEGIN, END)]
        assert markers == [BEGIN, END] * (len(markers) // 2), f"{name}: unbalanced [algorithm-specific] markers"
        assert markers, f"{name} has no [algorithm-specific] section"


def test_shared_code_is_identical():
    reference = shared_parts((ROOT / SCRIPTS[0]).read_text())
    for name in SCRIPTS[1:]:
        parts = shared_parts((ROOT / name).read_text())
        assert len(parts) == len(reference), (
            f"{name} has {len(parts) - 1} specific sections, {SCRIPTS[0]} {len(reference) - 1}"
        )
        for i, (a, b) in enumerate(zip(reference, parts)):
            if a != b:
                diff = next(j for j, (x, y) in enumerate(zip(a.splitlines() + [""], b.splitlines() + [""])) if x != y)
                line = b.splitlines()[diff] if diff < len(b.splitlines()) else "<end>"
                raise AssertionError(f"{name} drifts from {SCRIPTS[0]} in shared part {i}, at line {line!r}")


def test_split_sees_every_line():
    # the check above is only as good as the split: the parts must add up to the whole file
    for name in SCRIPTS:
        text = (ROOT / name).read_text()
        assert "".join(split(text)) == text


def test_drift_is_detected(tmp_path):
    text = (ROOT / SCRIPTS[0]).read_text()
    changed = text.replace("clipfracs = []", "clipfracs = [0.0]", 1)
    assert changed != text
    assert shared_parts(changed) != shared_parts(text)
    specific = text.replace(BEGIN + "\n", BEGIN + "\n# only here\n", 1)
    assert shared_parts(specific) == shared_parts(text)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--sync":
        sys.exit(__doc__)
    source = split((ROOT / sys.argv[2]).read_text())
    for name in SCRIPTS:
        if name == sys.argv[2] or not (ROOT / name).exists():
            continue
        target = split((ROOT / name).read_text())
        assert len(target) == len(source), f"{name}: different number of specific sections"
        merged = [s if i % 2 == 0 else t for i, (s, t) in enumerate(zip(source, target))]
        (ROOT / name).write_text("".join(merged))
        print(f"synced {name}")
