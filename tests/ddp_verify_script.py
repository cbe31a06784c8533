"""``data.verify`` under Lightning's DDP: run as a script, relaunched once per extra device.
Each rank saves the error it raised and how many files it decoded itself."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

import simclr_lightning.data.corrupt as corrupt  # noqa: E402
from simclr_lightning import ImageFolderDataModule, SimCLR, SimCLRAugmentation  # noqa: E402
from tests.ddp_helpers import ddp_trainer, image_folder_args  # noqa: E402

decoded: list[str] = []
_getitem = corrupt._Decodes.__getitem__


def counting_getitem(self, index):
    decoded.append(self.files[index])
    return _getitem(self, index)


def main() -> None:
    args = image_folder_args()
    corrupt._Decodes.__getitem__ = counting_getitem
    L.seed_everything(0, verbose=False)
    data = ImageFolderDataModule(
        args.root,
        augmentation=SimCLRAugmentation(image_size=8),
        batch_size=2,
        num_workers=0,
        verify=True,
    )
    model = SimCLR(backbone="timm:test_resnet", cifar_stem=False, head_hidden_dim=8)
    trainer = ddp_trainer(args.devices, [], max_steps=1, default_root_dir=str(args.out))
    error = None
    try:
        trainer.fit(model, data)
    except corrupt.CorruptFilesError as err:
        error = {"bad": err.bad, "message": str(err), "listing": err.listing}
    rank = trainer.global_rank
    torch.save(
        {"error": error, "decoded": decoded, "world": trainer.world_size},
        args.out / f"rank{rank}_of{args.devices}.pt",
    )


if __name__ == "__main__":
    main()
