"""`icon fit|validate|test|predict --config …`: the LightningCLI (`icon sweep` is `icon_lightning.sweep`; the
`icon` command itself, with its one-line errors, is `icon_lightning.entry`)."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from icon_lightning import __version__
from icon_lightning.callbacks import ClusterAssignmentWriter, ClusteringPlots, Convergence
from icon_lightning.callbacks.checkpoint import RunCheckpoint
from icon_lightning.data.datamodule import ClusteringDataModule
from icon_lightning.data.prepared import saved_preparation
from icon_lightning.io import atomic_write, atomic_write_json, one_line
from icon_lightning.models.module import IConModule
from icon_lightning.recipes import recipe_path
from icon_lightning.runs import (
    DEBUG_ENV,
    RUN_DIR_ENV,
    check_checkpoint_file,
    choose_run_dir,
    config_name,
    config_sha256,
    experiment_key,
    resolve_checkpoint,
)
from icon_lightning.settings import one_line_parse_error

WANDB_PROBE_S = 3.0  # how long a logged-in run waits for the W&B server before it logs offline


def wandb_host() -> tuple[str, int]:
    """The W&B server's host and port (``WANDB_BASE_URL``, else api.wandb.ai over https)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_offline_unless_logged_in() -> bool:
    """Switch W&B to offline mode when no credentials exist (no WANDB_API_KEY, no netrc entry for its server), or
    when they do but the server cannot be reached within ``WANDB_PROBE_S`` (a cluster node without network: W&B
    itself would retry for minutes, then fail the fit); the latter is said in one line on stderr.

    Returns True when offline; runs can be uploaded later with ``wandb sync <run dir>``.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"] in ("offline", "disabled", "dryrun")
    host, port = wandb_host()
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and host in netrc.read_text())
    reason = None if logged_in else "not logged in"
    if logged_in:
        import socket

        try:
            socket.create_connection((host, port), timeout=WANDB_PROBE_S).close()
        except OSError as error:
            reason = f"cannot reach {host}:{port} ({error.strerror or error or type(error).__name__})"
            print(f"W&B: {reason}: logging offline (`wandb sync` uploads the run later)", file=sys.stderr)
    if reason is not None:
        os.environ["WANDB_MODE"] = "offline"
    return reason is not None


DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "icon_lightning", "save_dir": "runs", "log_model": False},
}


VALIDATE_EVERY_STEPS = 100
# facts of the data the model is built from (linked at instantiation): data.<source> → model.<target>
DATA_FACTS = (
    ("feature_dim", "feature_dim"),
    ("num_clusters", "num_clusters"),
    ("num_classes", "num_classes"),
    ("num_samples", "num_samples"),
    ("online_backbone", "backbone"),
)


def point_loggers_at(cfg, run_dir: Path) -> None:
    """Every configured logger that has a ``save_dir`` writes into the run's folder."""
    loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            init_args.save_dir = str(run_dir)


def print_summary(
    metrics: dict, convergence: dict | None, steps: int, run_dir: Path, search: dict | None = None
) -> None:
    rows = sorted(metrics.items())
    width = max((len(k) for k, _ in rows), default=10)
    print(f"\n{'metric':<{width}}  value")
    for key, value in rows:
        if "/head_" not in key:
            print(f"{key:<{width}}  {value:.4f}")
    if convergence is not None:
        verdict = "converged" if convergence["converged"] else "NOT CONVERGED"
        print(f"{verdict} after {steps} steps: {convergence['reason']}")
    if search is not None:
        lo, hi = search["range"]
        print(
            f"K = {search['chosen']} chosen by the judge from {lo}..{hi} ({len(search['scores'])} K tried in "
            f"{search['wall_time_s']:.1f} s; num_clusters_search in metrics.json, {SEARCH_PLOT})"
        )
    print(f"metrics.json: {run_dir / 'metrics.json'}")


def finish_wandb(exit_code: int | None = None) -> None:
    """Ends this process's W&B run, so the next run in it (sweeps, tests) starts its own; ``exit_code`` 1 marks a
    run that failed."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        if os.environ.get("WANDB_MODE") == "offline":
            print(f"W&B is offline: upload later with `wandb sync {sys.modules['wandb'].run.dir}/..`")
        sys.modules["wandb"].finish(exit_code=exit_code)


class IConArgumentParser(LightningArgumentParser):
    """A wrong key, type or config path ends in one line (``icon: error: …``, exit 2), not argparse's usage page."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            return super().error(message, ex)
        words = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "").split()
        prog = " ".join(["icon", *words[1:]])
        sys.stderr.write(f"icon: error: {one_line_parse_error(message)}  ({prog} --help lists the options)\n")
        sys.exit(2)


