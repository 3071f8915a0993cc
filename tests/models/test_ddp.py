"""DDP: the loss and head gradients of 2 gloo processes equal one process on the same global batch.

The processes take the sparse I-Con path where the recipe allows it; the single process takes the dense
path, the reference, so the test also pins the sparse path's row slicing and self-pair offsets under DDP."""

from __future__ import annotations

import socket

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.models import IConModule
from icon_lightning.recipes import load_recipe
from tests.conftest import knn_table_brute

B, D, K, H = 24, 6, 4, 2  # global batch B, split over 2 ranks


def global_batch() -> ClusteringBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)
    table = knn_table_brute(x, 10)  # normalized_cuts reads 10 columns, the others the first 3
    return ClusteringBatch(
        inputs=x,
        index=torch.arange(B),
        view=torch.zeros(B, dtype=torch.long),
        label=torch.zeros(B, dtype=torch.long),
        neighbours=table,
        degree=torch.ones(B),
    )


def module(recipe: str, sparse: bool = True) -> IConModule:
    torch.manual_seed(1)
    loss = load_recipe(recipe)
    loss.sparse = sparse
    return IConModule(loss, feature_dim=D, num_clusters=K, num_heads=H).double()


def loss_and_grads(model: IConModule, batch: ClusteringBatch) -> tuple[torch.Tensor, torch.Tensor]:
    z = model(batch.inputs.double())
    losses = model.objective(batch, z)
    losses.sum().backward()
    return losses.detach(), model.heads.weight.grad.clone()


def _rank(rank: int, world: int, port: int, recipe: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    full = global_batch()
    local = slice(rank * B // world, (rank + 1) * B // world)
    # p needs the k-NN of every row, not only the local ones: the table rows travel with the local rows.
    batch = ClusteringBatch(**{f: getattr(full, f)[local] for f in full.__dataclass_fields__})
    model = module(recipe)
    # the module gathers through its Trainer's strategy (LightningModule.all_gather); the group is already up
    model.trainer = L.Trainer(
        accelerator="cpu", strategy=DDPStrategy(process_group_backend="gloo"), devices=world, logger=False
    )
    losses, grad = loss_and_grads(model, batch)
    torch.distributed.all_reduce(grad)  # what DDP does to parameter gradients (then divides by world)
    losses_all = [torch.empty_like(losses) for _ in range(world)]
    torch.distributed.all_gather(losses_all, losses)
    if rank == 0:
        queue.put((torch.stack(losses_all).mean(0).numpy(), (grad / world).numpy()))  # by value, not shared memory
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("recipe", ["icon_clustering", "normalized_cuts", "kmeans"])
def test_ddp_equals_single_process(recipe):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(
        _rank, args=(2, port, recipe, queue), nprocs=2, join=True, start_method="spawn"
    )
    ddp_loss, ddp_grad = (torch.from_numpy(a) for a in queue.get())
    single_loss, single_grad = loss_and_grads(module(recipe, sparse=False), global_batch())
    torch.testing.assert_close(ddp_loss, single_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ddp_grad, single_grad, rtol=1e-9, atol=1e-12)
