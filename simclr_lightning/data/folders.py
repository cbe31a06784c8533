"""How a folder of images is read: which subfolders are classes, which files are images, and
the samples of a labelled split (torchvision's ImageFolder, made safe for the folders users
bring: hidden folders, links back up the tree, classes with no images)."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets

from simclr_lightning.data.corrupt import load_rgb
from simclr_lightning.data.subsets import SkipsCorruptFiles
from simclr_lightning.errors import SettingError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Images in formats not read, beside ones that are: left out, which is said (a folder of only
# these is an error naming them, see other_files)
UNREAD_IMAGES = (".gif", ".heic", ".heif", ".avif", ".jfif", ".jp2", ".svg", ".dng", ".cr2", ".nef")


def class_folders(folder: Path) -> list[str]:
    """The class folders of a split, sorted, leaving out hidden ones (``.ipynb_checkpoints``
    that Jupyter leaves, ``.DS_Store`` folders ...): torchvision's ImageFolder counts them as
    classes, which shifts every label after them."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def visible_image(path: str | Path, root: str | Path) -> bool:
    """An image file under ``root`` with no hidden part in its path below ``root``: not
    Jupyter's ``.ipynb_checkpoints/*-checkpoint.jpg`` copies (duplicates) nor macOS's ``._x.jpg``
    resource forks (not images: they would stop the run as corrupt)."""
    parts = Path(path).relative_to(root).parts
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not any(
        part.startswith(".") for part in parts
    )


def check_layout(folder: Path) -> list[str]:
    """The class folders of a split, once sure that no image lies beside them: ImageFolder
    would drop it unseen (and a folder of unlabeled images holding a subfolder would become
    one class of the subfolder's images alone)."""
    classes = class_folders(folder)
    loose = sorted(p.name for p in folder.iterdir() if visible_image(p, folder) and not p.is_dir())
    if classes and loose:
        raise SettingError(
            f"{folder} holds {len(loose)} image(s) (e.g. {loose[0]}) beside its class folder(s) "
            f"({listed(classes)}): put all images of a split inside class folders (labelled), "
            f"or none (unlabeled images: move the subfolder(s) out)"
        )
    return classes


def listed(names: list[str], at_most: int = 10) -> str:
    """``names`` for a one-line message: the first ``at_most`` and how many there are."""
    shown = ", ".join(names[:at_most])
    return shown if len(names) <= at_most else f"{shown}, ... ({len(names)} in all)"


class ImageFolderFiles(SkipsCorruptFiles, datasets.ImageFolder):
    """torchvision's ImageFolder, able to skip undecodable files (``data.skip_corrupt``).

    ``class_to_idx`` numbers the classes as given (the training split's) instead of from the
    folder's own sub-folders: ``val/`` without one training class must not shift the labels
    of the classes sorted after it. Hidden folders are no classes (:func:`class_folders`),
    and hidden files or folders inside a class hold no images (:func:`visible_image`)."""

    read_item = datasets.ImageFolder.__getitem__

    def __init__(self, root: str, *args, class_to_idx: dict[str, int] | None = None, **kwargs):
        self.given_class_to_idx = class_to_idx
        super().__init__(root, *args, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        mapping = self.given_class_to_idx
        if mapping is None:
            mapping = {name: i for i, name in enumerate(class_folders(Path(directory)))}
        return sorted(mapping, key=mapping.__getitem__), mapping

    def make_dataset(
        self,
        directory: str,
        class_to_idx: dict[str, int],
        extensions=None,
        is_valid_file=None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """torchvision's samples, in its order (by folder, then file name), but a link to a
        folder the walk is already inside (``cat/up -> ..``) is not followed: torchvision
        served ``train/`` again under every class, about 40 times deep, with the wrong label.
        A class folder with no image file is an error (``allow_empty``: a warning), naming
        the files it does hold: torchvision's error names neither."""
        top = frozenset({os.path.realpath(directory)})
        samples, empty, unread = [], [], Counter()
        for name in sorted(class_to_idx):
            folder = Path(directory) / name
            if not folder.is_dir():
                continue  # a class val/ lacks: warned about by the data module
            files = folder_images(folder, Path(directory), top, unread)
            files.sort(key=lambda f: (os.path.dirname(f), os.path.basename(f)))
            samples += [(f, class_to_idx[name]) for f in files]
            if not files:
                empty.append(name)
        if empty:
            problem = (
                f"{directory}: class folder(s) {listed(empty)} hold no images "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)}{other_files(Path(directory), empty)})"
            )
            if not allow_empty:
                raise FileNotFoundError(  # the data module says data.root
                    f"{problem}: add images, convert them, or remove the folder(s)"
                )
            warnings.warn(f"{problem}: no images of those classes here", stacklevel=2)
        warn_unread(directory, unread)
        return samples


class UnlabeledImages(SkipsCorruptFiles, Dataset):
    """Images directly in a folder, without class folders; labels are -1 (unknown)."""

    def __init__(self, root: Path, transform=None, loader=load_rgb) -> None:
        self.files = sorted(
            str(p) for p in root.iterdir() if visible_image(p, root) and p.is_file()
        )
        warn_unread(root, Counter(p.suffix.lower() for p in root.iterdir() if unread_image(p)))
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.files)

    def read_item(self, index: int):
        image = self.loader(self.files[index])
        return (self.transform(image) if self.transform else image), -1


def unread_image(path: Path) -> bool:
    return path.suffix.lower() in UNREAD_IMAGES and not path.name.startswith(".")


def warn_unread(split: str | Path, unread: Counter) -> None:
    """Say how many images of formats not read a split leaves out: GIFs beside JPEGs in a
    class folder were dropped without a word."""
    if unread:
        kinds = ", ".join(f"{n} {kind}" for kind, n in unread.most_common())
        warnings.warn(
            f"{split}: {sum(unread.values())} image(s) in formats not read are left out "
            f"({kinds}; read: {', '.join(IMAGE_EXTENSIONS)}): convert them to train on them",
            stacklevel=3,
        )


def folder_images(
    folder: Path, root: Path, above: frozenset[str], unread: Counter | None = None
) -> list[str]:
    """The images under ``folder`` (in ``root``), through symlinked folders as training's
    ImageFolder goes (``os.walk(followlinks=True)``), but not into a folder it is already
    inside (``above``: real paths), which a link to a parent would repeat without end. A
    dangling link named as an image is kept: reading it names it, as training does."""
    real = os.path.realpath(folder)
    if real in above:
        return []
    files = []
    for entry in os.scandir(folder):
        path = Path(entry.path)
        if entry.is_dir():  # follows a link
            if not entry.name.startswith("."):
                files += folder_images(path, root, above | {real}, unread)
        elif (entry.is_file() or entry.is_symlink()) and visible_image(path, root):
            files.append(str(path))
        elif unread is not None and unread_image(path):
            unread[path.suffix.lower()] += 1
    return files


def other_files(split: Path, classes: list[str]) -> str:
    """``; they hold 3 .gif, 1 .heic`` : the file types in class folders with no image."""
    kinds = Counter(
        Path(f).suffix.lower() or Path(f).name
        for name in classes
        for f in os.listdir(split / name)
        if not f.startswith(".") and (split / name / f).is_file()
    )
    found = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(5))
    return f"; they hold {found}" if found else ""
