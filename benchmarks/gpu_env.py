"""First contact with a GPU: versions, every import, and one small run of each GPU code path.

    python benchmarks/gpu_env.py --cifar-root cifar10-jpg --json env.json

The device image's torch, torchvision and lightning differ from the ones the tests run with
here, so before any measurement: nvidia-smi, the versions, an import of every module and
public name of ``simclr_lightning``, then nvJPEG decoding against the CPU decoder,
``GPUAugment`` on the device and a bf16 channels-last training step. Each check records its
error rather than stopping the others; ``gpu_session.py`` runs this as its ``env`` part.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def env_checks(cifar_root: Path | None) -> dict:
    """Versions, the GPU, every import, and first contact of each GPU code path (each check
    records its error rather than stopping the rest)."""
    import lightning
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out: dict = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        lightning=lightning.__version__,
        cuda=torch.version.cuda,
        cpu_cores=os.cpu_count(),
        gpu=torch.cuda.get_device_name() if cuda else None,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        shm_gib=shm_gib(),  # the loader workers' batches pass through it (a CPU pipeline's
        # 224 px batch of 256 is 0.3 GB): a container's 64 MB default kills them ("Bus error")
    )
    smi = shutil.which("nvidia-smi")
    out["nvidia_smi"] = (
        subprocess.run([smi], capture_output=True, text=True).stdout if smi else "not found"
    )
    print(out["nvidia_smi"])
    out["import_failures"] = import_everything()
    checks: dict[str, str] = {}
    for name, check in (
        ("nvjpeg_decode", lambda: check_decode(device, cifar_root)),
        ("gpu_augment", lambda: check_augment(device)),
        ("bf16_channels_last_step", lambda: check_step(device)),
    ):
        try:
            checks[name] = check()
        except Exception as err:
            checks[name] = f"FAILED {type(err).__name__}: {err}"[:1000]
    out["checks"] = checks
    out["status"] = env_status(out["import_failures"], checks)
    print(json.dumps({k: v for k, v in out.items() if k != "nvidia_smi"}, indent=1))
    return out


def env_status(import_failures: dict[str, str], checks: dict[str, str]) -> str:
    """``failed`` for a module that does not import or a failed check, else ``ok``; the CLI's
    modules without jsonargparse (``gpu_prepare.sh --no-wheels``) fail nothing the benchmarks
    need."""
    broken = [v for v in import_failures.values() if "'jsonargparse'" not in v]
    failed = broken or any(v.startswith("FAILED") for v in checks.values())
    return "failed" if failed else "ok"


def shm_gib() -> dict[str, float] | str:
    """``/dev/shm``'s size and free space in GiB, or why it could not be read."""
    try:
        usage = shutil.disk_usage("/dev/shm")
    except OSError as err:
        return f"unreadable: {err}"
    return dict(total=round(usage.total / 2**30, 2), free=round(usage.free / 2**30, 2))


def import_everything() -> dict[str, str]:
    """Every module of the package and every public name (what would break first on other
    torch / torchvision versions); the CLI's modules need jsonargparse, which may be absent."""
    import simclr_lightning

    failures = {}
    for info in pkgutil.walk_packages(simclr_lightning.__path__, "simclr_lightning."):
        try:
            importlib.import_module(info.name)
        except Exception as err:
            failures[info.name] = f"{type(err).__name__}: {err}"
    for name in simclr_lightning.__all__:
        if not hasattr(simclr_lightning, name):
            failures[f"simclr_lightning.{name}"] = "missing"
    return failures


def check_decode(device, cifar_root: Path | None) -> str:
    """Batched decode on ``device`` (nvJPEG on CUDA) against the CPU decoder, same files."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    from simclr_lightning.data.encoded import ImageBatch, read_encoded

    files = sorted((cifar_root / "train").rglob("*.jpg"))[:64] if cifar_root else []
    if not files:
        return "no JPEGs to decode"
    batch = ImageBatch([read_encoded(str(f), decode=False) for f in files])
    decoded = batch.decode(device)
    worst = 0
    for image, f in zip(decoded, files, strict=True):
        assert image.device.type == device.type and image.dtype == torch.uint8
        reference = decode_image(str(f), mode=ImageReadMode.RGB)
        worst = max(worst, int((image.cpu().int() - reference.int()).abs().max()))
    return f"ok: {len(files)} JPEGs on {device.type}, max |diff| vs CPU decode {worst}/255"


def check_augment(device) -> str:
    import torch

    from simclr_lightning import GPUAugment, SimCLRAugmentation

    cfg = SimCLRAugmentation(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    generator = torch.Generator(device=device).manual_seed(0)
    augment = GPUAugment(cfg, generator).to(device)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=device)
    a, b = augment.two_views(images)
    assert a.shape == b.shape == (64, 3, 32, 32) and a.device.type == device.type
    assert bool(torch.isfinite(a).all() & torch.isfinite(b).all()) and not torch.equal(a, b)
    return f"ok: two views of 64 on {device.type}"


def check_step(device) -> str:
    import torch

    from simclr_lightning import SimCLR

    model = SimCLR(backbone="resnet18", cifar_stem=True).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.backbone.to(memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(8 if cuda else 4, 3, 32, 32, device=device, generator=gen)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        z_a, z_b = model.head(model(x)).chunk(2)
        loss = model.criterion(z_a, z_b)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    return f"ok: loss {loss.item():.4f} on {device.type}, bf16 autocast {cuda}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar-root", default=None, help="JPEGs to decode (its train/ folder)")
    p.add_argument("--json", default=None, help="write the findings here")
    a = p.parse_args(argv)
    result = env_checks(Path(a.cifar_root) if a.cifar_root else None)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
