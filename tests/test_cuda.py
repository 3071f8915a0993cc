"""CUDA paths: every recipe gives the CPU's loss and gradient on the GPU, and stays finite under bf16 autocast.

Skipped without a GPU (CI never has one); run on a lent GPU machine.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from icon_lightning.recipes import load_recipe, recipe_names
from icon_lightning.rows import Rows
from tests.conftest import RECIPE_KIND, SHARED_DATA, make_problem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(rows: Rows | None) -> Rows | None:
    if rows is None:
        return None
    return Rows(
        **{
            f.name: (None if getattr(rows, f.name) is None else getattr(rows, f.name).cuda())
            for f in dataclasses.fields(rows)
        }
    )


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_on_cuda_matches_cpu(name):
    problem = make_problem(RECIPE_KIND[name], dtype=torch.float32)
    z = torch.randn(len(problem.x), problem.out_dim, generator=torch.Generator().manual_seed(3))
    loss = load_recipe(name)
    z_cpu = z.clone().requires_grad_(True)
    out_cpu = loss(*problem.rows(z_cpu))
    (g_cpu,) = torch.autograd.grad(out_cpu.loss, z_cpu)
    z_gpu = z.cuda().requires_grad_(True)
    anchors, candidates = problem.rows(z_gpu)
    out_gpu = loss.cuda()(to_cuda(anchors), to_cuda(candidates))
    (g_gpu,) = torch.autograd.grad(out_gpu.loss, z_gpu)
    torch.testing.assert_close(out_gpu.loss.cpu(), out_cpu.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_under_bf16_autocast_is_finite_and_close(name):
    problem = make_problem(RECIPE_KIND[name], dtype=torch.float32)
    model = torch.nn.Linear(problem.x.shape[1], problem.out_dim).cuda()
    x = problem.x.cuda()
    loss = load_recipe(name).cuda()

    def run():
        anchors, candidates = problem.rows(model(x))
        return loss(to_cuda(anchors), to_cuda(candidates)).loss

    full = run()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = run()
    half.backward()
    assert torch.isfinite(half) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert half.float().item() == pytest.approx(full.item(), rel=0.05, abs=0.05)


def test_torch_knn_on_cuda_matches_faiss_on_cpu():
    import numpy as np

    from icon_lightning.data.neighbours import knn_faiss, knn_torch

    x = np.random.default_rng(0).normal(size=(5000, 64)).astype(np.float32)
    gpu, gpu_sims = knn_torch(x, 10, chunk_size=1000, device="cuda")
    cpu, cpu_sims = knn_faiss(x, 10, use_gpu=False)
    assert (gpu == cpu).mean() > 0.999  # float ties may swap order
    np.testing.assert_allclose(gpu_sims, cpu_sims, atol=1e-5)


@pytest.mark.skipif(not SHARED_DATA.joinpath("cifar10").is_dir(), reason="shared CIFAR-10 tar is absent")
def test_cuda_extraction_matches_fp32_cpu():
    import numpy as np

    from icon_lightning.data.backbones import EfficientNetLite0
    from icon_lightning.data.datasets import TarImageFolder
    from icon_lightning.data.feature_store import extract
    from icon_lightning.data.transforms import eval_transform

    data = TarImageFolder(str(SHARED_DATA / "cifar10" / "cifar10_jpeg_test.tar"), "test", eval_transform(128))
    pick = np.arange(0, 10000, 50)
    backbone = EfficientNetLite0()
    cpu = extract(backbone, data, batch_size=100, progress=False, indices=pick, device="cpu")[pick]

    def cosine(precision):
        gpu = extract(backbone, data, batch_size=100, progress=False, indices=pick, device="cuda", precision=precision)[
            pick
        ]
        cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
        print(f"{precision} CUDA vs fp32 CPU cosine: min {cos.min():.4f}, mean {cos.mean():.4f}")
        return cos

    bf16, fp32 = cosine("bf16"), cosine("fp32")
    assert bf16.mean() > 0.99 and bf16.min() > 0.95  # BN-heavy convnets drift most in bf16
    assert fp32.min() > 0.999
