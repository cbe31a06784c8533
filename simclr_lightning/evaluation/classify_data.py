"""What LinearEval checks and records of its data and checkpoints: single labelled views, the
class count, the evaluation preprocessing that prediction needs later (and its normalisation
against pretraining's), and whether a checkpoint is a pretraining one."""

from __future__ import annotations

import inspect
import math
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from simclr_lightning.checkpoint import ARCH_KEYS
from simclr_lightning.data.class_names import dataset_class_names
from simclr_lightning.data.transforms import preprocessing_of
from simclr_lightning.errors import SettingError


def classify_data(
    datamodule, num_classes: int, pretraining: dict[str, Any]
) -> tuple[list[str] | None, dict | None]:
    """The data's class names (checked against ``num_classes``) and evaluation preprocessing
    (its normalisation checked against ``pretraining``'s, a checkpoint's
    :func:`~simclr_lightning.checkpoint.pretraining_record`); refuses a data module that serves
    two views."""
    if getattr(datamodule, "task", "classify") != "classify":
        raise SettingError(
            "LinearEval trains on single labelled views: set data.task=classify "
            f"(got data.task={datamodule.task!r})"
        )
    names = dataset_class_names(datamodule)
    if names is not None and len(names) < 2:  # model.num_classes=1 would be refused next
        raise SettingError(
            f"the data has {len(names)} class ({listed(names)}): a classifier needs images of "
            f"at least 2 classes (a class folder each)"
        )
    if names is not None and len(names) != num_classes:
        raise SettingError(
            f"model.num_classes={num_classes} but the data has {len(names)} classes "
            f"({listed(names)}): set --model.num_classes {len(names)}"
        )
    preprocessing = preprocessing_of(datamodule)
    check_normalisation(pretraining, preprocessing)
    return names, preprocessing


def checkpoint_architecture(cls: type, given: dict, saved: dict) -> dict:
    """The encoder's settings (``backbone``, ``cifar_stem``, ...): the checkpoint's, which
    its weights need; a setting given otherwise than both its default and the checkpoint's
    value is said to be ignored, not dropped in silence."""
    defaults = inspect.signature(cls.__init__).parameters  # a subclass's may lack some
    ignored = [
        f"model.{key}={given[key]!r}"
        for key, value in saved.items()
        if key in given and given[key] not in (value, getattr(defaults.get(key), "default", value))
    ]
    if ignored:
        kept = ", ".join(f"{key}={value!r}" for key, value in saved.items())
        rank_zero_warn(
            f"{', '.join(ignored)} ignored: the encoder is built as model.checkpoint's "
            f"({kept}), which its weights need",
            category=UserWarning,
        )
    return {key: given.get(key) for key in ARCH_KEYS} | saved


def warn_idle_settings(hparams: Any, ckpt_path: Any) -> None:
    """Settings a fit would otherwise ignore in silence: without ``checkpoint`` (nor a
    LinearEval checkpoint to resume) the classifier learns on a randomly initialised encoder,
    a baseline rarely meant, and ``backbone_lr`` trains nothing without ``finetune``."""
    if hparams.checkpoint is None and ckpt_path is None:
        rank_zero_warn(
            "model.checkpoint is not set: LinearEval trains its classifier on a randomly "
            "initialised encoder (a baseline); give the SimCLR checkpoint to evaluate as "
            "--model.checkpoint",
            category=UserWarning,
        )
    if hparams.backbone_lr is not None and not hparams.finetune:
        rank_zero_warn(
            f"model.backbone_lr={hparams.backbone_lr} is ignored: the encoder is frozen; set "
            f"model.finetune=true to train it at that rate",
            category=UserWarning,
        )


