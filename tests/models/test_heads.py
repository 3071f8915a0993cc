"""`ClusterHeads`: MLP heads against a per-head reference, heads started from a partition against brute force,
and `IConModule`'s label-free head initialisation from k-means."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from icon_lightning.baselines import FaissKMeans
from icon_lightning.classical import KNNSpectralClustering
from icon_lightning.data import ClusteringDataModule, DigitsDataset
from icon_lightning.models import IConModule
from icon_lightning.models.heads import ClusterHeads
from icon_lightning.recipes import load_recipe


def test_mlp_heads_are_independent_mlps_run_as_one_product():
    torch.manual_seed(0)
    heads = ClusterHeads(feature_dim=7, num_clusters=4, num_heads=3, temperature=0.5, hidden_dim=5).double()
    x = torch.randn(11, 7, dtype=torch.float64)
    out = heads(x)
    assert out.shape == (11, 3, 4)
    w1 = heads.hidden_weight
    b1 = heads.hidden_bias
    for h in range(3):  # the reference: head h alone, written out
        hidden = torch.relu(x @ w1[h].T + b1[h])
        expected = (hidden @ heads.out_weight[h] + heads.out_bias[h]) / 0.5
        torch.testing.assert_close(out[:, h], expected, rtol=1e-12, atol=1e-12)
    out[:, 1].sum().backward()  # a head's loss moves only its own output layer
    assert heads.out_weight.grad[0].abs().max() == 0 and heads.out_weight.grad[1].abs().max() > 0


def test_a_head_started_from_a_partition_is_its_nearest_centroid_rule():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(300, 6, generator=g, dtype=torch.float64), dim=1)
    assignment = torch.randint(0, 5, (300,), generator=g)
    assignment[assignment == 4] = 3  # cluster 4 has no member: it gets the overall mean
    heads = ClusterHeads(6, 5, num_heads=2, temperature=0.7).double()
    before = heads.weight[0].clone()
    heads.init_from_partition(1, x, assignment, sharpness=3.0)
    means = torch.stack([x[assignment == c].mean(0) if (assignment == c).any() else x.mean(0) for c in range(5)])
    nearest = torch.cdist(x, means).argmin(1)  # brute force
    logits = heads(x)[:, 1]
    assert torch.equal(logits.argmax(1), nearest)
    assert logits.std(1).mean().item() == pytest.approx(3.0, rel=1e-9)  # the documented softness
    assert torch.equal(heads.weight[0], before)  # the other head is untouched


def test_partition_start_needs_linear_heads_and_valid_ids():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="head_init"):
        ClusterHeads(3, 2, hidden_dim=4).init_from_partition(0, x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="assignment"):
        ClusterHeads(3, 2).init_from_partition(0, x, torch.full((10,), 2))


def test_module_starts_its_first_heads_from_kmeans_and_spectral_clustering_once(tmp_path):
    dm = ClusteringDataModule(DigitsDataset(), views="clean", cache_dir=str(tmp_path), k=3)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    module = IConModule(load_recipe("icon_clustering"), feature_dim=64, num_clusters=10, num_heads=3)
    assert module.bank.head_init == ["kmeans", "spectral"]  # the default for linear heads
    torch.manual_seed(0)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # the module's first draw, before the heads' weights
    torch.randn(1000)  # what data preparation draws in between (a fresh extraction's loader) changes nothing
    module.bank.start(dm.train_features, module.init_seed)
    x = dm.train_features.numpy()
    labels = FaissKMeans(10, n_init=10, random_state=seed).fit(x).labels_
    spectral = KNNSpectralClustering(10, 10, random_state=seed + 1).fit(x).labels_  # head 1: the next seed
    with torch.no_grad():
        start = module(dm.train_features)[:, :2].argmax(2).numpy()
    assert np.array_equal(start[:, 0], labels)  # k-means' own partition, not just a similar one
    # head 1: the nearest-centroid rule of spectral clustering's partition (not convex: most rows keep their label)
    assert np.mean(start[:, 1] == spectral) > 0.9 and adjusted_rand_score(start[:, 1], labels) < 0.99
    assert bool(module.bank.started)

    class Trainer:  # setup() must not start the heads again (a second fit, or after a restored checkpoint)
        datamodule = dm

    module._trainer = Trainer()
    weights = module.heads.weight.clone()
    module.setup("fit")
    assert torch.equal(module.heads.weight, weights)


def test_the_kmeans_start_does_not_depend_on_the_number_of_heads():
    """Head 0 of a 1-head and of a 10-head module start from the same k-means run: the seed is drawn before the
    random heads' weights (it used to be drawn after, so ``--model.num_heads 1`` started from another partition
    and a comparison of 1 head with 10 compared two k-means starts)."""
    recipe = load_recipe("icon_clustering")
    seeds = []
    for heads in (1, 10):
        torch.manual_seed(0)
        seeds.append(IConModule(recipe, feature_dim=64, num_clusters=10, num_heads=heads).init_seed)
    assert seeds[0] == seeds[1]


def test_bad_head_arguments():
    recipe = load_recipe("icon_clustering")
    with pytest.raises(ValueError, match="head_init"):
        IConModule(recipe, feature_dim=4, num_heads=1, head_init=["kmeans", "kmeans"])
    with pytest.raises(ValueError, match="head_init"):
        IConModule(recipe, feature_dim=4, num_heads=2, head_init=["agglomerative"])
    with pytest.raises(ValueError, match="head_init"):
        IConModule(recipe, feature_dim=4, num_heads=2, head_hidden_dim=8, head_init=["kmeans"])
    assert IConModule(recipe, feature_dim=4, head_hidden_dim=8).bank.head_init == []  # MLP heads start at random
    with pytest.raises(ValueError, match="scheduler_interval"):
        IConModule(recipe, feature_dim=4, scheduler_interval="batch")


def test_replace_head_sets_the_logits_and_marks_the_last_validation_stale():
    model = IConModule(load_recipe("icon_clustering"), feature_dim=4, num_clusters=3, num_heads=2, head_init=[])
    model.evaluation.validated_at_step = model.global_step
    assert not model.needs_final_validation()
    weight, bias = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    model.replace_head(1, weight, bias)
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x)[:, 1], (x.double() @ weight.T + bias).float(), rtol=1e-5, atol=1e-5)
    assert model.needs_final_validation() and model.last_scores("val") is None
    with pytest.raises(ValueError, match=r"replace_head: expected weight \(3, 4\) and bias \(3,\)"):
        model.replace_head(0, weight[:2], bias)