class RunConfig(SaveConfigCallback):
    """Writes the run's full config as ``config.yaml`` into its run directory (never into a shared logger folder)."""

    def __init__(self, parser, config, **kwargs) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        atomic_write(Path(trainer.default_root_dir) / self.config_filename, lambda f: f.write(text))


def live_head_metrics(callback_metrics, head_ids) -> dict[str, float]:
    """The scalar metrics, with per-head values (``…/head_k``) of the live heads only: a pruned head's last
    values are in the ``pruning`` history, not reported as if it were still trained."""
    live = {f"head_{int(i)}" for i in head_ids}
    scalars = {k: float(v) for k, v in callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    return {k: v for k, v in scalars.items() if not (last := k.rsplit("/", 1)[-1]).startswith("head_") or last in live}


def class_paths(value, where: str = "loss") -> dict[str, str]:
    """The class paths in a config value (an objective: its p, q and their bases), by where they sit (``init_args``
    left out of the names): what makes a recipe, without its numbers."""
    value = value.as_dict() if hasattr(value, "as_dict") else value
    if not isinstance(value, (dict, list)):
        return {}
    found = {where: value["class_path"]} if isinstance(value, dict) and "class_path" in value else {}
    for key, inner in value.items() if isinstance(value, dict) else enumerate(value):
        found.update(class_paths(inner, where if key == "init_args" else f"{where}.{key}"))
    return found


def check_same_recipe(cfg, checkpoint: dict, ckpt: str) -> None:
    """One line when ``ckpt`` was fitted with an objective of other classes than the config's ``model.loss``:
    Lightning would run the checkpoint's objective under the config's name."""
    saved, given = class_paths(checkpoint.get("hyper_parameters", {}).get("loss")), class_paths(cfg.model.get("loss"))
    if saved and given and saved != given:
        where = next(k for k in sorted(set(saved) | set(given)) if saved.get(k) != given.get(k))
        config = f"--config {cfg.config[0]}" if cfg.get("config") else "the config"
        raise ValueError(
            f"ckpt_path: {ckpt} was fitted with another objective than {config} gives ({where}: {saved.get(where)} in "
            f"the checkpoint, {given.get(where)} in the config); use the config it was fitted with"
        )


def read_checkpoint_hparams(cli, parse) -> None:
    """Lightning's ``parse`` of a checkpoint's hyper-parameters, with a file that is not a readable checkpoint
    answered in one line naming it (torch alone says ``[Errno 22] Invalid argument``), as is a checkpoint of another
    objective than the config's (``check_same_recipe``). Validate, test and predict with ``data.num_clusters`` unset
    or ``auto`` take the checkpoint's K (its fit's ``FitPreparation``), not the data's classes."""
    subcommand = cli.config.get("subcommand")
    ckpt = cli.config[subcommand].get("ckpt_path") if subcommand else None
    if not (ckpt and Path(ckpt).is_file()):
        return parse()
    check_checkpoint_file(ckpt)
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        check_same_recipe(cli.config[subcommand], checkpoint, ckpt)
        parse()
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"ckpt_path: {ckpt} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    data = cli.config[subcommand].data  # the config after the parse (Lightning replaces it)
    unset = data.get("num_clusters") in (None, "auto")
    if subcommand != "fit" and unset and (fit := saved_preparation(checkpoint)) is not None:
        data.num_clusters = fit.num_clusters


def check_takes_steps(subcommand: str | None, max_steps: int | None, steps_done: int | None) -> None:
    """A fit that takes no optimizer step has no head to select: refused before (``trainer.max_steps 0``) or after
    (none taken, e.g. a zero time limit) the fit, in one line; no ``metrics.json`` is written from zeros."""
    if subcommand not in (None, "fit"):
        return
    if max_steps == 0:
        raise ValueError(
            "trainer.max_steps: 0 takes no optimizer step, so no head can be selected; expected ≥ 1, or -1 "
            "(the convergence.* budget)"
        )
    if steps_done == 0:
        raise ValueError(
            "fit: no optimizer step was taken, so no head can be selected and no metrics.json is written "
            "(check trainer.max_epochs, trainer.max_time, trainer.limit_train_batches)"
        )


def run_record(cli, trainer, cfg) -> dict:
    """What ``metrics.json`` records of a run: its final metrics, selected head and losses, pruning, config hash,
    seed, wall time, steps, convergence verdict and checkpoints."""
    logged = {**getattr(cli, "_fit_metrics", {}), **trainer.callback_metrics}  # the fit's last step, then validation
    metrics = live_head_metrics(logged, cli.model.live_head_ids())
    watcher = next((c for c in trainer.callbacks if isinstance(c, Convergence)), None)
    convergence = watcher.report() if watcher is not None and cli.subcommand == "fit" else None
    saving = sorted(trainer.checkpoint_callbacks, key=lambda c: not isinstance(c, RunCheckpoint))
    monitored = [c for c in saving if getattr(c, "monitor", None)]
    ckpt = cfg.get("ckpt_path")
    payload = {
        "subcommand": cli.subcommand,
        "metrics": metrics,
        **cli.model.head_report(),  # selected_head (a number), heads, head_losses (None before an epoch), pruning
        "config_sha256": cli.config_sha256,
        "run_dir": str(cli.run_dir),
        "ckpt_path": ckpt,
        "seed": cfg.get("seed_everything"),
        "wall_time_s": round(time.time() - getattr(cli, "_started", time.time()), 2),
        "version": __version__,
        "steps": trainer.global_step if cli.subcommand == "fit" or not ckpt else checkpoint_step(ckpt),
        "convergence": convergence,
        "num_clusters_search": k_search(getattr(cli, "datamodule", None)),
        "best_checkpoint": next((c.best_model_path for c in monitored if Path(c.best_model_path).is_file()), None),
        "last_checkpoint": next((c.last_model_path for c in saving if Path(c.last_model_path).is_file()), None),
    }
    return payload


def checkpoint_step(path: str) -> int | None:
    """The optimizer step a checkpoint was saved at (what ``validate``, ``test`` and ``predict`` evaluate)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except (KeyError, TypeError, ValueError):
        return None


INTERRUPT_EXIT = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal's number, as a shell reports a killed job


def interruption(end: BaseException) -> str:
    """How a fit ended early: Lightning raises ``SIGTERMException`` on SIGTERM, and ``sys.exit(1)`` inside its
    ``except KeyboardInterrupt`` on Ctrl-C; anything else is an error inside training."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(end, SIGTERMException):
        return "SIGTERM"
    if isinstance(end, KeyboardInterrupt) or isinstance(end.__context__, KeyboardInterrupt):
        return "SIGINT"
    return f"{type(end).__name__}: {end}"


def record_interrupted(cli, end: BaseException) -> int | None:
    """The record of a fit that ended early: ``metrics.json`` with the steps done, the head losses measured so far
    (None before the first epoch closed), the checkpoint to resume from (only a file that exists) and
    ``convergence: {converged: false, reason}``, ``interrupted: SIGTERM|SIGINT`` for a signal and a top-level
    ``error`` (the exception's one line) for an exception in training; then a NOT CONVERGED line. Returns the exit
    code for a signal (None: re-raise the error)."""
    trainer, cfg, how = cli.trainer, cli._run_config(), interruption(end)
    if not trainer.is_global_zero:
        return INTERRUPT_EXIT.get(how)
    payload = run_record(cli, trainer, cfg)
    found = sorted(str(p) for p in Path(cli.run_dir).glob("**/last*.ckpt") if p.is_file())
    resume = payload["last_checkpoint"] or (found[-1] if found else None)
    saved = RunCheckpoint.saved_step(trainer) if resume else None
    to = resume or "(none saved)"
    to += "" if saved is None else f" (step {saved})"
    if how in INTERRUPT_EXIT:
        reason = f"interrupted by {how} at step {trainer.global_step}; resume with --ckpt_path {to}"
        payload["convergence"] = {"converged": False, "reason": reason, "interrupted": how}
    else:
        payload["error"] = one_line(end)
        reason = f"failed at step {trainer.global_step}: {payload['error']}; checkpoint {to}"
        payload["convergence"] = {"converged": False, "reason": reason}
    payload.update(resume_from=resume, resume_step=saved)
    atomic_write_json(Path(cli.run_dir) / "metrics.json", payload)
    cli.record = payload
    ended = "interrupted" if how in INTERRUPT_EXIT else "failed"
    print(f"\nNOT CONVERGED after {trainer.global_step} steps ({ended}): {reason}", file=sys.stderr, flush=True)
    print(f"metrics.json: {Path(cli.run_dir) / 'metrics.json'}", file=sys.stderr, flush=True)
    finish_wandb(exit_code=1)
    return INTERRUPT_EXIT.get(how)


@contextlib.contextmanager
def leaves_a_record(cli, subcommand: str):
    """A fit the Trainer ended early (its status INTERRUPTED: SIGTERM, Ctrl-C, an exception in training) writes its
    record (``record_interrupted``); signals then exit 143 / 130, errors propagate. Errors before or after the
    Trainer's fit (parsing, the final checks) are left as they are."""
    from lightning.pytorch.trainer.states import TrainerStatus

    try:
        yield
    except BaseException as end:
        trainer = getattr(cli, "trainer", None)
        if subcommand != "fit" or trainer is None or trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        code = record_interrupted(cli, end)
        if code is None:
            raise
        raise SystemExit(code) from None


SEED_MAX = 2**32 - 1  # numpy's seeds: Lightning's seed_everything refuses others in numpy's words


def check_seed(seed) -> None:
    """``seed_everything``: true (a random seed, recorded), false, or an integer numpy takes; else one line."""
    if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed_everything: expected an integer in [0, {SEED_MAX}] or true (a random seed), got {seed}")


# Length is the Convergence callback's (`convergence.*`): a training-loss plateau, within a step budget that scales
# with N. max_epochs -1 leaves it alone; the ImageNet experiment sets the paper's 30 epochs. Validation every 100
# optimizer steps, whatever an epoch is (one step in full batch), and once more after the last step (after_fit), so
# the reported metrics are the final model's.
TRAINER_DEFAULTS = {
    "trainer.logger": DEFAULT_LOGGER,
    "trainer.default_root_dir": "runs",
    "trainer.max_epochs": -1,
    "trainer.check_val_every_n_epoch": None,
    "trainer.val_check_interval": VALIDATE_EVERY_STEPS,
}


def add_run_arguments(parser, num_clusters=None) -> None:
    """`icon`'s own keys (``run_dir``, ``allow_untrained``), its trainer defaults, the ``convergence.*`` callback
    and the data facts linked into the model (``DATA_FACTS``); K through ``num_clusters(datamodule)`` when given
    (``IConCLI.resolved_num_clusters``: ``auto`` searched), else the data's ``num_clusters``."""
    parser.add_argument(
        "--run_dir",
        type=str | None,
        default=None,
        help="this run's own folder (default: <trainer.default_root_dir>/<config>-<key>/<subcommand>-<time>-<id>)",
    )
    parser.add_argument(
        "--allow_untrained",
        type=bool,
        default=False,
        help="let validate, test and predict run without --ckpt_path, on the untrained heads",
    )
    parser.set_defaults(dict(TRAINER_DEFAULTS))
    parser.add_lightning_class_args(Convergence, "convergence")
    for source, target in DATA_FACTS:
        if source == "num_clusters" and num_clusters is not None:
            parser.link_arguments("data", f"model.{target}", compute_fn=num_clusters, apply_on="instantiate")
        else:
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")


def place_run(cfg, subcommand: str) -> tuple[str, Path]:
    """Hashes the run's config ``cfg``, resolves its ``ckpt_path`` (``--ckpt_path last``) and chooses its own folder
    (``runs.choose_run_dir``), at which the run's outputs and loggers then point. Returns (config sha256, folder)."""
    plain = cfg.as_dict()
    sha = config_sha256(plain)
    key = experiment_key(plain)
    root = cfg.trainer.default_root_dir or "runs"
    check_takes_steps(subcommand, cfg.trainer.get("max_steps"), None)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), subcommand, root, key, cfg.allow_untrained)
    if ckpt != cfg.get("ckpt_path"):
        cfg.ckpt_path = ckpt
    experiment = f"{config_name(cfg.get('config'))}-{key}"
    run_dir = choose_run_dir(root, experiment, subcommand, cfg.get("run_dir"))
    os.environ[RUN_DIR_ENV] = cfg.run_dir = cfg.trainer.default_root_dir = str(run_dir)
    point_loggers_at(cfg, run_dir)
    return sha, run_dir


