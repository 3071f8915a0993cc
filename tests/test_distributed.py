"""``rank_zero_first``: rank 0 builds while the others wait, then they read what it wrote (2 gloo processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from icon_lightning.distributed import rank_zero_first


def test_alone_it_builds_once():
    calls = []
    assert rank_zero_first(lambda: calls.append("build") or 1, then=lambda: calls.append("then") or 2) == 1
    assert calls == ["build"]


def _worker(rank: int, folder: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        path = f"{folder}/built.txt"

        def build() -> str:
            with open(path, "w") as f:  # only rank 0 may get here; the other must find the file already written
                f.write("by rank 0")
            return "built"

        got = rank_zero_first(build, then=lambda: open(path).read())
        torch.save(got, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_other_rank_reads_what_rank_zero_wrote(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    assert torch.load(tmp_path / "rank0.pt") == "built" and torch.load(tmp_path / "rank1.pt") == "by rank 0"
