"""The README holds as written: its configuration reference against --print_config, and its
first command against .ci/run."""

from __future__ import annotations

import re

import pytest
import yaml

from simclr_lightning.cli import cli_main
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def reference_rows() -> list[tuple[str, str]]:
    block = README.split("<!-- config-reference")[1].split("<!-- /config-reference -->")[0]
    return re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", block, flags=re.M)


def test_configuration_reference_matches_print_config(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    rows = reference_rows()
    assert len(rows) >= 20
    for setting, value in rows:
        node = printed
        for key in setting.split("."):
            assert isinstance(node, dict) and key in node, f"{setting} is not a setting"
            node = node[key]
        assert node == yaml.safe_load(value), (setting, node, value)


def test_first_commands_are_the_quick_start_and_what_ci_runs():
    commands = re.findall(r"```bash\n(.+?)\n```", README, flags=re.S)
    assert commands[0].endswith("simclr-lightning fit --config configs/quickstart.yaml")
    assert commands[0].startswith("python3 -m venv .venv && ")
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
