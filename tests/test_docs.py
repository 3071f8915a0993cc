"""README is a five-minute read and docs/ holds the rest: README's length, its links, the Makefile targets the pages
name, and every generated block of README.md and docs/*.md equal to what its command makes from the JSON now."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import common, summary

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # a markdown link's target
MARKER = re.compile(r"<!--.*?-->")


def test_readme_is_a_five_minute_read():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260


def test_every_docs_link_resolves():
    """README's links into docs/ (and every page's relative link) name files that exist."""
    readme = (ROOT / "README.md").read_text()
    into_docs = [t for t in LINK.findall(readme) if t.startswith("docs/")]
    assert {"docs/index.md", "docs/contributing.md"} <= set(into_docs)
    missing = []
    for page in common.pages(ROOT):
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, missing


def test_every_make_target_the_pages_name_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z0-9_-]+):", makefile, flags=re.M))
    named = {t for page in common.pages(ROOT) for t in re.findall(r"`make ([a-z0-9-]+)(?=[\s`])", page.read_text())}
    assert {"demo", "test", "bench-clustering", "bench-fit", "reproduce-imagenet"} <= named
    assert named <= targets, named - targets


def test_every_generated_block_is_what_its_command_makes_now():
    """Each block of README.md and docs/*.md generated from benchmarks/results/*.json equals what its generator
    makes from the JSON now (a page edited by hand, or JSON re-run without the page, fails here)."""
    drifted = [
        f"{common.block_file(markers).relative_to(ROOT)} {markers[0]}: run `{command}`"
        for markers, (command, make) in summary.generated_blocks().items()
        if common.read_block(markers) != make().strip()
    ]
    assert not drifted, drifted


def test_every_marker_in_the_pages_belongs_to_a_generated_block():
    """No page holds a marker that no generator writes (a block nothing checks), and each block is in one page."""
    from tests.test_bad_input import BAD_INPUT_MARKERS

    known = [*summary.generated_blocks(), BAD_INPUT_MARKERS]
    found = {m for page in common.pages(ROOT) for m in MARKER.findall(page.read_text())}
    assert found == {m for pair in known for m in pair}
    assert common.block_file(summary.MARKERS) == ROOT / "README.md"
    for markers in known:
        common.block_file(markers)  # exactly one page holds it, the end marker after the start


def test_a_block_is_found_in_the_one_page_that_holds_it(tmp_path):
    markers = ("<!-- t -->", "<!-- t-end -->")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("intro\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text(f"a\n{markers[0]}\nold\n{markers[1]}\nz\n")
    assert common.block_file(markers, tmp_path) == page
    common.write_readme_block("| new |", common.block_file(markers, tmp_path), markers=markers)
    assert page.read_text() == f"a\n{markers[0]}\n| new |\n{markers[1]}\nz\n"
    assert common.read_block(markers, tmp_path) == "| new |"
    (tmp_path / "README.md").write_text(f"{markers[0]}\n{markers[1]}\n")  # a second page with the same block
    with pytest.raises(ValueError, match=r"^<!-- t -->: expected in exactly one .* found in README.md, docs/b.md$"):
        common.block_file(markers, tmp_path)
    with pytest.raises(ValueError, match="found in none of them"):
        common.block_file(("<!-- nowhere -->", "<!-- nowhere-end -->"), tmp_path)
    page.write_text(f"{markers[1]}\n{markers[0]}\n")
    (tmp_path / "README.md").write_text("")
    with pytest.raises(ValueError, match=r"^<!-- t-end -->: expected after <!-- t --> in docs/b.md$"):
        common.block_file(markers, tmp_path)


def _results_file(folder: Path, name: str, rows: dict[str, list[float]], k: int = 3, ks=(), **extra) -> Path:
    import benchmarks.clustering as bc

    def method(name, accs, **more):
        runs = [{"seed": s, "hungarian_acc": a} for s, a in enumerate(accs)]
        for run, chosen in zip(runs, ks if "clusters" in more else ()):
            run["num_clusters"] = chosen
        mean = {"mean": sum(accs) / len(accs), "std": 0.0}
        return {
            "protocol": bc.current_protocol(name),
            "description": f"what {name} is",
            "runs": runs,
            "hungarian_acc": mean,
            **more,
        }

    methods = {m: method(m, accs, **extra.get(m, {})) for m, accs in rows.items()}
    path = folder / f"clustering_{name}.json"
    path.write_text(json.dumps({"dataset": name, "num_clusters": k, "methods": methods}))
    return path


def test_the_summary_is_each_methods_mean_accuracy_from_the_json(tmp_path):
    """Rows and columns come from the JSON (a method no list names, a long-tailed set), each cell the mean over
    seeds; the best row at the set's K is bold, a K-searching row never; a method absent from a set is —."""
    a = _results_file(tmp_path, "aset", {"kmeans_faiss": [0.5, 0.7], "a_new_peer": [0.8, 0.9], "icon": [0.1, 0.2]})
    auto = {"icon_auto_k": {"clusters": "auto"}}
    b = _results_file(tmp_path, "aset_lt10", {"icon": [0.4, 0.5], "icon_auto_k": [0.9, 0.9]}, ks=(2, 4), **auto)
    text = summary.summary([a, b])
    assert "| method | aset |" in text and "| method | aset_lt10 |" in text  # balanced, then long-tailed
    assert "| kmeans_faiss | 0.600 |" in text and "| a_new_peer | **0.850** |" in text and "| icon | 0.150 |" in text
    assert "| icon | **0.450** |" in text and "| icon_auto_k | 0.900 (K=2–4) |" in text  # searched K: never bold
    assert text.index("| a_new_peer |") < text.index("| icon |")  # the order the files name them
    assert "- `a_new_peer`: what a_new_peer is" in text
    assert text.endswith("is the best row on 1 of the 2 sets it ran on.")
    long_tailed = text[text.index("| method | aset_lt10 |") :]
    assert "kmeans_faiss" not in long_tailed.split("\n\n")[0]  # a method that ran on no set of a table: no row


@pytest.mark.slow
def test_the_bad_input_table_is_what_the_cases_print_now(monkeypatch):
    """docs/bad-input.md's table is `python -m tests.test_bad_input --readme`'s output (every case run again)."""
    from tests.test_bad_input import BAD_INPUT_MARKERS, cli_table

    monkeypatch.chdir(ROOT)  # the cases' relative config paths
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert common.read_block(BAD_INPUT_MARKERS) == cli_table()


def test_the_data_speed_table_states_each_json_file_s_numbers():
    """Each row reads its own file: the k-NN seconds and fraction of matmul, the extraction rates and their ratio."""
    results = common.RESULTS
    table = summary.data_speed_table()
    for name in ("knn_cpu.json", "knn_cuda.json"):
        for row in json.loads((results / name).read_text())["rows"]:
            assert (
                f"{row['backend']}: {row['seconds']:.3g} s" in table and f"**{row['fraction_of_matmul']:.2g}**" in table
            )
    tuning = {
        (r["image_size"], r["cpu_tuning"]): r["pipeline_images_per_s"]
        for r in json.loads((results / "extraction_cpu_tuning.json").read_text())["runs"]
    }
    for size in (128, 224):
        off, on = tuning[size, "off"], tuning[size, "on"]
        assert f"{size} px: **{off:.1f} → {on:.1f} img/s** ({on / off:.1f}×)" in table
    assert len(table.splitlines()) == 2 + 2 + 1 + 2 + 1 + 1 + len(list(results.glob("extraction_cuda*.json"))) + 1
