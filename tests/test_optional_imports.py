"""The GPU machines' image has torch, torchvision, lightning and torchmetrics but neither
jsonargparse nor wandb: the library itself (everything but the command line and the W&B logger)
must import without them."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

BLOCK_AND_IMPORT = """
import builtins
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("jsonargparse", "wandb"):
        raise ImportError(f"{name} is not installed here")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import simclr_lightning as sl
missing = [name for name in sl.__all__ if not hasattr(sl, name)]
assert not missing, missing
try:
    import simclr_lightning.cli
except ImportError as err:
    print("cli needs:", err)
else:
    raise SystemExit("the guard did not block jsonargparse")
"""


def test_library_imports_without_jsonargparse_or_wandb():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_AND_IMPORT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cli needs: jsonargparse is not installed here" in proc.stdout