def k_search(datamodule) -> dict | None:
    """The record of the K search ``datamodule`` ran (``--data.num_clusters auto``), or None."""
    return getattr(getattr(datamodule, "data", None), "clusters", None) and datamodule.data.clusters.search


SEARCH_PLOT = "num_clusters_search.png"  # the K search's curve, in the fit's run folder


def plot_k_search(search: dict | None, path: Path) -> None:
    """The K search's curve (``choose_k.plot_search``; nothing without a search); a plot that fails warns and the
    run goes on (as ``ClusteringPlots``)."""
    import traceback
    import warnings

    from icon_lightning.models.choose_k import plot_search

    if search is None:
        return
    try:
        plot_search(search, path)
    except Exception:  # noqa: BLE001 - a picture never ends a run; the traceback is in the warning
        warnings.warn(f"{path.name}: the plot failed:\n{traceback.format_exc()}", stacklevel=2)


class KSearchRefused(ValueError):
    """``data.num_clusters auto`` where no fit chooses K (raised inside jsonargparse's link, then unwrapped)."""


def resolved_num_clusters(datamodule, cli: IConCLI) -> int:
    """The model's K (the CLI's link into ``model.num_clusters``): the data's, with ``auto`` chosen first on a fit
    by the judge (``models.choose_k``; its record then goes into ``metrics.json``), or a resumed fit's checkpoint's;
    validate, test and predict take their checkpoint's K (``read_checkpoint_hparams``), so ``auto`` without one is
    one line."""
    clusters = datamodule.data.clusters  # the DataModule's declared K part (``data.num_clusters.ClusterCount``)
    ckpt = cli._run_config().get("ckpt_path") if cli.subcommand else None
    if clusters.needs_search and (fit := saved_preparation(ckpt)) is not None:
        clusters.resolve(fit.num_clusters)  # a resumed fit: its checkpoint's K (chosen by its search)
    if clusters.needs_search:
        if cli.subcommand not in (None, "fit"):
            raise KSearchRefused(
                f"data.num_clusters: auto chooses K in a fit; {cli.subcommand} takes K from its --ckpt_path, "
                "or pass --data.num_clusters K"
            )
        from icon_lightning.models.choose_k import search_num_clusters

        search = search_num_clusters(clusters.features(), clusters.range)
        clusters.resolve(search.chosen, search.record())
    return datamodule.num_clusters


