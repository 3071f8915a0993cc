"""`icon fit|validate|test|predict --config …` (LightningCLI) and `icon sweep SWEEP.yaml` (offline W&B sweeps)."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from icon_lightning import __version__
from icon_lightning.callbacks import ClusterAssignmentWriter, Convergence
from icon_lightning.data.datamodule import ClusteringDataModule
from icon_lightning.data.feature_store import atomic_write_json
from icon_lightning.models.module import IConModule


def wandb_offline_unless_logged_in() -> bool:
    """Switch W&B to offline mode when no credentials exist (no WANDB_API_KEY, no netrc entry).

    Returns True when offline; runs can be uploaded later with ``wandb sync <run dir>``.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"] in ("offline", "disabled", "dryrun")
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"
    return not logged_in


DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "icon_lightning", "save_dir": "runs", "log_model": False},
}


VALIDATE_EVERY_STEPS = 100


class IConCLI(LightningCLI):
    """LightningCLI for `IConModule` on `ClusteringDataModule`; links data facts into the model and writes
    ``metrics.json`` (final metrics, config hash, seed, wall time, version) into every run directory."""

    def add_arguments_to_parser(self, parser) -> None:
        # Length is the Convergence callback's (`convergence.*`): a training-loss plateau, within a step budget
        # that scales with N. max_epochs -1 leaves it alone; the ImageNet experiment sets the paper's 30 epochs.
        # Validation every 100 optimizer steps, whatever an epoch is (one step in full batch), and once more after
        # the last step (after_fit), so the reported metrics are the final model's.
        parser.set_defaults(
            {
                "trainer.logger": DEFAULT_LOGGER,
                "trainer.max_epochs": -1,
                "trainer.check_val_every_n_epoch": None,
                "trainer.val_check_interval": VALIDATE_EVERY_STEPS,
            }
        )
        parser.add_lightning_class_args(Convergence, "convergence")
        for source, target in (
            ("feature_dim", "feature_dim"),
            ("num_clusters", "num_clusters"),
            ("num_classes", "num_classes"),
            ("num_samples", "num_samples"),
            ("online_backbone", "backbone"),
        ):
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")

    def _start(self) -> None:
        self._started = time.time()

    before_fit = before_validate = before_test = before_predict = _start

    def _finish(self) -> None:
        trainer = self.trainer
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is collective: every rank asks
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        config = yaml.safe_dump(self.config_dump, sort_keys=True) if hasattr(self, "config_dump") else ""
        watcher = next((c for c in trainer.callbacks if isinstance(c, Convergence)), None)
        convergence = watcher.report() if watcher is not None and self.subcommand == "fit" else None
        payload = {
            "subcommand": self.subcommand,
            "metrics": metrics,
            "selected_head": int(self.model.selected_head),
            "head_losses": [float(x) for x in self.model.head_losses],
            "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "seed": self.config[self.subcommand].get("seed_everything"),
            "wall_time_s": round(time.time() - getattr(self, "_started", time.time()), 2),
            "version": __version__,
            "steps": trainer.global_step,
            "convergence": convergence,
            "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) or None,
            "last_checkpoint": getattr(trainer.checkpoint_callback, "last_model_path", None) or None,
        }
        atomic_write_json(run_dir / "metrics.json", payload)
        rows = sorted(metrics.items())
        width = max((len(k) for k, _ in rows), default=10)
        print(f"\n{'metric':<{width}}  value")
        for key, value in rows:
            if "/head_" not in key:
                print(f"{key:<{width}}  {value:.4f}")
        if convergence is not None:
            verdict = "converged" if convergence["converged"] else "NOT CONVERGED"
            print(f"{verdict} after {trainer.global_step} steps: {convergence['reason']}")
        print(f"metrics.json: {run_dir / 'metrics.json'}")
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            if os.environ.get("WANDB_MODE") == "offline":
                print(f"W&B is offline: upload later with `wandb sync {sys.modules['wandb'].run.dir}/..`")
            sys.modules["wandb"].finish()  # so the next run in this process (sweeps) starts its own

    def after_fit(self) -> None:
        if getattr(self.model, "validated_at_step", None) != self.trainer.global_step and not self.trainer.interrupted:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._finish()

    after_validate = after_test = after_predict = _finish


class ParseOnlyCLI(IConCLI):
    """Parses and validates a configuration (keys, types, class paths) without instantiating anything."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def check_config(args: list[str]):
    """The parsed config of ``icon fit <args>``; raises SystemExit with the CLI's message when invalid."""
    return ParseOnlyCLI(
        IConModule, ClusteringDataModule, args=["fit", *args], run=True, save_config_callback=None, trainer_defaults={}
    ).config


def cli_main(args: list[str] | None = None, run: bool = True) -> IConCLI:
    wandb_offline_unless_logged_in()
    return IConCLI(
        IConModule,
        ClusteringDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [ClusterAssignmentWriter()]},  # `icon predict` always writes its files
    )


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] == "sweep":
        from icon_lightning.sweep import main as sweep_main

        sweep_main(words[1:])
        return
    cli_main(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
