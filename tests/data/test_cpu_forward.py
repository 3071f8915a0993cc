"""data/cpu_forward.py: micro-batched channels_last forward passes give the plain forward's features, the
micro-batch size follows the largest activation, and glibc keeps freed blocks for reuse inside
``reuse_freed_memory`` and hands them back on leaving."""

from __future__ import annotations

import os
import platform
import resource

import pytest
import torch
from torch import nn

from icon_lightning.data import cpu_forward
from icon_lightning.data.cpu_forward import (
    forward_in_micro_batches,
    largest_activation_bytes,
    micro_batch_size,
    reuse_freed_memory,
)
from icon_lightning.data.datasets import TarImageFolder
from icon_lightning.data.feature_store import ViewDataset, extract
from icon_lightning.data.transforms import eval_transform
from tests.conftest import SHARED_DATA

TAR = SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten()).double()


def test_micro_batches_give_the_whole_batch_forward():
    net, x = _net(), torch.randn(13, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(forward_in_micro_batches(net.to(memory_format=torch.channels_last), x, 4), net(x))


def test_the_micro_batch_size_follows_the_largest_activation():
    # the first conv's output is the largest: 8 channels x 16 x 16 float64 = 16,384 bytes an image
    net, x = _net(), torch.randn(5, 3, 16, 16, dtype=torch.float64)
    assert largest_activation_bytes(net, x[:1]) == 8 * 16 * 16 * 8
    assert micro_batch_size(net, x, budget=10 * 16384 + 100) == 10
    assert micro_batch_size(net, x, budget=1) == 1  # never zero


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_blocks_are_reused_inside_and_handed_back_on_leaving():
    """Six 20 MiB blocks (below glibc's 32 MiB mmap cap) allocated, written and freed, twice: inside, the second
    round reuses the freed span (30,720 pages would be fresh; in a long-lived process small allocations can carve
    the span so that one block, 5,120 pages, is fresh: CI saw that); on leaving, the kept memory goes back."""

    def round_trip() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(5 << 20) for _ in range(6)]  # 5 Mi float32 = 20 MiB each, every page written
        del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with reuse_freed_memory() as applied:
        assert applied
        round_trip()
        assert round_trip() <= 5120 + 1000
        kept = _rss()
    assert kept - _rss() > 100 << 20


def test_off_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(cpu_forward.platform, "libc_ver", lambda: ("", ""))
    with reuse_freed_memory() as applied:
        assert not applied


@pytest.mark.skipif(not TAR.exists(), reason="needs ../shared/data/cifar10")
def test_tuned_cpu_extraction_gives_the_untuned_features_on_real_images():
    """Lite0 at 224 px on 24 CIFAR-10 test images: the tuned path (micro-batches of its largest activation's
    size, channels_last) and the loader's whole batches agree to float rounding."""
    from icon_lightning.data.backbones import EfficientNetLite0

    data = ViewDataset(TarImageFolder(str(TAR), split="test"), eval_transform(224))
    backbone = EfficientNetLite0()
    assert micro_batch_size(backbone, data[0][0][None]) < 24  # so the batch below is really split
    runs = [
        extract(backbone, data, batch_size=24, device="cpu", progress=False, indices=range(24), cpu_tuning=tuned)
        for tuned in (False, True)
    ]
    torch.testing.assert_close(torch.from_numpy(runs[1][:24]), torch.from_numpy(runs[0][:24]), rtol=1e-4, atol=1e-5)
