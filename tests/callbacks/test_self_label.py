"""`SelfLabel`: head matching, consensus, confident class-balanced selection (brute force), and the stage itself."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from icon_lightning.callbacks import SelfLabel
from icon_lightning.callbacks.self_label import align_to, confident_balanced, consensus_probabilities
from icon_lightning.models import IConModule
from icon_lightning.recipes import load_recipe


def test_consensus_of_relabelled_copies_is_the_reference():
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(4), size=50)
    perms = [np.arange(4), np.array([2, 0, 3, 1]), np.array([3, 2, 1, 0])]
    probs = np.stack([ref[:, np.argsort(p)] for p in perms])  # head h calls reference cluster p[c] "c"... permuted
    assert np.array_equal(align_to(ref.argmax(1), probs[1].argmax(1), 4)[probs[1].argmax(1)], ref.argmax(1))
    np.testing.assert_allclose(consensus_probabilities(probs, reference=0), ref, rtol=1e-12)


def test_confident_balanced_takes_each_clusters_most_confident_equally():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3) * 0.5, size=200)
    index, label = confident_balanced(probs, fraction=0.3)
    per = int(0.3 * 200 / 3)
    assigned, confidence = probs.argmax(1), probs.max(1)
    for c in range(3):  # brute force: the top `per` of each cluster by confidence
        members = [i for i in range(200) if assigned[i] == c]
        top = sorted(members, key=lambda i: -confidence[i])[:per]
        assert sorted(index[label == c].tolist()) == sorted(top)
    assert np.array_equal(label, assigned[index])


def _blobs(n_per: int = 60):
    rng = np.random.default_rng(2)
    centres = np.eye(3, 5) * 4
    x = np.concatenate([c + rng.standard_normal((n_per, 5)) * 0.6 for c in centres])
    truth = np.repeat(np.arange(3), n_per)
    return torch.as_tensor(x, dtype=torch.float32), truth


@pytest.mark.parametrize("consensus, pruned_first", [(False, False), (True, False), (False, True)])
def test_the_stage_replaces_a_noisy_selected_head_by_the_classifier_of_its_confident_part(consensus, pruned_first):
    x, truth = _blobs()
    module = IConModule(load_recipe("icon_clustering"), feature_dim=5, num_clusters=3, num_heads=2, head_init=[])
    for head in (0, 1):  # the blobs' own centroids, then a boundary pushed into the others: a biased head
        module.heads.init_from_partition(head, x, torch.as_tensor(truth), sharpness=1.0)
    with torch.no_grad():
        logits = module(x)[:, 1]
        margin = (logits[:, 0:1] - logits).min(1).values  # how far cluster 0 is from winning
        push = float(torch.quantile(-margin[torch.as_tensor(truth) != 0], 0.15))
        module.heads.bias[1, 0] += push  # head 1's cluster 0 now takes about 15 % of the other blobs
    module.bank.selected.fill_(1)  # head number 1 (the only live head, at position 0, when head 0 was pruned)
    module.bank.live[0] = not pruned_first
    before = module(x, [1])[:, 0].argmax(1).numpy()
    assert (before != truth).sum() >= 10
    stage = SelfLabel(fraction=0.5, consensus=consensus)
    stage.on_fit_end(SimpleNamespace(datamodule=SimpleNamespace(train_features=x)), module)
    after = module(x, [1])[:, 0].argmax(1).detach().numpy()
    assert (after == truth).mean() == 1.0 and (before != truth).any()  # the classifier separates the blobs
    assert stage.summary["pseudo_labelled"] == 3 * int(0.5 * 180 / 3)


def test_bad_settings_and_mlp_heads_are_refused():
    with pytest.raises(ValueError, match="fraction"):
        SelfLabel(fraction=0)
    with pytest.raises(ValueError, match="C"):
        SelfLabel(C=0)
    module = IConModule(load_recipe("icon_clustering"), feature_dim=5, num_clusters=3, head_hidden_dim=4)
    with pytest.raises(ValueError, match="MLP heads"):
        SelfLabel().on_fit_end(SimpleNamespace(datamodule=None), module)
