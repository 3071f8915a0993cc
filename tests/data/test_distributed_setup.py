"""ClusteringDataModule(distributed_extraction=True) under 2 gloo processes: one k-NN build, one table."""

from __future__ import annotations

import hashlib
import socket

import torch


def _rank(rank: int, world: int, port: int, cache_dir: str, queue) -> None:
    import icon_lightning.data.neighbours as neighbours
    from icon_lightning.data import ClusteringDataModule, DigitsDataset

    builds = []
    knn = neighbours.knn
    neighbours.knn = lambda *a, **kw: builds.append(rank) or knn(*a, **kw)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dm = ClusteringDataModule(DigitsDataset(), views="clean", cache_dir=cache_dir, distributed_extraction=True, k=3)
    dm.setup("fit")
    table = dm.prepared.table.numpy()  # a digest through the queue: a pipe holds too little for the table itself
    queue.put((rank, len(builds), table.shape, hashlib.sha256(table.tobytes()).hexdigest()))
    torch.distributed.destroy_process_group()


def test_one_rank_builds_the_neighbour_table_and_every_rank_loads_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(
        _rank, args=(2, port, str(tmp_path), queue), nprocs=2, join=True, start_method="spawn"
    )
    results = sorted(queue.get() for _ in range(2))
    assert [r[1] for r in results] == [1, 0]  # rank 0 built it, rank 1 loaded the file
    assert results[0][2:] == results[1][2:] and results[0][2] == (1797, 3)