def listed(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more: an ellipsis after a complete list read as
    classes left out."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def check_normalisation(pretraining: dict[str, Any], here: dict | None) -> None:
    """Warn when linear evaluation prepares its images otherwise than pretraining did (another
    normalisation or image size): the frozen encoder (its BatchNorm statistics too) then sees
    inputs unlike those it learned on, and the accuracy drops with no error. Nothing to
    compare when either side is unknown (a checkpoint from before the record, a user's own
    loaders)."""
    changed = preparation_changes(pretraining.get("preprocessing"), here)
    if changed:
        rank_zero_warn(
            f"model.checkpoint={pretraining.get('checkpoint')!r} was pretrained on images "
            f"prepared otherwise: {'; '.join(changed)}: the encoder sees inputs unlike those "
            f"it learned on; set them to pretraining's",
            category=UserWarning,
        )


def preparation_changes(before: dict | None, now: dict | None) -> list[str]:
    """The data settings of ``now``'s preprocessing that differ from ``before``'s, as
    ``data.augmentation.<key>=<now> (was <before>)``; none where either is unknown. Statistics
    within 0.001 are the same: CIFAR-10's are quoted to 4 digits and to 8."""
    if not before or not now:
        return []
    changes = []
    for key in ("image_size", "mean", "std"):
        was, given = before.get(key), now.get(key)
        if was is None or given is None:
            continue
        if key == "image_size":
            same = was == given
        else:
            same = len(was) == len(given) and all(
                math.isclose(a, b, abs_tol=1e-3) for a, b in zip(was, given, strict=True)
            )
        if not same:
            shown = (given, was) if key == "image_size" else (_rounded(given), _rounded(was))
            changes.append(f"data.augmentation.{key}={shown[0]} (was {shown[1]})")
    return changes


def check_evaluated_data(model, trainer) -> None:
    """Before ``test``/``validate``/``predict`` of a trained classifier: data with other
    classes is scored against the wrong ones (an image folder numbers its classes by their
    sorted names, so one class fewer shifts every label after it) and data prepared otherwise
    than the classifier's training loses accuracy, both with no error."""
    datamodule, stage = trainer.datamodule, trainer.state.fn.value
    refuse_untrained(model.head, stage)
    if datamodule is None:
        return
    names, trained = dataset_class_names(datamodule), model.class_names
    if stage != "predict" and names is not None:  # prediction reads no labels
        num_classes = model.hparams.num_classes
        if len(names) != num_classes:
            raise SettingError(
                f"the classifier has {num_classes} classes"
                f"{f' ({listed(trained)})' if trained else ''} but the {stage} data has "
                f"{len(names)} ({listed(names)}): its labels would be scored against other "
                f"classes; {stage} on data with the classifier's classes"
            )
        # The data's names at training (model.class_names may be display names of them); a
        # checkpoint saved before they were kept has only class_names: the same ones in
        # another order are refused, other names left alone
        recorded = getattr(model, "data_class_names", None)
        if recorded is not None and names != recorded:
            check_class_order(names, recorded, stage)
        elif recorded is None and trained and names != trained and sorted(names) == sorted(trained):
            check_class_order(names, trained, stage)
    changed = preparation_changes(model.preprocessing, preprocessing_of(datamodule))
    if changed:
        rank_zero_warn(
            f"the classifier was trained on images prepared otherwise than the {stage} "
            f"data's: {'; '.join(changed)}: its accuracy drops with no error; set them as "
            f"in its training (its checkpoint records them)",
            category=UserWarning,
        )


def refuse_untrained(head, stage: str) -> None:
    """A classifier of all-zero weights (``zero_init_classifier``, before any step) scores
    every image as class 0 with probability 1/C: a ``test`` or ``predict`` of a LinearEval
    config without ``--ckpt_path`` (its ``model.checkpoint`` is only the encoder) reported
    chance figures and exited 0."""
    if not (head.weight.any() or head.bias.any()):
        raise SettingError(
            f"{stage} of a LinearEval whose classifier was never trained (its weights are all "
            f"zero): give the trained LinearEval checkpoint as --ckpt_path (ckpt_path= in "
            f"Python); model.checkpoint is only the pretrained encoder, which fit trains on"
        )


def check_class_order(names: list[str], trained: list[str], stage: str) -> None:
    """Labels are scored by number: a class both have at another number (a renamed or
    missing folder shifts the sorted ones after it) is refused, other names a warning."""
    for i, name in enumerate(names):
        if name in trained and trained.index(name) != i:
            raise SettingError(
                f"the {stage} data's class {i} is {name!r}, the classifier's class "
                f"{trained.index(name)}: its labels would be scored against other classes (the "
                f"data's: {listed(names)}; the classifier's: {listed(trained)}); give the "
                f"classifier's classes, in its order"
            )
    rank_zero_warn(
        f"the {stage} data's classes ({listed(names)}) are not the ones the classifier was "
        f"trained on ({listed(trained)}): they are scored by number, class 0 as "
        f"{trained[0]!r} and so on",
        category=UserWarning,
    )


def record_class_names(model, names: list[str] | None) -> None:
    """The fit data's class names, which later evaluations are checked against, and the ones
    predictions are written with, unless ``model.class_names`` gave others."""
    model.data_class_names = names
    if names is not None and model.class_names is None:
        model.class_names = names
        model.hparams["class_names"] = names


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def is_pretraining(checkpoint: dict[str, Any]) -> bool:
    """A SimCLR (not LinearEval) checkpoint: it has a projection head and no classifier."""
    state = checkpoint.get("state_dict") or {}
    class_path = str((checkpoint.get("hyper_parameters") or {}).get("_class_path", ""))
    has_head = any(k.startswith("head.net.") for k in state)
    return class_path.endswith(".SimCLR") or (has_head and "head.weight" not in state)


def refuse_pretraining(checkpoint: dict[str, Any], path: Any) -> None:
    """Refuse a SimCLR checkpoint given as LinearEval's ``--ckpt_path`` (before its weights
    load): it would resume SimCLR's epoch and step, training nothing, or fail deep inside
    Lightning."""
    if "linear_eval" not in checkpoint and is_pretraining(checkpoint):
        raise SettingError(
            f"ckpt_path={str(path)!r} is a SimCLR pretraining checkpoint, not a LinearEval "
            f"one: give it as --model.checkpoint (the encoder to evaluate); --ckpt_path "
            f"resumes or evaluates a LinearEval run"
        )


def classify_batch(batch) -> tuple[Tensor, Tensor]:
    x, y = batch
    if isinstance(x, (tuple, list)):
        raise SettingError(
            "LinearEval got two views per image: set data.task=classify for linear evaluation"
        )
    return x, y.long()  # cross_entropy takes int64 targets, a user's dataset may give int32
