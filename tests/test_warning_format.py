"""This package's warnings print their class: Lightning's formatter treats every path with
"lightning" in it as its own, simclr_lightning's too, and drops the class a user filters by."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_a_package_warning_names_its_class_and_lightnings_are_unchanged():
    code = (
        "import warnings, simclr_lightning\n"
        "from simclr_lightning.data.corrupt import CorruptImageWarning\n"
        "import simclr_lightning.data.image_folder as inside\n"
        "import lightning.pytorch.trainer.trainer as theirs\n"
        "warnings.warn_explicit('skipping a.jpg', CorruptImageWarning, inside.__file__, 7)\n"
        "warnings.warn_explicit('their note', UserWarning, theirs.__file__, 9)\n"
        "warnings.warn_explicit('a user note', UserWarning, '/elsewhere/x.py', 11)\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    lines = run.stderr.splitlines()
    inside = REPO / "simclr_lightning" / "data" / "image_folder.py"
    assert f"{inside}:7: CorruptImageWarning: skipping a.jpg" in lines
    assert any(line.endswith("trainer.py:9: their note") for line in lines)  # Lightning's
    assert "/elsewhere/x.py:11: UserWarning: a user note" in lines  # Python's own
