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
    assert row["pipeline_s"] > 0 and row["bare_s"] > 0
