"""ClusteringDataModule: batch layout, neighbour membership, reproducibility, sharding, the three view modes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from icon_lightning.data import ClusteringDataModule, DigitsDataset, TarImageFolder
from icon_lightning.data.backbones import FrozenBackbone
from icon_lightning.data.neighbours import walks
from icon_lightning.data.sampling import AnchorSampler
from icon_lightning.recipes import load_recipe
from tests.data.test_datasets import make_tar


def digits_module(tmp_path, **kw) -> ClusteringDataModule:
    args = dict(views="clean", cache_dir=str(tmp_path), batch_size=32, num_views=2, num_neighbours=2, k=3)
    args.update(kw)
    dm = ClusteringDataModule(DigitsDataset(), **args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batch_layout_and_neighbour_membership(tmp_path):
    dm = digits_module(tmp_path, walk_steps=2)
    batch = next(iter(dm.train_dataloader()))
    b, v, s = 32, 2, 2
    assert len(batch) == b * (v + s) and batch.inputs.shape == (b * (v + s), 64)
    assert (batch.view[: b * v] >= 0).all() and (batch.view[b * v :] == -1).all()  # anchor views, then neighbours
    anchors = batch.index[:b]
    assert torch.equal(batch.index[b : 2 * b], anchors)  # view 1 of the same anchors
    pool = walks(dm.prepared.table.numpy(), 2)  # neighbours come from 1- and 2-step walks
    for row in range(b * v, len(batch)):
        anchor = int(anchors[(row - b * v) % b])  # row V·B + s·B + j is anchor j's s-th neighbour
        assert int(batch.index[row]) in pool[anchor]
    assert torch.equal(batch.neighbours, dm.prepared.table[batch.index])
    assert torch.equal(batch.label, torch.as_tensor(dm.dataset.labels)[batch.index])
    assert dm.feature_dim == 64 and dm.num_samples == 1797 and dm.num_classes == 10
    assert dm.prepared.knn_agreement > 0.9  # digits' 3-NN mostly share the label


def test_reproducible_from_the_seed_and_fresh_each_epoch(tmp_path):
    def first_batch(seed, epoch=0):
        dm = digits_module(tmp_path, seed=seed)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    a, b, c, d = first_batch(0), first_batch(0), first_batch(1), first_batch(0, epoch=1)
    assert torch.equal(a.index, b.index) and torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.index, c.index)
    assert not torch.equal(a.index, d.index)


def test_full_batch_is_the_same_batch_every_epoch(tmp_path):
    dm = digits_module(tmp_path, batch_size=4096, num_views=1, num_neighbours=0)

    def batch(epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        (only,) = list(loader)
        return only

    a, b = batch(0), batch(1)
    assert torch.equal(a.index, torch.arange(1797))  # every item, once
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("index", "view", "inputs", "neighbours"))


def test_auto_batch_is_the_whole_dataset_up_to_4096_anchors_without_sampled_neighbours(tmp_path):
    dm = digits_module(tmp_path, batch_size="auto", num_views=1, num_neighbours=2)
    (only,) = list(dm.train_dataloader())  # one step an epoch
    assert dm.full_batch and dm.anchors_per_step == 1797
    assert torch.equal(only.index, torch.arange(1797)) and (only.view >= 0).all()  # no neighbour rows


@pytest.mark.parametrize("clusters, anchors", [(10, 1280), (40, 4096)])
def test_auto_batch_above_4096_items_is_128_anchors_per_cluster_capped_at_4096(tmp_path, clusters, anchors):
    from icon_lightning.data.datasets import FeaturesArray

    x = np.random.default_rng(0).standard_normal((5000, 8)).astype(np.float32)
    dm = ClusteringDataModule(
        FeaturesArray(x),
        views="clean",
        cache_dir=str(tmp_path),
        num_views=1,
        num_neighbours=1,
        k=3,
        num_clusters=clusters,
    )
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert not dm.full_batch and dm.anchors_per_step == min(4096, 128 * clusters) == anchors
    assert len(batches) == 5000 // anchors and len(batches[0]) == 2 * anchors  # drop_last
    assert (batches[0].view == -1).sum() == anchors  # each anchor with its one neighbour


def test_anchor_sampler_shards_disjointly():
    shards = [list(AnchorSampler(range(10), num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    indices = [i for shard in shards for _, i in shard]
    assert sorted(indices) == list(range(10)) and all(e == 0 for shard in shards for e, _ in shard)


def test_validation_batches_cover_every_item_once(tmp_path):
    dm = digits_module(tmp_path)
    seen = torch.cat([batch.index for batch in dm.val_dataloader()[0]])
    assert torch.equal(seen, torch.arange(1797))


class MeanColour(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def tiny_images(tmp_path):
    path = tmp_path / "img.tar"
    make_tar(path, [f"train/{'ab'[i % 2]}/{i:02d}.png" for i in range(24)])
    return TarImageFolder(str(path), split="train")


def tiny_module(tmp_path, **kw) -> ClusteringDataModule:
    """24 tiny images through a mean-colour backbone, prepared and set up."""
    backbone = FrozenBackbone(MeanColour(), 3, "mean-colour", "none")
    dm = ClusteringDataModule(tiny_images(tmp_path), backbone=backbone, image_size=8, k=2, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_cached_views_are_extracted_once_and_used(tmp_path):
    dm = tiny_module(
        tmp_path, views="cached", view_pool=3, cache_dir=str(tmp_path / "cache"), batch_size=8, normalize=False
    )
    assert dm.prepared.views.shape == (3, 24, 3) and len(list((tmp_path / "cache").glob("*.npy"))) == 4
    batch = next(iter(dm.train_dataloader()))
    anchor_rows = torch.arange(len(batch)) < 8 * 2  # B anchors × V views first, then the neighbours
    assert (batch.view[anchor_rows] >= 0).all() and (batch.view[~anchor_rows] == -1).all()
    expected = dm.prepared.views[batch.view[anchor_rows], batch.index[anchor_rows]].float()
    assert torch.equal(batch.inputs[anchor_rows], expected)


def test_online_views_are_images(tmp_path):
    dm = tiny_module(
        tmp_path, views="online", cache_dir=str(tmp_path / "cache"), batch_size=4, num_views=2, num_neighbours=1
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch.inputs.shape == (4 * 3, 3, 8, 8) and batch.rows(torch.randn(12, 5)).features is None


def test_batches_feed_a_training_step(tmp_path):
    torch.manual_seed(0)
    dm = digits_module(tmp_path, batch_size=256)
    loss = load_recipe("icon_clustering")
    head = torch.nn.Linear(dm.feature_dim, dm.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    fixed = next(iter(dm.train_dataloader()))
    before = loss(fixed.rows(head(fixed.inputs))).loss.item()
    for _ in range(3):
        for batch in dm.train_dataloader():
            out = loss(batch.rows(head(batch.inputs)))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    assert loss(fixed.rows(head(fixed.inputs))).loss.item() < before - 0.01


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_views"):
        ClusteringDataModule(DigitsDataset(), views="clean", num_views=0)
    with pytest.raises(ValueError, match="needs a backbone"):
        ClusteringDataModule(DigitsDataset(), views="cached")
    with pytest.raises(ValueError, match="views"):
        ClusteringDataModule(DigitsDataset(), views="sometimes")
    assert np.isfinite(digits_module(tmp_path).train_features.numpy()).all()


@pytest.mark.parametrize("k", [0, 1, 1798])
def test_num_clusters_must_be_between_2_and_the_number_of_items(k):
    """0 used to mean "the number of classes" silently, 1 trained a degenerate model, and K > N was accepted."""
    with pytest.raises(ValueError, match=rf"num_clusters: expected 2 ≤ K ≤ N = 1797 items .* got {k}"):
        ClusteringDataModule(DigitsDataset(), views="clean", num_clusters=k).setup("fit")  # K ≤ N: a fit's limit
    assert ClusteringDataModule(DigitsDataset(), views="clean", num_clusters=1797).num_clusters == 1797
    assert ClusteringDataModule(DigitsDataset(), views="clean").num_clusters == 10


def test_a_zero_evaluation_batch_names_its_own_argument():
    """`val_batch_size 0` used to fail inside the DataLoader with a message about `batch_size`."""
    with pytest.raises(ValueError, match=r"^val_batch_size: expected at least 1, got 0"):
        ClusteringDataModule(DigitsDataset(), views="clean", val_batch_size=0)
    with pytest.raises(ValueError, match=r"^extract_batch_size: expected at least 1, got 0"):
        ClusteringDataModule(DigitsDataset(), views="clean", extract_batch_size=0)


def mapped_file(address: int) -> str | None:
    """The file whose memory mapping holds ``address`` in this process (Linux /proc/self/maps), or None."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_cached_views_are_one_shared_float16_map_equal_to_the_float32_copy(tmp_path):
    """Each DDP process used to hold its own float32 stack of every cached view (26 GB a process for ViT-L);
    now the prepared views are one float16 file in the cache that every process maps."""
    backbone = FrozenBackbone(MeanColour(), 3, "mean-colour", "none")
    common = dict(backbone=backbone, views="cached", view_pool=3, image_size=8, cache_dir=str(tmp_path / "cache"), k=2)
    shared = ClusteringDataModule(tiny_images(tmp_path), **common)
    shared.prepare_data()
    shared.setup("fit")
    copy = ClusteringDataModule(tiny_images(tmp_path), views_in_memory=True, **common)
    copy.setup("fit")
    assert shared.prepared.views.dtype == torch.float16 and copy.prepared.views.dtype == torch.float32
    (views_file,) = (tmp_path / "cache").glob("*.views16")
    assert mapped_file(shared.prepared.views.data_ptr()) == str(views_file)  # pages of the file, not a copy
    assert mapped_file(copy.prepared.views.data_ptr()) != str(views_file)
    raws = np.stack([np.asarray(shared.prep.raw(shared.dataset, f"aug{v}"), dtype=np.float64) for v in range(3)])
    clean = np.asarray(shared.prep.raw(shared.dataset, "clean"), dtype=np.float64)
    reference = raws - clean.mean(0)  # centred by the clean train mean, then L2-normalised, in float64
    reference /= np.linalg.norm(reference, axis=-1, keepdims=True)
    np.testing.assert_allclose(shared.prepared.views.double().numpy(), reference, atol=1e-3)
    np.testing.assert_allclose(copy.prepared.views.double().numpy(), reference, atol=1e-4)  # float32 centring
    stamp = views_file.stat().st_mtime_ns
    again = ClusteringDataModule(tiny_images(tmp_path), **common)
    again.setup("fit")  # a second process of the node: maps the same file, writes nothing
    assert views_file.stat().st_mtime_ns == stamp and torch.equal(again.prepared.views, shared.prepared.views)
