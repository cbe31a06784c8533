"""Training throughput of SimCLR's data paths against the model alone, side by side in one run.

    python benchmarks/throughput.py              # the GPU present (or CPU): full sizes
    python benchmarks/throughput.py --tiny       # seconds on a CPU: every code path, tiny sizes

Prints one table: images/s (each image = two views) and peak GPU memory for

* CIFAR-10, ResNet-18 with the CIFAR stem, 32 px: the model alone on views already on the
  device; the CPU pipeline (torchvision v2 per image, DataLoader with the machine's workers);
  the GPU pipeline (dataset resident on the device, ``GPUAugment``); and the augmentation alone.
* ImageNet-size, ResNet-50 at 224 px, on synthetic JPEGs the script writes (photo-like sizes
  between 300 and 500 px): the model alone; the CPU pipeline; the GPU pipeline with workers
  decoding; the GPU pipeline with nvJPEG decoding (``decode: gpu``).

and a fidelity table: per-sample crop boxes of ``GPUAugment`` against torchvision's
``RandomResizedCrop`` law, and its crop + resize and colour ops against torchvision's own
functions on the same parameters. Every pipeline uses the library's data modules and the
``SimCLR`` module's forward/loss with SGD, bf16 autocast and channels-last on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_lightning import ImageFolderDataModule, SimCLR, SimCLRAugmentation  # noqa: E402
from simclr_lightning.data.device_store import DeviceImageStore  # noqa: E402
from simclr_lightning.data.gpu import GPUAugment, sample_crop_boxes  # noqa: E402
from simclr_lightning.data.transforms import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (CI smoke run)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--workers", type=int, default=None, help="default: all CPU cores")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row")
    p.add_argument("--cifar-batch", type=int, default=None)
    p.add_argument("--imagenet-batch", type=int, default=None)
    p.add_argument("--jpegs", type=int, default=None, help="synthetic ImageNet-size JPEGs")
    p.add_argument("--imagenet-size", type=int, default=None, help="view size, default 224 (64)")
    p.add_argument("--cifar-root", default=None, help="CIFAR ImageFolder (e.g. cifar10-jpg)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--skip-imagenet", action="store_true")
    p.add_argument(
        "--cifar-rows",
        choices=["all", "augment", "none"],
        default="all",
        help="CIFAR rows: all, only the augmentation alone (the pipelines are e2e_throughput.py's "
        "rows), or none",
    )
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = a.tiny
    a.workers = a.workers if a.workers is not None else (1 if tiny else os.cpu_count() or 1)
    defaults = dict(
        steps=(2, 30),
        warmup=(1, 10),
        cifar_batch=(8, 512),
        imagenet_batch=(4, 256),
        jpegs=(16, 2048),
    )
    for name, (small, full) in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, small if tiny else full)
    a.imagenet_size = a.imagenet_size or (64 if tiny else 224)
    a.cifar_images = 64 if tiny else 50_000
    return a


# -- the training step -----------------------------------------------------------------------
def make_step(model: SimCLR, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One SimCLR optimisation step on a pair of view batches, as ``training_step`` does it."""
    model.to(device).train()
    cuda = device.type == "cuda"
    if cuda:
        model.backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            features = model(torch.cat([x_a, x_b]))
            z_a, z_b = model.head(features).chunk(2)
            loss = model.criterion(z_a, z_b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    batches: Iterator, work: Callable, batch_size: int, a: argparse.Namespace
) -> tuple[float, float | None]:
    """Images/s over ``a.steps`` steps after ``a.warmup``, and peak GPU memory in GiB."""
    for _ in range(a.warmup):
        work(next(batches))
    sync(a.device)
    if a.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(a.device)
    start = time.perf_counter()
    for _ in range(a.steps):
        work(next(batches))
    sync(a.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(a.device) / 2**30 if a.device.type == "cuda" else None
    return a.steps * batch_size / seconds, peak


def forever(loader) -> Iterator:
    while True:
        yield from loader


# -- data ----------------------------------------------------------------------------------------
def cifar_folder(a: argparse.Namespace, tmp: Path) -> Path:
    """The CIFAR-10 JPEG copy when given, else a CIFAR-size folder of synthetic JPEGs."""
    if a.cifar_root:
        return Path(a.cifar_root)
    return write_jpegs(
        tmp / "cifar", 64 if a.tiny else 2048, lambda i: (32, 32), epoch_images(a, a.cifar_batch)
    )


def epoch_images(a: argparse.Namespace, batch_size: int) -> int:
    """Images one epoch needs so that no row waits on an epoch restart or on idle workers."""
    return (a.warmup + a.steps + 2 * a.workers + 1) * batch_size


def write_jpegs(
    root: Path, n: int, size_of: Callable[[int], tuple[int, int]], total: int = 0
) -> Path:
    """``n`` photo-like JPEGs (smooth random colour fields plus noise) in two class folders,
    then links to them up to ``total`` files, so an epoch is long but writing stays cheap.
    Each image has its own seed, so the machine's cores can write them (2,048 at 500 px take
    25 s on one core, time the device call would otherwise spend)."""
    jobs = [(i, *size_of(i), root / "train" / f"class{i % 2}" / f"{i:05d}.jpg") for i in range(n)]
    for c in range(min(n, 2)):
        (root / "train" / f"class{c}").mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, 16) if n >= 256 else 1
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forked after the parent ran a parallel torch op, a child's first OpenMP region
        # waits forever on the parent's thread pool, which it does not have: one thread each
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            list(pool.map(write_jpeg, jobs, chunksize=max(1, n // (4 * workers))))
    else:
        for job in jobs:
            write_jpeg(job)
    for i in range(n, total):
        source = root / "train" / f"class{i % n % 2}" / f"{i % n:05d}.jpg"
        (root / "train" / f"class{i % 2}" / f"{i:06d}-link.jpg").symlink_to(source)
    return root


def write_jpeg(job: tuple[int, int, int, Path]) -> None:
    i, h, w, path = job
    gen = torch.Generator().manual_seed(i)
    with torch.inference_mode():
        coarse = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=gen)
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic")[0]
        pixels = (smooth + 0.08 * torch.randn(3, h, w, generator=gen)).clamp(0, 1)
    array = (pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    Image.fromarray(array).save(path, quality=90)


def imagenet_size(i: int, tiny: bool) -> tuple[int, int]:
    sizes = [(375, 500), (500, 375), (333, 500), (500, 500), (300, 400), (480, 360)]
    h, w = sizes[i % len(sizes)]
    return (h // 4, w // 4) if tiny else (h, w)


def module(a: argparse.Namespace, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        num_workers=a.workers, persistent_workers=a.workers > 0, pin_memory=True, **kwargs
    )


def loader_rows(dm: ImageFolderDataModule, step, batch_size: int, a, name: str, rows: list):
    """Time the training loader of ``dm`` feeding ``step`` (views on CPU or on the device)."""
    dm.setup("fit")
    batches = forever(dm.train_dataloader())

    def work(batch):
        if dm.on_device:
            if dm.device_store is not None:
                batch = batch.to(a.device, non_blocking=True)
            else:
                images, labels = batch
                images = images if not torch.is_tensor(images) else images.to(a.device)
                batch = (images, labels.to(a.device, non_blocking=True))
            (x_a, x_b), _ = dm.device_views(batch)
        else:
            (x_a, x_b), _ = batch
            x_a = x_a.to(a.device, non_blocking=True)
            x_b = x_b.to(a.device, non_blocking=True)
        step(x_a, x_b)

    keep(rows, name, timed(batches, work, batch_size, a))


def model_alone_row(step, batch_size: int, size: int, a, name: str, rows: list):
    views = torch.randn(2, batch_size, 3, size, size, device=a.device)
    keep(rows, name, timed(iter(lambda: views, None), lambda v: step(v[0], v[1]), batch_size, a))


def keep(rows: list, name: str, figures: tuple[float, float | None]) -> None:
    """Add a row, and print it at once: a run its time guard kills keeps the rows it measured
    in its log (the table and the JSON come at the end)."""
    rows.append((name, *figures))
    print(f"measured: {name}: {figures[0]:.1f} images/s", flush=True)


# -- workloads -----------------------------------------------------------------------------------
def cifar_rows(a: argparse.Namespace, tmp: Path) -> list:
    rows: list = []
    bs = a.cifar_batch
    aug = SimCLRAugmentation(image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    models = [("eager", False)] + ([("compiled", True)] if a.compile else [])
    root = cifar_folder(a, tmp) if a.cifar_rows == "all" else None
    for label, compiled in models if root is not None else []:
        model = SimCLR(backbone="resnet18", cifar_stem=True)
        if compiled:
            model.backbone.compile()
        step = make_step(model, a.device)
        model_alone_row(step, bs, 32, a, f"CIFAR R18: model alone ({label})", rows)
        cpu = module(a, root=str(root), augmentation=aug, batch_size=bs, augment="cpu")
        loader_rows(
            cpu, step, bs, a, f"CIFAR R18: CPU pipeline, {a.workers} workers ({label})", rows
        )
        gpu = module(
            a, root=str(root), augmentation=aug, batch_size=bs, augment="gpu", resident=True
        )
        loader_rows(gpu, step, bs, a, f"CIFAR R18: GPU pipeline, resident ({label})", rows)

    # the augmentation alone, on resident data
    images = torch.randint(0, 256, (a.cifar_images, 3, 32, 32), dtype=torch.uint8)
    store = DeviceImageStore(images, torch.zeros(len(images), dtype=torch.long)).to(a.device)
    augment = GPUAugment(aug).to(a.device)

    def augment_only(_):
        idx = torch.randint(0, len(store), (bs,), device=a.device)
        augment.two_views(store.gather(idx)[0])

    name = "CIFAR: GPUAugment alone (two views)"
    keep(rows, name, timed(iter(lambda: 0, None), augment_only, bs, a))
    return rows + kornia_row(a)


def imagenet_rows(a: argparse.Namespace, tmp: Path) -> list:
    rows: list = []
    bs, size = a.imagenet_batch, a.imagenet_size
    root = write_jpegs(
        tmp / "imagenet", a.jpegs, lambda i: imagenet_size(i, a.tiny), epoch_images(a, bs)
    )
    aug = SimCLRAugmentation.imagenet(size)
    step = make_step(SimCLR(backbone="resnet50", cifar_stem=False), a.device)
    model_alone_row(step, bs, size, a, f"ImageNet R50 {size}px: model alone", rows)
    for name, kwargs in [
        (f"CPU pipeline, {a.workers} workers", dict(augment="cpu")),
        (f"GPU pipeline, {a.workers} workers decode", dict(augment="gpu", decode="cpu")),
        ("GPU pipeline, nvJPEG decode", dict(augment="gpu", decode="gpu")),
    ]:
        dm = module(a, root=str(root), augmentation=aug, batch_size=bs, **kwargs)
        loader_rows(dm, step, bs, a, f"ImageNet R50 {size}px: {name}", rows)
    return rows


# -- fidelity ------------------------------------------------------------------------------------
def fidelity_rows(a: argparse.Namespace) -> list[tuple[str, str]]:
    """GPUAugment against torchvision on the same random parameters / the same law."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    n = 2000 if a.tiny else 20000
    gen = torch.Generator().manual_seed(0)
    top, left, h, w = sample_crop_boxes(n, 375, 500, (0.08, 1.0), (3 / 4, 4 / 3), gen)
    rrc = v2.RandomResizedCrop(224)
    torch.manual_seed(0)
    ref = [rrc.make_params([torch.empty(3, 375, 500)]) for _ in range(n)]
    ref_area = torch.tensor([p["height"] * p["width"] for p in ref], dtype=torch.float64)
    area = (h * w).double()
    rows = [
        (
            "crop area / image, mean (ours vs torchvision)",
            f"{area.mean() / 187500:.4f} vs {ref_area.mean() / 187500:.4f}",
        ),
    ]
    image = torch.rand(8, 3, 96, 128, generator=gen)
    aug = GPUAugment(SimCLRAugmentation(image_size=64, mean=(0, 0, 0), std=(1, 1, 1)), gen)
    params = aug.sample_params(8, 96, 128)
    from simclr_lightning.data.gpu import adjust_hue, resized_crop

    ours = resized_crop(image, params["top"], params["left"], params["height"], params["width"], 64)
    theirs = torch.stack(
        [
            TF.resized_crop(
                image[i],
                int(params["top"][i]),
                int(params["left"][i]),
                int(params["height"][i]),
                int(params["width"][i]),
                [64, 64],
                antialias=True,
            )
            for i in range(8)
        ]
    )
    rows.append(("crop+resize max |diff| vs TF.resized_crop", f"{(ours - theirs).abs().max():.1e}"))
    hue = torch.linspace(-0.1, 0.1, 8)
    ours_hue = adjust_hue(image, hue)
    theirs_hue = torch.stack([TF.adjust_hue(image[i], float(hue[i])) for i in range(8)])
    rows.append(("hue max |diff| vs TF.adjust_hue", f"{(ours_hue - theirs_hue).abs().max():.1e}"))
    try:
        import kornia
    except ImportError:
        rows.append(("kornia", "not installed (pip install kornia) - comparison skipped"))
        return rows
    # the same boxes through kornia: corners (x, y) clockwise from top-left, inclusive
    boxes = []
    for i in range(8):
        y0, x0 = float(params["top"][i]), float(params["left"][i])
        y1, x1 = y0 + float(params["height"][i]) - 1, x0 + float(params["width"][i]) - 1
        boxes.append([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    k_crop = kornia.geometry.transform.crop_and_resize(image, torch.tensor(boxes), (64, 64))
    rows.append(
        (
            f"kornia {kornia.__version__} crop_and_resize max |diff| vs TF.resized_crop",
            f"{(k_crop - theirs).abs().max():.1e}",
        )
    )
    k_hue = kornia.enhance.adjust_hue(image, hue * 2 * torch.pi)
    rows.append(
        (
            f"kornia {kornia.__version__} adjust_hue max |diff| vs TF.adjust_hue",
            f"{(k_hue - theirs_hue).abs().max():.1e}",
        )
    )
    return rows


def kornia_row(a: argparse.Namespace) -> list:
    """kornia's SimCLR pipeline on the same resident batch as ``GPUAugment alone``."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return []
    s = 0.5
    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop((32, 32), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)),
    ).to(a.device)
    images = torch.randint(0, 256, (a.cifar_images, 3, 32, 32), dtype=torch.uint8, device=a.device)
    bs = a.cifar_batch

    def work(_):
        idx = torch.randint(0, len(images), (bs,), device=a.device)
        x = images[idx].float().div_(255)
        pipeline(torch.cat([x, x]))

    return [
        (
            "CIFAR: kornia AugmentationSequential alone (two views)",
            *timed(iter(lambda: 0, None), work, bs, a),
        )
    ]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.backends.cudnn.benchmark = True
    if a.tiny:  # on a shared small CPU, OpenMP threads spin-waiting for each other cost 10x
        torch.set_num_threads(1)
    device_name = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else "CPU"
    print(
        f"device: {device_name}; torch {torch.__version__}; {os.cpu_count()} CPU cores; "
        f"workers {a.workers}; steps {a.steps} after {a.warmup} warm-up"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = cifar_rows(a, Path(tmp)) if a.cifar_rows != "none" else []
        if not a.skip_imagenet:
            rows += imagenet_rows(a, Path(tmp))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'pipeline':<{width}}  {'images/s':>10}  {'peak GiB':>8}")
    for name, rate, peak in rows:
        peak_s = f"{peak:8.2f}" if peak is not None else f"{'-':>8}"
        print(f"{name:<{width}}  {rate:10.1f}  {peak_s}")

    def variant(name: str) -> tuple[str, str]:  # (workload, eager/compiled): compare like with like
        return name.split(":")[0], name[name.rfind("(") :] if name.endswith(")") else ""

    alone = {variant(r[0]): r[1] for r in rows if "model alone" in r[0]}
    ratios = {}
    print()
    for name, rate, _ in rows:
        key = variant(name)
        if key in alone and "pipeline" in name:
            ratios[name] = rate / alone[key]
            print(f"{name:<{width}}  {ratios[name]:6.2f} x model alone")
    fidelity = fidelity_rows(a)
    print("\nfidelity against torchvision")
    for name, value in fidelity:
        print(f"  {name}: {value}")
    if a.json:
        figures = dict(
            part="throughput",
            device=device_name,
            torch=torch.__version__,
            cpu_cores=os.cpu_count(),
            workers=a.workers,
            steps=a.steps,
            warmup=a.warmup,
            rows=[
                dict(name=n, images_per_s=r, peak_gib=p, ratio=ratios.get(n)) for n, r, p in rows
            ],
            fidelity=dict(fidelity),
        )
        Path(a.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
