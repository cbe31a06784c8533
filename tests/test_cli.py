import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simclr_lightning import SimCLR
from simclr_lightning.cli import cli_main
from simclr_lightning.errors import SettingError
from tests.helpers import REPO, make_subset, quiet_trainer

FAST_CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.sync_batchnorm=false",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.backbone=resnet18",
    "--data.init_args.batch_size=32",
    "--data.init_args.num_workers=0",
    "--data.init_args.augmentation.image_size=32",
    "--data.init_args.augmentation.blur_prob=0",
]


@pytest.fixture(scope="module")
def cifar_100_per_class(cifar_jpg_root, tmp_path_factory) -> Path:
    return make_subset(cifar_jpg_root, tmp_path_factory.mktemp("cifar_100pc"), 100, 10)


@pytest.mark.slow
def test_fit_imagefolder_config_writes_a_checkpoint_that_reloads(
    cifar_100_per_class, tmp_path, caplog
):
    config = str(REPO / "configs" / "imagefolder.yaml")
    args = ["fit", "--config", config, "--data.root", str(cifar_100_per_class)]
    cli = cli_main(args + FAST_CPU + [f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 3
    last = next(tmp_path.rglob("last.ckpt"))
    assert (last.parent.parent / "config.yaml").is_file()  # the CLI saved the full config

    loaded = SimCLR.load_from_checkpoint(last, map_location="cpu")
    assert loaded.hparams.backbone == "resnet18" and loaded.hparams.temperature == 0.1
    images = torch.randn(4, 3, 32, 32)
    trained = cli.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained(images), rtol=0, atol=0)
    assert not torch.equal(loaded(images), SimCLR(backbone="resnet18").eval()(images))

    # --ckpt_path last resumes it, though this run logs (and checkpoints) in a new version
    # folder of the logger: Lightning looked only there, found nothing and started afresh
    more = [f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--ckpt_path=last"]
    resumed = cli_main(args + FAST_CPU + more)
    assert Path(resumed.trainer.ckpt_path) == last
    assert resumed.trainer.global_step == 6
    assert Path(resumed.trainer.checkpoint_callback.dirpath) != last.parent  # a new version

    # Settings given for the model give way to the checkpoint's, for `last` as for a path
    # (the model was built from the config before `last` was found: a CIFAR stem then failed
    # to load this checkpoint's weights); a line says which.
    newest = next(Path(resumed.trainer.checkpoint_callback.dirpath).glob("last.ckpt"))
    stem = ["--model.init_args.cifar_stem=true", "--model.init_args.temperature=0.3"]
    for path in ("last", str(newest)):
        more = [f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=3"]
        caplog.clear()
        with caplog.at_level("INFO"):
            again = cli_main(args + FAST_CPU + more + stem + [f"--ckpt_path={path}"])
        assert Path(again.trainer.ckpt_path) == newest and again.trainer.global_step == 9
        assert not again.model.hparams.cifar_stem and again.model.hparams.temperature == 0.1
        said = caplog.text
        assert "the model is built with its checkpoint's settings: model.cifar_stem=False" in said
        assert "model.temperature=0.1 (given 0.3)" in said


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.init_args.temperature=0", "model.temperature=0.0 is invalid"),
        (
            "--model.init_args.backbone=vit",
            "model.backbone='vit' is invalid: must be one of",
        ),
        ("--data.init_args.batch_size=1", "data.batch_size=1 is invalid"),
    ],
)
def test_bad_values_from_the_command_line_name_the_setting(cifar_tiny, capsys, override, message):
    args = ["fit", "--config", str(REPO / "configs" / "imagefolder.yaml")]
    # jsonargparse validates by instantiating, before any work; from a shell this exits 2.
    with pytest.raises((SystemExit, ValueError)) as failure:
        cli_main(args + ["--data.root", str(cifar_tiny), override])
    assert message in str(failure.value) + capsys.readouterr().err


def test_image_folder_without_train_split_is_reported(cifar_tiny, capsys):
    args = ["fit", "--config", str(REPO / "configs" / "imagefolder.yaml")]
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as failure:
        cli_main(args + ["--data.root", str(cifar_tiny / "train")])
    assert "has no train/ folder" in str(failure.value) + capsys.readouterr().err


@pytest.mark.parametrize(
    "entry", [["simclr-lightning"], [sys.executable, "-m", "simclr_lightning"]]
)
def test_console_entry_points_print_the_config(entry):
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / entry[0])] + entry[1:] if entry[0] == "simclr-lightning" else entry
    cmd += ["fit", "--config", str(REPO / "configs" / "cifar10.yaml"), "--print_config"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: simclr_lightning.SimCLR" in proc.stdout
    assert "batch_size: 512" in proc.stdout and "temperature: 0.5" in proc.stdout


def test_cli_resumes_a_checkpoint_of_a_model_built_in_python(cifar_tiny, tmp_path):

    from simclr_lightning import ImageFolderDataModule, SimCLRAugmentation

    model = SimCLR(
        backbone="resnet18",
        cifar_stem=False,
        temperature=0.3,
        head_hidden_dim=64,
        head_output_dim=32,
    )
    # 32 px, as the CLI run below (the module's default is the paper's 224 px ImageNet crop)
    augmentation = SimCLRAugmentation(image_size=32, blur_prob=0.0)
    data = ImageFolderDataModule(
        str(cifar_tiny), batch_size=32, num_workers=0, augmentation=augmentation
    )
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    ckpt = tmp_path / "python.ckpt"
    trainer.save_checkpoint(ckpt)

    args = ["fit", "--config", str(REPO / "configs" / "imagefolder.yaml")]
    args += ["--data.root", str(cifar_tiny), f"--ckpt_path={ckpt}"]
    overrides = [a for a in FAST_CPU if not a.startswith(("--trainer.max_epochs", "--model."))]
    cli = cli_main(
        args
        + overrides
        + [
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    # the architecture and loss come from the checkpoint, not from the config's defaults
    assert cli.model.hparams.temperature == 0.3 and cli.model.hparams.head_output_dim == 32
    assert cli.trainer.global_step == 4


MAIN_CONFIGS = ["cifar10.yaml", "imagefolder.yaml", "quickstart.yaml"]


@pytest.mark.parametrize(
    "configs",
    [
        ["cifar10.yaml"],
        ["cifar10.yaml", "cifar10_jpg_gpu.yaml"],
        ["cifar10.yaml", "monitors.yaml"],
        ["cifar10.yaml", "wandb.yaml"],
        ["imagefolder.yaml"],
        ["imagefolder.yaml", "monitors.yaml"],
        ["quickstart.yaml"],
        ["quickstart.yaml", "monitors.yaml"],
        ["quickstart_eval.yaml"],
        ["linear_eval.yaml"],
        ["cifar10.yaml", "supcon.yaml"],
        ["linear_eval.yaml", "finetune_semi.yaml"],
        ["imagefolder.yaml", "timm.yaml"],
    ],
)
def test_every_config_parses(configs, cifar_tiny, capsys):
    args = ["fit"]
    for name in configs:
        args += ["--config", str(REPO / "configs" / name)]
    if "root: null" in "".join((REPO / "configs" / n).read_text() for n in configs) or any(
        n == "imagefolder.yaml" for n in configs
    ):
        args += ["--data.root", str(cifar_tiny)]
    with pytest.raises(SystemExit) as done:
        cli_main(args + ["--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("name", MAIN_CONFIGS + ["linear_eval.yaml", "quickstart_eval.yaml"])
def test_configs_leave_machine_settings_to_the_machine(name, cifar_tiny, caplog):
    """On this CPU every config trains in float32 and says so; a user's choice is kept."""
    text = (REPO / "configs" / name).read_text()
    for setting in ("precision:", "benchmark:", "num_workers:"):
        assert setting not in text, setting
    args = ["--config", str(REPO / "configs" / name), "--data.root", str(cifar_tiny)]
    if name not in ("imagefolder.yaml",):
        args = args[:2]
    if name == "quickstart_eval.yaml":
        args += ["--model.checkpoint=null"]
    with caplog.at_level("INFO"):
        cli = cli_main(args + ["--trainer.accelerator=cpu"], run=False)
    assert cli.trainer.precision == "32-true"
    assert "trainer.precision=32-true" in caplog.text
    cli = cli_main(
        args + ["--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed"], run=False
    )
    assert cli.trainer.precision == "bf16-mixed"


def test_precision_and_benchmark_on_gpus(monkeypatch):
    from simclr_lightning import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.device_kind("auto") == "cuda" and cli.device_kind("gpu") == "cuda"
    assert cli.device_kind("cpu") == "cpu"
    # torch.cuda.is_bf16_supported() says yes on any CUDA GPU (emulated below Ampere, slowly)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, precision in (((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert cli.hardware_precision("cuda")[0] == precision
    for capability in ((7, 5), (7, 0), (6, 0)):  # T4, V100, P100: float16 tensor cores
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert cli.hardware_precision("cuda")[0] == "16-mixed"
    assert cli.hardware_precision("cpu")[0] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.device_kind("auto") in ("cpu", "mps")


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_monitors_overlay_extends_every_config(name, cifar_tiny):
    args = [
        "--config",
        str(REPO / "configs" / name),
        "--config",
        str(REPO / "configs" / "monitors.yaml"),
    ]
    if name == "imagefolder.yaml":
        args += ["--data.root", str(cifar_tiny)]
    own = cli_main(
        ["--config", str(REPO / "configs" / name)] + args[4:] + ["--trainer.accelerator=cpu"],
        run=False,
    )
    cli = cli_main(args + ["--trainer.accelerator=cpu"], run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    for callback in own.trainer.callbacks:  # the main config's callbacks stay
        assert type(callback).__name__ in names
    for monitor in ("OnlineLinearProbe", "KNNMonitor", "EmbeddingPlot"):
        assert names.count(monitor) == 1
    assert (
        "num_classes" not in (REPO / "configs" / "monitors.yaml").read_text().split("trainer:")[1]
    )


def test_always_on_callbacks_are_added_only_where_the_config_has_none(tmp_path):
    """The command adds Preemption and RNGState to every run; a config (or Python user's
    habit) listing them too got two RNGStates, which Lightning refuses, and two Preemptions."""
    base = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.accelerator=cpu"]
    base += [f"--trainer.default_root_dir={tmp_path}"]
    names = [type(c).__name__ for c in cli_main(base, run=False).trainer.callbacks]
    assert names.count("Preemption") == names.count("RNGState") == 1
    listed = base + [
        "--trainer.callbacks+=simclr_lightning.RNGState",
        "--trainer.callbacks+=simclr_lightning.Preemption",
    ]
    callbacks = cli_main(listed, run=False).trainer.callbacks
    names = [type(c).__name__ for c in callbacks]
    assert names.count("Preemption") == names.count("RNGState") == 1
    assert names.index("RNGState") < names.index("Preemption")  # the config's own, in its order


def test_batch_counts_read_as_in_python(tmp_path, capsys):
    """``1`` is one batch and ``1.0`` all of them, from the command line and from a config
    file, as ``Trainer(limit_val_batches=1)`` is in Python (and in every subcommand's
    parser); jsonargparse, handed typing's cached Union[float, int, None], had read both as
    1.0."""
    config = tmp_path / "limits.yaml"
    config.write_text("trainer:\n  limit_test_batches: 1\n  limit_predict_batches: 1.0\n")
    args = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--config", str(config)]
    args += ["--trainer.accelerator=cpu", "--trainer.limit_val_batches=1"]
    trainer = cli_main([*args, "--trainer.limit_train_batches=1.0"], run=False).trainer
    got = [
        trainer.limit_val_batches,
        trainer.limit_test_batches,
        trainer.limit_train_batches,
        trainer.limit_predict_batches,
    ]
    assert got == [1, 1, 1.0, 1.0]
    assert [type(value) for value in got] == [int, int, float, float]
    trainer = cli_main([*args, "--trainer.limit_train_batches=0.25"], run=False).trainer
    assert trainer.limit_train_batches == 0.25
    # a subcommand's parser: the validate command of the quick start
    command = ["validate", "--config", str(REPO / "configs" / "quickstart.yaml")]
    with pytest.raises(SystemExit):
        cli_main([*command, "--trainer.limit_val_batches=1", "--print_config"])
    assert "\n  limit_val_batches: 1\n" in capsys.readouterr().out


def test_only_settings_the_user_gave_are_said_to_give_way_to_the_checkpoint(
    caplog, tmp_path, monkeypatch
):
    """``simclr-lightning test --ckpt_path`` of a LinearEval checkpoint said on every run that
    model.checkpoint, cifar_stem and class_names gave way, none of them set by the user: the
    settings compared are those the config and the command line set, and the pretraining
    file's path is none a checkpoint replaces."""
    from simclr_lightning import LinearEval
    from simclr_lightning.cli import say_checkpoint_settings

    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "quickstart_eval.yaml")
    cli = cli_main(["--config", config, "--model.checkpoint=null", "--model.lr=0.5"], run=False)
    given = cli._given_model
    set_in_config = {"checkpoint", "num_classes", "optimizer", "weight_decay", "momentum"}
    assert set(given) == set_in_config | {"lr", "nesterov"}
    assert given["lr"] == 0.5 and given["num_classes"] == 10

    model = LinearEval(num_classes=10, cifar_stem=False, lr=0.1)  # as its checkpoint holds
    model.hparams["class_names"] = [str(i) for i in range(10)]  # read from the data at fit
    with caplog.at_level("INFO"):
        say_checkpoint_settings(given | {"checkpoint": "outputs/q/checkpoints/last.ckpt"}, model)
    said = [r.getMessage() for r in caplog.records if "checkpoint's settings" in r.getMessage()]
    assert said == [
        "simclr-lightning: the model is built with its checkpoint's settings: "
        "model.lr=0.1 (given 0.5)"
    ]


def test_a_forking_strategy_asks_a_child_process_about_the_gpu(monkeypatch):
    """ddp_fork / ddp_notebook fork the processes that train: CUDA initialised in this one
    (by asking the GPU's capability) would make each of them fail, so a child is asked."""
    import subprocess

    from simclr_lightning import hardware

    def here(*args):
        raise AssertionError("CUDA queried in the process that forks")

    asked = []

    def run(command, **kwargs):
        asked.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="8 0\n", stderr="")

    monkeypatch.setattr(torch.cuda, "get_device_capability", here)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(subprocess, "run", run)
    assert hardware.hardware_precision("cuda", fork=True)[0] == "bf16-mixed"
    assert len(asked) == 1 and "get_device_capability" in asked[0][-1]
    assert hardware.capability_in_child() == (8, 0)


def test_a_child_that_cannot_say_gives_float16_which_every_gpu_runs(monkeypatch):
    import subprocess

    from simclr_lightning import hardware

    def run(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, "", "RuntimeError: no CUDA GPUs")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert hardware.capability_in_child() is None
    assert hardware.hardware_precision("cuda", fork=True)[0] == "16-mixed"


def test_strategies_that_fork_are_recognised(monkeypatch):
    """Named, as a class_path config or a Strategy instance; ``auto`` only interactively,
    where Lightning picks ddp_fork for several GPUs."""
    import sys

    from jsonargparse import Namespace
    from lightning.pytorch.strategies import DDPStrategy

    from simclr_lightning.hardware import forks

    assert (
        forks("ddp_fork")
        and forks("ddp_notebook")
        and forks("ddp_fork_find_unused_parameters_true")
    )
    assert not forks("ddp") and not forks("ddp_spawn") and not forks("fsdp")
    assert forks(DDPStrategy(start_method="fork")) and not forks(DDPStrategy())
    config = Namespace(class_path="lightning.pytorch.strategies.DDPStrategy")
    assert not forks(config)
    config.init_args = Namespace(start_method="fork")
    assert forks(config)
    monkeypatch.delattr(sys, "ps1", raising=False)
    assert not forks("auto") and not forks(None)
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert forks("auto") and forks(None)


def test_a_config_piped_in_is_read_once(tmp_path):
    """``--config /dev/stdin`` (or a process substitution) can be read once: the second parse
    that finds the settings the user gave stopped the command with 'Unexpected config'."""
    config = (REPO / "configs" / "quickstart.yaml").read_text()
    flags = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false"]
    flags += ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    flags += ["--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"]
    done = subprocess.run(
        [sys.executable, "-m", "simclr_lightning", "fit", "--config", "/dev/stdin", *flags],
        input=config,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "error" not in done.stderr.lower() and "max_steps=1` reached" in done.stderr


def sample_fit(root: Path, folder: Path, steps: int, *more: str):
    """A tiny CLI fit on the bundled sample, ``steps`` long, saving last.ckpt in ``folder``."""
    return cli_main([
        "fit", "--model=SimCLR", "--model.backbone=timm:test_resnet",
        "--model.cifar_stem=false", "--model.head_hidden_dim=8", "--model.head_output_dim=8",
        "--model.warmup_epochs=0", "--data=SampleDataModule", "--data.batch_size=8",
        "--data.num_workers=0", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={folder}",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0", *more,
    ])  # fmt: skip


def test_ckpt_path_last_takes_a_newer_stop_checkpoint_of_slurm(tmp_path, caplog):
    """A SIGTERM under SLURM saves hpc_ckpt_<n>.ckpt in default_root_dir, not last.ckpt: a run
    started again with --ckpt_path last (as exit code 143 asks) trained from the older
    last.ckpt, or from scratch. It resumes from the stop, and leaves no hpc_ckpt behind
    (the next SLURM job in the folder would resume from it by itself)."""
    import shutil

    def run(root, steps: int, *more: str):
        return sample_fit(root, root / "ckpts", steps, "--trainer.logger=false", *more)

    run(tmp_path, 2)  # ckpts/last.ckpt at step 2
    run(tmp_path / "later", 3)  # a later stop, as SLURM's would be saved
    shutil.copy(tmp_path / "later" / "ckpts" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt")
    with caplog.at_level("INFO"):
        resumed = run(tmp_path, 5, "--ckpt_path=last")
    assert resumed.trainer.ckpt_path == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert resumed.trainer.global_step == 5
    assert f"--ckpt_path last is {tmp_path / 'hpc_ckpt_1.ckpt'}" in caplog.text
    assert not (tmp_path / "hpc_ckpt_1.ckpt").exists()
    again = run(tmp_path, 6, "--ckpt_path=last")  # now the resumed run's last is the newest
    assert Path(again.trainer.ckpt_path).name.startswith("last")  # (last-v1: not its own)
    assert again.trainer.global_step == 6


def test_python_m_names_the_command_in_its_usage():
    """It printed "usage: __main__.py", a name no user types."""
    cmd = [sys.executable, "-m", "simclr_lightning", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: simclr-lightning [-c CONFIG] {fit,validate,test,predict}")


def test_the_command_quiets_torchs_deprecation_of_lightnings_all_gather(capsys):
    """torch 2.14 deprecates what Lightning's strategy.all_gather calls: a FutureWarning a user
    cannot act on, several times per rank in every DDP run. Emitted here as torch words it."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            cli_main(
                ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config"]
            )
        warnings.warn(
            "torch.distributed.nn.functional.all_gather is deprecated, use "
            "torch.distributed._functional_collectives.all_gather_single instead.",
            FutureWarning,
            stacklevel=1,
        )
    capsys.readouterr()
    assert not [w for w in caught if "all_gather is deprecated" in str(w.message)]


def test_a_stop_checkpoint_is_taken_only_when_newer_than_lightnings_own_last(tmp_path):
    """Without a logger or a dirpath, ModelCheckpoint's folder is <default_root_dir>/
    checkpoints, unknown before setup: an older hpc_ckpt beat a newer last.ckpt there."""
    import os

    import lightning as L

    from simclr_lightning.last_checkpoint import newer_stop_checkpoint

    stop = tmp_path / "hpc_ckpt_1.ckpt"
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    stop.write_bytes(b"stop"), last.write_bytes(b"last")
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    os.utime(stop, (1000, 1000)), os.utime(last, (2000, 2000))
    assert newer_stop_checkpoint(trainer, None) is None  # Lightning's rule: the newer last
    os.utime(stop, (3000, 3000))
    assert newer_stop_checkpoint(trainer, None) == str(stop)


TORCHRUN_RANK_0_OF_2 = {
    "WORLD_SIZE": "2",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "GROUP_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29531",
    "TORCHELASTIC_RUN_ID": "test",
}


def test_a_torchrun_launch_with_a_trainer_of_one_device_is_refused(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node 2 -m simclr_lightning fit`` without --trainer.devices 2
    ran two separate single-process trainings on all the data, both writing last.ckpt, and
    exited 0. The environment is torchrun's for rank 0; nothing starts a process group here."""
    for name, value in TORCHRUN_RANK_0_OF_2.items():
        monkeypatch.setenv(name, value)
    base = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.accelerator=cpu"]
    base += [f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SettingError, match=(
        r"^launched as 2 processes \(WORLD_SIZE=2: torchrun, srun ...\) but trainer.devices=1 "
        r"x trainer.num_nodes=1 runs one, so each would train alone on all the data: set "
        r"--trainer.devices"
    )):  # fmt: skip
        cli_main(base, run=False)
    cli = cli_main(base + ["--trainer.devices=2", "--trainer.strategy=ddp"], run=False)
    assert cli.trainer.world_size == 2
    # and the quick start on 2 devices normalises over the global batch, as one process
    # holding both batches would (per device, its losses were not the single process's)
    from simclr_lightning import GlobalBatchNorm

    assert isinstance(cli.trainer.strategy._layer_sync, GlobalBatchNorm)


def test_ckpt_path_last_in_a_fixed_folder_builds_the_model_with_its_settings(tmp_path, caplog):
    """With ModelCheckpoint's dirpath fixed (the quick start's), ``last`` was left to
    Lightning: the model kept the command's changed settings silently (temperature 0.5 over
    the checkpoint's 0.2), and another optimizer failed in its step (``KeyError:
    'momentum'``), where the same file given by its path gives way and says so."""

    def run(steps: int, *more: str):
        return sample_fit(tmp_path, tmp_path / "c", steps, *more)

    run(2, "--model.temperature=0.2", "--model.optimizer=adamw")
    with caplog.at_level("INFO"):
        resumed = run(3, "--ckpt_path=last", "--model.temperature=0.5", "--model.optimizer=sgd")
    assert resumed.trainer.ckpt_path == str(tmp_path / "c" / "last.ckpt")
    assert resumed.trainer.global_step == 3
    assert resumed.model.hparams.temperature == 0.2 and resumed.model.hparams.optimizer == "adamw"
    assert "the model is built with its checkpoint's settings: model." in caplog.text
    assert "model.temperature=0.2 (given 0.5)" in caplog.text
    assert "model.optimizer='adamw' (given 'sgd')" in caplog.text
