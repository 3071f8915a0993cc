"""`make reproduce-imagenet` (experiments/imagenet_dinov2/reproduce.py): the preflight names every missing thing
with exit status 2, and the whole pipeline (extract, k-NN, fit, I-Con and k-means scores, the table beside
Table 2) runs on a tiny ImageFolder on CPU with a randomly initialised DINOv2 ViT-S/14. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.imagenet_dinov2 import reproduce
from icon_lightning.data.neighbours import faiss_gpus

COLOURS = ((220, 40, 40), (40, 200, 60), (40, 60, 220))


def image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """root/<split>/<class>/<i>.png: 32 px noisy patches of one colour per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def problems_for(argv: list[str]) -> list[str]:
    args, _ = reproduce.parse_args(argv)
    return reproduce.preflight(args)[0]


@pytest.fixture
def offline(monkeypatch):
    """No hub, no cached weights, whatever this machine holds: nothing touches the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub_reachable() is False at once
    monkeypatch.setattr("icon_lightning.data.backbones._hub_cached", lambda name: False)
    monkeypatch.delenv("DINOV2_CHECKPOINT", raising=False)


def test_preflight_names_every_missing_thing_and_exits_2(tmp_path, offline, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    code = reproduce.main(["--root", str(tmp_path / "nowhere"), "--checkpoint", str(tmp_path / "nope.pth")])
    assert code == reproduce.PREFLIGHT_FAILED == 2
    err = capsys.readouterr().err
    assert f"IMAGENET_ROOT={tmp_path / 'nowhere'}: no such directory" in err
    assert "no CUDA GPU visible" in err and "--allow-cpu" in err
    assert "nope.pth: no such file" in err
    if faiss_gpus() == 0:
        assert "faiss" in err and "make install GPU=1" in err


def test_preflight_root_unset_and_weights_not_cached(offline, monkeypatch):
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    problems = problems_for(["--allow-cpu"])
    assert any(p.startswith("IMAGENET_ROOT is not set") for p in problems)
    assert any("vit_small_patch14_dinov2.lvd142m are not in the Hugging Face cache" in p for p in problems)
    assert not any("GPU" in p for p in problems)  # --allow-cpu: neither CUDA nor faiss-gpu is required
    problems = problems_for(["--allow-cpu", "--model", "L14"])
    assert any("vit_large_patch14_dinov2.lvd142m" in p for p in problems)


def test_preflight_checks_the_image_folder_layout(tmp_path, offline):
    root = image_folder(tmp_path / "imagenet", {"train": 1})
    ok = ["--allow-cpu", "--random-weights"]
    assert problems_for(["--root", str(root), *ok]) == [
        f"{root / 'val'}: missing; expected the ImageNet val split as val/<class>/<image>.JPEG"
    ]
    (root / "val").mkdir()
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    (problem,) = problems_for(["--root", str(root), *ok])
    assert "no class folders" in problem and "1 images" in problem  # the flat val/ of the ImageNet tarball
    (root / "val" / "n00000000").mkdir()
    (root / "train" / "n00000009").mkdir()
    problems = problems_for(["--root", str(root), *ok])
    assert any("n00000009" in p and "hold no image" in p for p in problems)
    assert any("the class folders must match" in p for p in problems)


def test_plan_splits_the_global_batch_over_the_processes(tmp_path):
    args, _ = reproduce.parse_args(["--root", str(tmp_path), "--model", "b14"])
    run = reproduce.plan(args, n_gpus=8)
    assert (run["processes"], run["per_process_batch"], run["global_batch"]) == (8, 512, 4096)
    assert run["strategy"] == "ddp" and run["precision"] == "bf16-mixed"
    words = reproduce.icon_fit_args(args, run, ["--trainer.max_epochs=1"])
    assert "--data.backbone.init_args.name=vit_base_patch14_dinov2.lvd142m" in words
    assert "--data.batch_size=512" in words and "--trainer.devices=8" in words and words[-1] == "--trainer.max_epochs=1"
    assert reproduce.plan(args, n_gpus=1)["strategy"] == "auto"
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--bogus"])


@pytest.mark.slow  # 22–32 s on 2 CPU cores
def test_end_to_end_on_a_tiny_image_folder_on_cpu(tmp_path, offline, capsys):
    root = image_folder(tmp_path / "imagenet", {"train": 12, "val": 6})
    code = reproduce.main(
        [
            "--root",
            str(root),
            "--allow-cpu",
            "--accelerator=cpu",
            "--random-weights",  # DINOv2 ViT-S/14 built by timm with random weights: no download
            "--image-size=28",  # 2 × 2 patches
            "--epochs=2",
            "--global-batch=16",
            "--num-workers=0",
            "--logger=csv",
            f"--cache-dir={tmp_path / 'cache'}",
            f"--output-dir={tmp_path / 'runs'}",
            "--kmeans-niter=20",
            "--trainer.check_val_every_n_epoch=1",  # passed through to `icon fit`
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "paper (Table 2)" in out and "58.52" in out and "51.84" in out
    (path,) = (tmp_path / "runs").rglob("reproduce_s14.json")
    result = json.loads(path.read_text())
    for row in ("I-Con", "k-means"):
        assert 0.0 <= result["table"][row]["this_run"] <= 1.0
    assert result["table"]["I-Con"]["paper"] == 0.5852 and result["table"]["k-means"]["paper"] == 0.5184
    assert result["kmeans"]["k"] == 3 and result["kmeans"]["niter"] == 20 and result["val_items"] == 18
    assert result["global_batch"] == 16 and result["processes"] == 1 and result["random_weights"]
    assert 0 <= result["icon"]["selected_head"] < 5  # the config's 5 heads, chosen without labels
    assert result["icon"]["last_validation_hungarian_acc"] is not None
    assert (path.parent / "metrics.json").is_file()
