"""LinearEval's class-count check says how to fix it, and lists the data's classes truthfully."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from simclr_lightning.errors import SettingError
from simclr_lightning.evaluation.classify_data import classify_data


def labelled(*names: str) -> SimpleNamespace:
    """A data module whose training set carries ImageFolder's ``classes``."""
    return SimpleNamespace(task="classify", train_set=SimpleNamespace(classes=list(names)))


def test_a_short_list_of_classes_is_complete_and_the_fix_is_named():
    """Two classes were printed as ``(cat, dog...)``, as if some were left out, with no fix."""
    with pytest.raises(SettingError) as err:
        classify_data(labelled("cat", "dog"), 10, {})
    assert str(err.value) == (
        "model.num_classes=10 but the data has 2 classes (cat, dog): set --model.num_classes 2"
    )


def test_a_long_list_says_how_many_classes_it_leaves_out():
    names = [f"class{i}" for i in range(7)]
    with pytest.raises(SettingError) as err:
        classify_data(labelled(*names), 3, {})
    message = str(err.value)
    assert "(class0, class1, class2, class3, class4 and 2 more)" in message
    assert "..." not in message
    assert message.endswith("set --model.num_classes 7")
