"""Every experiment pins what its result depends on, and its README's headline number is what its command gives.

`experiments/digits/README.md` stated 0.793 for `icon fit --config experiments/digits/config.yaml` ("every number is
pinned here") while the command gave 0.655: the config did not pin `model.keep_heads`, and a pruning default added
later pruned its 3 heads."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import yaml

from icon_lightning.callbacks import Convergence
from icon_lightning.data.datamodule import ClusteringDataModule
from icon_lightning.models.module import IConModule
from icon_lightning.runs import LINKED_KEYS, RESULT_FREE_KEYS

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.parent.name for p in (ROOT / "experiments").glob("*/config.yaml"))
SECTIONS = {"model": IConModule, "data": ClusteringDataModule, "convergence": Convergence}
HEADLINE = re.compile(
    r"\*\*Result \(measured, seed (\d+)\):\*\* `val/hungarian_acc/best` ([\d.]+), NMI ([\d.]+), ARI ([\d.]+)"
)


def test_the_experiments_are_found():
    assert {"digits", "cifar10_effnet", "imagenet_dinov2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_setting_that_can_change_the_result_is_pinned(name):
    """Each constructor argument of the module, the DataModule and Convergence is written in the config (so a
    changed default cannot change the result), but the facts linked from the data and the settings declared not to
    change a result (``runs.RESULT_FREE_KEYS``); and the seed."""
    config = yaml.safe_load((ROOT / "experiments" / name / "config.yaml").read_text())
    exempt = set(RESULT_FREE_KEYS) | set(LINKED_KEYS)
    missing = [
        f"{section}.{param}"
        for section, cls in SECTIONS.items()
        for param in list(inspect.signature(cls.__init__).parameters)[1:]
        if param not in (config.get(section) or {}) and f"{section}.{param}" not in exempt
    ]
    assert not missing, f"experiments/{name}/config.yaml does not pin {missing}"
    assert isinstance(config.get("seed_everything"), int)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_readme_states_a_measured_headline_or_says_it_has_none(name):
    text = (ROOT / "experiments" / name / "README.md").read_text()
    assert HEADLINE.search(text) or re.search(r"not measured|Not yet run", text), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n for n in EXPERIMENTS if HEADLINE.search((ROOT / "experiments" / n / "README.md").read_text())]
)
def test_the_headline_command_gives_the_readmes_number(name, tmp_path):
    """README's command as typed, only where it writes and logs moved (settings that cannot change a result)."""
    from icon_lightning.entry import main

    seed, acc, nmi, ari = HEADLINE.search((ROOT / "experiments" / name / "README.md").read_text()).groups()
    main(["fit", "--config", str(ROOT / "experiments" / name / "config.yaml"),
          f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}",
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.enable_progress_bar=false"])  # fmt: skip
    (path,) = tmp_path.glob("*/fit-*/metrics.json")
    record = json.loads(path.read_text())
    assert record["seed"] == int(seed)
    for key, stated in (("val/hungarian_acc/best", acc), ("val/nmi", nmi), ("val/ari", ari)):
        assert round(record["metrics"][key], len(stated) - 2) == float(stated), (key, record["metrics"][key], stated)
