"""Feature cache: hit, miss, invalidation by hash, nothing trusted after an interrupted write; shards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from icon_lightning.data import feature_store
from icon_lightning.data.backbones import FrozenBackbone, Identity
from icon_lightning.data.datasets import DigitsDataset
from icon_lightning.data.feature_store import (
    FeatureKey,
    FeatureStore,
    ViewDataset,
    cached_features,
    extract,
    shared_views,
)
from icon_lightning.data.neighbours import centred_unit_rows


def test_hit_miss_and_invalidation(tmp_path):
    store = FeatureStore(tmp_path)
    key = FeatureKey("b", "d", "t")
    calls = []

    def fill(out):
        calls.append(1)
        out[:] = np.arange(12, dtype=np.float32).reshape(4, 3)

    assert store.load(key) is None  # miss
    first = store.write(key, (4, 3), fill)
    second = store.load(key)  # hit: not extracted again
    assert len(calls) == 1 and np.array_equal(first, second)
    assert isinstance(second, np.memmap)
    other = FeatureKey("b", "d", "another transform")
    assert other.digest != key.digest and store.load(other) is None
    store.write(other, (4, 3), fill)
    assert len(calls) == 2
    _, meta = store.paths(key)
    meta.write_text(meta.read_text().replace('"b"', '"edited"'))  # metadata no longer matches its key
    assert store.load(key) is None


def test_failed_fill_leaves_nothing(tmp_path):
    store = FeatureStore(tmp_path)

    def fill(out):
        out[:] = np.nan

    with pytest.raises(ValueError, match="NaN"):
        store.write(FeatureKey("b", "d", "t"), (2, 2), fill)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_extraction_is_never_trusted(tmp_path):
    """Kill an extraction midway (SIGKILL): no array is trusted afterwards, and a rerun completes."""
    script = textwrap.dedent(f"""
        import time, numpy as np
        from icon_lightning.data.feature_store import FeatureKey, FeatureStore
        store = FeatureStore({str(tmp_path)!r})
        def fill(out):
            for i in range(len(out)):
                out[i] = i
                out.flush()
                print("row", i, flush=True)
                time.sleep(0.05)
        store.write(FeatureKey("b", "d", "t"), (400, 8), fill)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("row 20"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the partial file is there, untrusted
    store = FeatureStore(tmp_path)  # opening the store removes what the dead process left
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    key = FeatureKey("b", "d", "t")
    assert store.load(key) is None
    done = store.write(key, (400, 8), lambda out: out.__setitem__(slice(None), 1.0))
    assert done.shape == (400, 8) and np.all(done == 1.0)


class Scale(torch.nn.Module):
    def forward(self, x):
        return 2 * x


def test_extraction_fills_by_dataset_index_whatever_the_shard_order(tmp_path):
    data = DigitsDataset()
    backbone = FrozenBackbone(Scale(), 64, "scale", "none")
    full = extract(backbone, data, batch_size=100, progress=False)
    np.testing.assert_allclose(full, 2 * data.data.numpy())
    sharded = np.zeros_like(full)
    idx = np.arange(len(data))
    for shard in (idx[1::2], idx[0::2]):  # e.g. rank 1 finishes before rank 0
        extract(backbone, data, sharded, batch_size=64, progress=False, indices=shard)
    np.testing.assert_array_equal(sharded, full)


def test_cached_features_and_seeded_views(tmp_path):
    from torchvision import transforms as T

    data = DigitsDataset()
    store = FeatureStore(tmp_path)
    feats = cached_features(store, Identity(), data, None, progress=False)
    np.testing.assert_array_equal(feats, data.data.numpy())
    noise = T.Lambda(lambda x: x + torch.randn_like(x))
    a = ViewDataset(data, noise, view=0, seed=1)
    b = ViewDataset(data, noise, view=1, seed=1)
    assert torch.equal(a[5][0], ViewDataset(data, noise, view=0, seed=1)[5][0])  # same view: same image
    assert not torch.equal(a[5][0], b[5][0])  # other view: another augmentation
    assert len(list(Path(tmp_path).glob("*.npy"))) == 1


def _ddp_extract(rank: int, world: int, port: int, cache: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        backbone = FrozenBackbone(Scale(), 64, "scale", "none")
        cached_features(FeatureStore(cache), backbone, DigitsDataset(), None, batch_size=100, progress=False)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_extraction_equals_single_process(tmp_path):
    """gloo, 2 CPU processes: each extracts its shard, rank 0 writes the array filled by dataset index."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_extract, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    (array,) = [np.load(p) for p in Path(tmp_path).glob("*.npy")]
    np.testing.assert_allclose(array, 2 * DigitsDataset().data.numpy())


def test_a_full_disk_fails_before_extraction_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """A disk that filled during extraction used to kill the process with SIGBUS (the memory map's pages had no
    blocks) and leave a .tmp the size of the whole array, so every rerun found the disk full again."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    store = FeatureStore(tmp_path)
    filled = []
    key = FeatureKey("b", "d", "t")
    expected = rf"^{tmp_path}/{key.digest}\.npy: could not reserve 0\.00 GiB for it: no space left on the device$"
    with pytest.raises(OSError, match=expected):
        store.write(key, (1000, 64), filled.append)
    assert filled == [] and list(tmp_path.iterdir()) == []  # no work done, nothing left


def test_temporaries_of_live_processes_and_other_hosts_are_kept(tmp_path):
    import socket

    from icon_lightning.io import remove_stale_temporaries

    host = socket.gethostname()
    mine = tmp_path / f"a.npy.{host}.{os.getpid()}.tmp"
    other_host = tmp_path / "a.npy.elsewhere.1.tmp"
    dead = tmp_path / f"a.npy.{host}.{2**22 + 12345}.tmp"  # above Linux's pid_max default: never alive
    for path in (mine, other_host, dead):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert mine.exists() and other_host.exists() and not dead.exists()


# ------------------------------------------------------------------ caches that cannot lie (issue 31, D5)
def flip_bytes(path: Path, at: float = 0.6, count: int = 64) -> None:
    """Corrupt ``path`` in place, keeping its size (a bad disk block, a foreign write)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + count] = bytes(b ^ 0x5A for b in data[start : start + count])
    path.write_bytes(bytes(data))


def next_run() -> None:
    """What a new process starts from: no file verified yet."""
    feature_store._VERIFIED.clear()


def scale_features(cache: Path) -> np.ndarray:
    backbone = FrozenBackbone(Scale(), 64, "scale", "none")
    return np.array(cached_features(FeatureStore(cache), backbone, DigitsDataset(), None, progress=False))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (flip_bytes, "checksum crc32:[0-9a-f]{8} where crc32:[0-9a-f]{8} was recorded"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), r"\d+ bytes where \d+ were written"),
        (lambda p: p.write_bytes(b""), r"0 bytes where \d+ were written"),
    ],
    ids=["flipped", "truncated", "empty"],
)
def test_a_damaged_features_file_is_named_removed_and_rebuilt(tmp_path, damage, reason):
    """The hostile tester's case: a features .npy whose bytes changed (same size) was used as is (accuracy 0.900 →
    0.160, exit 0); an empty one raised EOFError on every run. Now: one warning naming it, then a rebuild."""
    cold = scale_features(tmp_path / "cold")
    np.testing.assert_allclose(cold, 2 * DigitsDataset().data.numpy())
    scale_features(tmp_path / "cache")
    (npy,) = (tmp_path / "cache").glob("*.npy")
    damage(npy)
    next_run()
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(npy))}: {reason}.*; removed, rebuilt$"):
        again = scale_features(tmp_path / "cache")
    np.testing.assert_array_equal(again, cold)
    next_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is trusted: no warning
        np.testing.assert_array_equal(scale_features(tmp_path / "cache"), cold)


def test_each_file_is_read_for_its_checksum_once_per_process(tmp_path, monkeypatch):
    reads = []
    checksum = feature_store.file_checksum
    monkeypatch.setattr(feature_store, "file_checksum", lambda path: reads.append(Path(path).name) or checksum(path))
    store = FeatureStore(tmp_path)
    key = FeatureKey("b", "d", "t")
    store.write(key, (4, 3), lambda out: out.__setitem__(slice(None), 1.0))
    assert len(reads) == 1  # summed once as it is written, before it is published
    for _ in range(3):
        assert store.load(key) is not None
    assert len(reads) == 1  # what this process wrote, it trusts
    next_run()
    for _ in range(3):
        assert store.load(key) is not None
    assert reads[1:] == [f"{key.digest}.npy"]  # a new process reads it once
    array_path, _ = store.paths(key)
    os.utime(array_path, ns=(1, 1))  # a file changed since (its time, here): read again
    assert store.load(key) is not None and len(reads) == 3


def test_an_entry_from_before_checksums_is_adopted_once_then_verified(tmp_path):
    store = FeatureStore(tmp_path)
    key = FeatureKey("b", "d", "t")
    store.write(key, (4, 3), lambda out: out.__setitem__(slice(None), np.arange(12.0).reshape(4, 3)))
    array_path, meta_path = store.paths(key)
    meta = json.loads(meta_path.read_text())
    recorded = meta.pop("checksum"), meta.pop("bytes")
    meta_path.write_text(json.dumps(meta))  # as the previous version wrote it
    next_run()
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(array_path))}: written before cache checksums"):
        np.testing.assert_array_equal(store.load(key), np.arange(12.0).reshape(4, 3))
    adopted = json.loads(meta_path.read_text())
    assert (adopted["checksum"], adopted["bytes"]) == recorded  # the checksum of the same bytes
    flip_bytes(array_path, at=0.9, count=4)
    next_run()
    with pytest.warns(UserWarning, match="checksum"):
        assert store.load(key) is None
    assert not array_path.exists() and not meta_path.exists()


class Huge(torch.nn.Module):
    def forward(self, x):
        return x.double() * 1e39  # float64 values beyond float32's range: inf once cast for the cache


def test_features_beyond_float32_range_name_the_file_and_the_range(tmp_path):
    """float64 features beyond ±3.4e38 become inf in the float32 cache; the error used to end in 'NaN or inf'
    inside a FeatureKey repr, naming neither the file nor what was expected."""
    store = FeatureStore(tmp_path)
    backbone = FrozenBackbone(Huge(), 64, "huge", "none")
    pattern = (
        rf"^{re.escape(str(tmp_path))}/[0-9a-f]{{20}}\.npy: features of sklearn:digits through huge\|none "
        r"\(view clean:seed=0\): "
        r"expected finite float32 values, found inf \(values beyond float32's range, ±3\.4e38, become inf\) "
        r"at row 0, column \d+$"
    )
    with pytest.raises(ValueError, match=pattern):
        cached_features(store, backbone, DigitsDataset(), None, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["flipped", "truncated", "no json"])
def test_a_damaged_views_file_is_named_removed_and_rebuilt(tmp_path, damage):
    raws = [np.random.default_rng(v).normal(size=(300, 16)).astype(np.float32) for v in range(3)]
    mean = np.stack(raws).mean((0, 1))
    (tmp_path / "cold").mkdir()
    (tmp_path / "cache").mkdir()
    cold = np.array(shared_views(tmp_path / "cold", raws, mean))
    shared_views(tmp_path / "cache", raws, mean)
    (path,) = (tmp_path / "cache").glob("*.views16")
    if damage == "flipped":
        flip_bytes(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.with_name(path.name + ".json").unlink()  # as the previous version left it: no checksum
    next_run()
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(path))}: .*; removed, rebuilt$"):
        again = shared_views(tmp_path / "cache", raws, mean)
    np.testing.assert_array_equal(again, cold)
    np.testing.assert_allclose(cold[1], centred_unit_rows(raws[1], mean), atol=1e-3)  # float16 of the reference


def test_a_datamodule_run_reads_each_cached_file_once(tmp_path, monkeypatch):
    """The DataModule opens the same caches several times a run (prepare_data, then setup); the checksum of each
    file is computed once per process, and not at all for what the process wrote itself."""
    from icon_lightning.data import ClusteringDataModule, DigitsImages

    pooled = FrozenBackbone(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()), 12, "pool", "none")

    def run() -> list[str]:
        reads = []
        monkeypatch.setattr(
            feature_store, "file_checksum", lambda path: reads.append(Path(path).name) or checksum(path)
        )
        data = DigitsImages()
        dm = ClusteringDataModule(
            data, val_dataset=data, backbone=pooled, image_size=8, grayscale_to_rgb=True, cache_dir=str(tmp_path), k=3
        )
        dm.prepare_data()
        dm.setup("fit")
        return reads

    checksum = feature_store.file_checksum
    written = run()  # cold: every file summed once, as it is written
    assert len(written) == len(set(written)) and all(".tmp" in name for name in written)
    next_run()
    read = run()
    cached = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".npy", ".views16"))
    assert sorted(read) == cached and len(cached) == 1 + 4 + 1  # clean (also val: the same key), 4 views, views map
