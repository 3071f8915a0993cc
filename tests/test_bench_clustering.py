"""`benchmarks.clustering` on digits with a shrunk budget: per-seed JSON, summaries, merge, README table."""

from __future__ import annotations

import json

import numpy as np
import pytest

import benchmarks.clustering as bc
import benchmarks.common as common


def test_clustering_benchmark_writes_per_seed_results_and_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "BUDGET", ["--data.batch_size=256", "--convergence.max_steps=12", "--model.num_heads=3"])
    args = ["--dataset", "digits", "--seeds", "0", "1", "--cache-dir", str(tmp_path / "cache")]
    bc.main([*args, "--methods", "kmeans_faiss", "icon", "icon_auto_k"])
    bc.main([*args, "--methods", "kmeans_sklearn", "--table"])  # merged into the same file

    data = json.loads((tmp_path / "clustering_digits.json").read_text())
    assert list(data["methods"]) == ["kmeans_sklearn", "kmeans_faiss", "icon", "icon_auto_k"]  # the harness's order
    assert data["fit_shape"] == [1797, 64] and data["seeds"] == [0, 1]
    for method in data["methods"].values():
        assert "budget overrides" in method["protocol"] and "'--convergence.max_steps=12'" in method["protocol"]
    for name, method in data["methods"].items():
        accs = [r["hungarian_acc"] for r in method["runs"]]
        assert [r["seed"] for r in method["runs"]] == [0, 1]
        assert method["hungarian_acc"]["mean"] == pytest.approx(np.mean(accs))
        assert method["hungarian_acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert all(0.1 < a <= 1 for a in accs), name
    icon_run = data["methods"]["icon"]["runs"][0]
    scores = icon_run["judge_scores"]
    assert icon_run["selection"] == "judge" and sorted(int(h) for h in scores) == icon_run["heads"]
    assert icon_run["selected_head"] == int(max(scores, key=scores.get))  # label-free selection, by head number
    for run in data["methods"]["icon_auto_k"]["runs"]:  # K chosen by the judge's curve, and scored at that K
        search = run["num_clusters_search"]
        best = max(search["scores"], key=lambda k: (search["scores"][k]["best"], -int(k)))
        assert run["num_clusters"] == search["chosen"] == int(best) and search["range"] == [2, min(50, 1797 // 20)]
    assert icon_run["steps"] == 12 and icon_run["converged"] is False  # the shrunk budget ends it, and it says so
    assert "| kmeans_faiss |" in capsys.readouterr().out

    bc.main([*args, "--methods", "icon", "kmeans_sklearn", "--resume"])  # both done: nothing re-runs
    again = json.loads((tmp_path / "clustering_digits.json").read_text())
    assert again["methods"] == data["methods"]


def test_unknown_method_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "RESULTS", tmp_path)
    with pytest.raises(ValueError, match="--methods: unknown \\['nope'\\]"):
        bc.main(["--dataset", "digits", "--methods", "nope", "--cache-dir", str(tmp_path)])


def test_rows_of_an_earlier_protocol_are_removed_never_shown_beside_this_one(tmp_path, monkeypatch, capsys):
    # A file from before per-method protocols: one schedule at the top level for every row.
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "RESULTS", tmp_path)
    monkeypatch.setattr(bc, "BUDGET", [])
    run = {"seed": 0, "hungarian_acc": 0.5, "nmi": 0.5, "ari": 0.5, "wall_s": 1.0}
    old_row = {"description": "old", "clusters": 10, "runs": [run], **bc.summarise([run])}
    old = {
        "dataset": "digits", "source": "old source", "fit_shape": [1797, 64], "score_shape": [1797, 64],
        "num_clusters": 10, "seeds": [0], "schedule": {"max_epochs": 15},
        "command": "python -m benchmarks.clustering --dataset digits",
        "methods": {"kmeans_faiss": old_row, "scan": old_row},
    }  # fmt: skip
    path = tmp_path / "clustering_digits.json"
    path.write_text(json.dumps(old))
    assert "not run under this protocol yet" in bc.markdown_table([path])  # old rows alone: none shown
    assert "| scan |" not in bc.markdown_table([path])

    args = ["--dataset", "digits", "--seeds", "0", "--cache-dir", str(tmp_path / "cache"), "--resume"]
    bc.main([*args, "--methods", "kmeans_faiss", "--table"])
    data = json.loads(path.read_text())
    assert list(data["methods"]) == ["kmeans_faiss"]  # the earlier protocol's scan row is gone
    assert data["methods"]["kmeans_faiss"]["runs"][0]["hungarian_acc"] != 0.5  # --resume re-ran the old row
    assert data["methods"]["kmeans_faiss"]["protocol"] == bc.PROTOCOL
    table = capsys.readouterr().out
    assert "| kmeans_faiss |" in table and "| scan" not in table
    assert "the I-Con default has not run under this protocol" in table


def test_the_gap_line_names_the_best_and_the_i_con_default():
    def row(acc, clusters=10):
        return {"clusters": clusters, "hungarian_acc": {"mean": acc, "std": 0.0}}

    rows = {"spectral": row(0.881), "icon": row(0.845), "icon_overcluster_3x": row(0.95, 30)}
    assert bc.gap_line(rows, "spectral") == (
        "Best: spectral 0.881; I-Con default 0.845; I-Con's default -3.6 points from it."
    )
    assert bc.gap_line({"icon": row(0.9)}, "icon").endswith("I-Con's default is the best.")


def test_the_table_methods_are_the_issue_s_and_all_exist():
    table = bc.methods(10)
    assert set(bc.table_methods()) <= set(table)  # the table's rows live in configs (tests/test_config_lists.py)
    for peer in ("scan", "temi", "turtle"):
        assert peer in bc.table_methods()


def test_the_icon_rows_are_the_recipe_and_its_edits():
    """The benchmark rebuilt the recipe in Python; it now reads configs/recipes/icon_clustering.yaml, and the
    ablations' edits of it are configs/ablations/<name>.yaml."""
    from icon_lightning import learned, supervisory
    from icon_lightning.recipes import build_objective, load_recipe

    # the loss ablations moved from Python (bc.icon_loss) to configs/ablations/<name>.yaml (issue 33)
    ablations = bc.ablation_configs()
    icon_loss = lambda name: build_objective(ablations[name]["overrides"]["model.loss"])  # noqa: E731
    recipe, alpha = load_recipe("icon_clustering"), 0.6
    chain = lambda loss: (type(loss.p), type(loss.p.base), loss.p.base.k, loss.p.alpha)  # noqa: E731
    no_walks = icon_loss("icon_no_walks")  # k-NN only, debiased on both sides as the recipe
    assert chain(no_walks) == (type(recipe.p), supervisory.KNNGraph, recipe.p.base.base.k, recipe.p.alpha)
    assert (type(no_walks.q), no_walks.q.alpha) == (type(recipe.q), recipe.q.alpha) and recipe.q.alpha == alpha
    no_debias = icon_loss("icon_no_debias")
    assert isinstance(no_debias.p, supervisory.Propagated) and no_debias.p.steps == recipe.p.base.steps
    assert isinstance(no_debias.q, learned.UniformCluster)
    p_only = icon_loss("icon_debias_p_only")
    assert p_only.p.alpha == alpha and isinstance(p_only.q, learned.UniformCluster)
    assert icon_loss("icon_walk_steps_3").p.base.steps == 3 and icon_loss("icon_walk_steps_3").q.alpha == alpha


def test_a_revision_retires_only_its_method_s_rows(tmp_path):
    """TEMI's rows from before its revision (issue 33: as released) are of an earlier protocol: not shown, named as
    missing; the other rows of the same file stay. The revised methods are exactly the released peers and the
    common-protocol rows whose config keeps an EMA teacher (the plateau waits for it to settle)."""
    import yaml

    teachers = {
        f"{m}_common"
        for m in ("scan", "temi", "turtle")
        if yaml.safe_load((bc.PEERS / f"{m}_common.yaml").read_text())["model"].get("ema_momentum")
    }
    assert set(bc.REVISIONS) == {"scan", "temi", "turtle"} | teachers == {"scan", "temi", "turtle", "temi_common"}
    assert not any(m.startswith("icon") for m in bc.REVISIONS)
    assert bc.current_protocol("icon_random_heads").endswith(bc.ISSUE_32)  # every I-Con row since issue 32
    run = {"seed": 0, "hungarian_acc": 0.5, "nmi": 0.4, "ari": 0.3, "wall_s": 1.0, "steps": 10, "converged": True}
    row = {"runs": [run], "clusters": 3} | {
        k: {"mean": run[k], "std": 0.0} for k in ("hungarian_acc", "nmi", "ari", "wall_s")
    }
    methods = {"icon": {"protocol": bc.current_protocol("icon"), **row}, "temi": {"protocol": bc.PROTOCOL, **row}}
    data = {"dataset": "x", "source": "s", "num_clusters": 3, "seeds": [0], "command": "c", "methods": methods}
    path = tmp_path / "clustering_x.json"
    path.write_text(json.dumps(data))
    assert set(bc.current_rows(path)) == {"icon"}
    table = bc.markdown_table([path])
    missing = table.split("Not run on this set yet: ")[1].split(" (the best")[0].split(", ")
    assert "| icon |" in table and "| temi |" not in table and "temi" in missing  # temi named as missing
    methods["temi"]["protocol"] = bc.current_protocol("temi")
    path.write_text(json.dumps(data))
    assert set(bc.current_rows(path)) == {"icon", "temi"} and "| temi |" in bc.markdown_table([path])


def test_readme_results_are_the_committed_json(tmp_path):
    """The results (docs/results.md) are generated from benchmarks/results/clustering_*.json, never edited by hand."""
    table = bc.markdown_table(sorted(bc.RESULTS.glob("clustering_*.json")))
    assert bc.common.read_block(bc.MARKERS) == table.strip()
    copy = tmp_path / "README.md"
    copy.write_text(f"intro\n{bc.MARKERS[0]}\nstale\n{bc.MARKERS[1]}\nrest\n")
    bc.write_readme(table, copy)
    assert bc.readme_block(copy.read_text()) == table.strip() and copy.read_text().endswith("rest\n")


def test_a_partial_set_says_which_rows_it_lacks(tmp_path, monkeypatch):
    """A set where only some table rows ran names the rest beside its best line, so its "best" is not read as
    the best of every method."""
    import json

    import benchmarks.clustering as bc

    run = {"seed": 0, "hungarian_acc": 0.5, "nmi": 0.4, "ari": 0.3, "wall_s": 1.0, "steps": 10, "converged": True}
    row = {"protocol": bc.current_protocol("icon"), "runs": [run], "clusters": 3}
    row |= {k: {"mean": run[k], "std": 0.0} for k in ("hungarian_acc", "nmi", "ari", "wall_s")}
    data = {"dataset": "x", "source": "s", "num_clusters": 3, "seeds": [0], "command": "c", "methods": {"icon": row}}
    (tmp_path / "clustering_x.json").write_text(json.dumps(data))
    table = bc.markdown_table([tmp_path / "clustering_x.json"])
    assert "Not run on this set yet: kmeans_sklearn, kmeans_faiss, spectral" in table


def test_an_empty_generated_block_is_filled_in_place(tmp_path):
    """A README whose generated block is empty gets the table between its markers (replacing the empty old text
    wrote it at the top of the file)."""
    copy = tmp_path / "README.md"
    copy.write_text(f"intro\n{bc.MARKERS[0]}\n{bc.MARKERS[1]}\nrest\n")
    bc.write_readme("| table |", copy)
    assert copy.read_text() == f"intro\n{bc.MARKERS[0]}\n| table |\n{bc.MARKERS[1]}\nrest\n"
