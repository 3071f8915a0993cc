"""benchmarks/extraction.py (``make bench-data``) on a few real images: its default backbone is the installed
EfficientNet-Lite0, and one pass writes its JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import extraction
from icon_lightning.data.backbones import EfficientNetLite0
from tests.conftest import SHARED_DATA

TAR = SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "EfficientNetLite0"])
def test_both_spellings_of_the_default_are_the_pretrained_lite0(name):
    assert isinstance(extraction.backbone_for(name), EfficientNetLite0)


@pytest.mark.skipif(not TAR.exists(), reason="needs ../shared/data/cifar10")
def test_the_default_run_measures_the_pretrained_backbone(tmp_path):
    """`make bench-data` used to fall through to TimmBackbone('EfficientNetLite0') and raise."""
    out = tmp_path / "extraction.json"
    extraction.main(["--tar", str(TAR), "--limit", "8", "--batch-size", "4", "--image-size", "64", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["images"] == 8 and row["backbone"] == extraction.DEFAULT_BACKBONE
    assert row["pipeline_s"] > 0 and row["bare_s"] > 0 and row["cpu_tuning"] == "on"
    assert row["pipeline_user_s"] > 0 and row["pipeline_minor_faults"] >= 0 and row["bare_sys_s"] >= 0


@pytest.mark.slow
@pytest.mark.skipif(not TAR.exists(), reason="needs ../shared/data/cifar10")
def test_compare_runs_before_and_after_in_their_own_processes(tmp_path):
    out = tmp_path / "tuning.json"
    extraction.main(
        ["--compare", "--tar", str(TAR), "--limit", "6", "--batch-size", "3", "--sizes", "64", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert [(r["image_size"], r["cpu_tuning"]) for r in result["runs"]] == [(64, "off"), (64, "on")]
    assert all(r["images"] == 6 and r["pipeline_user_s"] > 0 and r["pipeline_sys_s"] >= 0 for r in result["runs"])
    assert result["speedup"]["64"] > 0