@contextlib.contextmanager
def unwrapped_link_errors():
    """jsonargparse wraps what a link's compute_fn raised (``Call to compute_fn of link … failed: …``): a
    ``KSearchRefused`` comes out as its own one line."""
    try:
        yield
    except ValueError as error:
        if isinstance(error.__cause__, KSearchRefused):
            raise ValueError(str(error.__cause__)) from None
        raise


class IConCLI(LightningCLI):
    """LightningCLI for `IConModule` on `ClusteringDataModule`; links data facts into the model, gives every run
    a directory of its own (`icon_lightning.runs`), resolves ``--ckpt_path last`` and writes ``metrics.json``
    (final metrics, config hash, seed, wall time, version) into the run directory."""

    def init_parser(self, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--model.num_head` must not pass for `--model.num_heads`
        return super().init_parser(**kwargs)

    def _set_seed(self) -> None:
        check_seed(self._get(self.config, "seed_everything"))
        super()._set_seed()

    def _parse_ckpt_path(self) -> None:  # Lightning reads a given checkpoint's hyper-parameters here, before hooks
        read_checkpoint_hparams(self, super()._parse_ckpt_path)

    def add_arguments_to_parser(self, parser) -> None:
        add_run_arguments(parser, lambda datamodule: resolved_num_clusters(datamodule, self))

    def instantiate_classes(self) -> None:
        with unwrapped_link_errors():
            super().instantiate_classes()

    def _run_config(self):
        """This run's config: the subcommand's section (the whole config with ``run=False``: no subcommand)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Hash the config, resolve the checkpoint, and point every output of the run at its own folder."""
        cfg = self._run_config()
        subcommand = self.subcommand or "fit"
        self.config_sha256, self.run_dir = place_run(cfg, subcommand)
        if cfg.trainer.get("enable_checkpointing") is not False and subcommand == "fit":
            callbacks = [*self.trainer_defaults.get("callbacks", []), RunCheckpoint()]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}

    def _start(self) -> None:
        self._started = time.time()
        if self.subcommand == "fit" and self.trainer.is_global_zero:
            plot_k_search(k_search(self.datamodule), Path(self.run_dir) / SEARCH_PLOT)
        for callback in self.trainer.callbacks:  # pictures and predictions go to the run's folder, whatever the logger
            if isinstance(callback, (ClusteringPlots, ClusterAssignmentWriter)) and callback.output_dir is None:
                callback.output_dir = str(self.run_dir)

    before_fit = before_validate = before_test = before_predict = _start

    def _finish(self) -> None:
        trainer = self.trainer
        if not trainer.interrupted:
            check_takes_steps(self.subcommand, None, trainer.global_step)
        if not trainer.is_global_zero:
            return
        payload = run_record(self, trainer, self._run_config())
        atomic_write_json(self.run_dir / "metrics.json", payload)
        self.record = payload
        search = payload["num_clusters_search"]
        print_summary(payload["metrics"], payload["convergence"], trainer.global_step, self.run_dir, search)
        finish_wandb()

    def after_fit(self) -> None:
        self._fit_metrics = dict(self.trainer.callback_metrics)  # the final validation resets them: train/loss kept
        if self.model.needs_final_validation() and not self.trainer.interrupted:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._finish()

    after_validate = after_test = after_predict = _finish

    def _run_subcommand(self, subcommand: str) -> None:
        with leaves_a_record(self, subcommand):  # SIGTERM, Ctrl-C or an error during the fit
            super()._run_subcommand(subcommand)


class ParseOnlyCLI(IConCLI):
    """Parses and validates a configuration (keys, types, class paths) without instantiating anything."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def check_config(args: list[str]):
    """The parsed config of ``icon fit <args>``; raises SystemExit with the CLI's message when invalid."""
    return ParseOnlyCLI(
        IConModule,
        ClusteringDataModule,
        args=["fit", *args],
        run=True,
        save_config_callback=None,
        trainer_defaults={},
        parser_class=IConArgumentParser,
    ).config


def parse_config(argv: list[str]):
    """The parsed config (Namespace) of ``icon <subcommand> …`` for ``argv`` = [subcommand, …]; a config that
    does not parse raises jsonargparse's ``ArgumentError`` with the CLI's one-line message."""
    cli = ParseOnlyCLI(
        IConModule,
        ClusteringDataModule,
        args=argv,
        save_config_callback=None,
        trainer_defaults={},
        parser_class=IConArgumentParser,
        parser_kwargs={"exit_on_error": False},
    )
    return cli.config[cli.config.subcommand]


class AssembledRun(IConCLI):
    """``icon <subcommand> …`` assembled and not yet run: ``model``, ``datamodule``, ``trainer`` (callbacks
    included) and ``run_dir`` exactly as `icon` builds them. ``execute()`` then runs the subcommand as `icon` does
    (fit: ``trainer.fit``, the final validation, ``metrics.json``, whose content is also ``record``)."""

    record: dict | None = None

    def _run_subcommand(self, subcommand: str) -> None:
        self.pending = subcommand  # LightningCLI runs the subcommand at the end of __init__: keep it for execute()

    def execute(self) -> AssembledRun:
        IConCLI._run_subcommand(self, self.pending)
        return self


def assemble(argv: list[str] | None = None) -> AssembledRun:
    """The one builder of a run (README "One way to build a run"): ``argv`` = [subcommand, --config …, overrides …]
    (None: ``sys.argv``) through `icon`'s parser (recipe + data + trainer presets + overrides, defaults from the
    classes' signatures and ``IConCLI``'s presets) into the DataModule, the module, the callbacks and the Trainer.
    The `icon` command, `make demo`, ``HeadClusterer``, ``benchmarks/`` and ``experiments/`` all build here."""
    return _built(AssembledRun, argv, run=True)


def _built(cli_class: type[IConCLI], argv: list[str] | None, run: bool) -> IConCLI:
    wandb_offline_unless_logged_in()
    return cli_class(
        IConModule,
        ClusteringDataModule,
        args=argv,
        run=run,
        parser_class=IConArgumentParser,
        save_config_callback=RunConfig,
        trainer_defaults={"callbacks": [ClusterAssignmentWriter()]},  # `icon predict` always writes its files
    )


def features_command(path: str | Path, config: str | Path = "icon_clustering") -> list[str]:
    """README's first command on a features file (``.npz`` / ``.npy``): ``config`` is a recipe name or a YAML path."""
    return [
        "fit",
        f"--config={recipe_path(config)}",
        "--data.dataset=icon_lightning.data.FeaturesFile",
        f"--data.dataset.path={path}",
        "--data.views=clean",
    ]


def cli_main(args: list[str] | None = None, run: bool = True) -> IConCLI:
    """`icon <args>`: ``assemble``, then execute; ``run=False``: a config without a subcommand, its parts built.
    A run that fails ends its W&B run as failed, so the next run in this process does not join it."""
    try:
        return assemble(args).execute() if run else _built(IConCLI, args, run=False)
    except BaseException:
        finish_wandb(exit_code=1)
        raise
