"""A frozen backbone's forward pass on the CPU without the page-fault overhead.

Cause (measured, ``benchmarks/extraction.py --compare``): glibc's ``malloc`` serves every block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``; below it, it trims the heap top
back to the kernel once more than twice the threshold is free there. A CNN's activations at 224 px and 256
images a batch are hundreds of MiB each, so every layer of every batch asked the kernel for new zeroed pages:
EfficientNet-Lite0 spent more system time than user time in page faults (13.6 M minor faults for 512 images),
and CPU extraction ran at a quarter of its speed.

The fix has two halves and needs both: the loader's batch goes through the backbone in micro-batches whose
largest activation stays below the mmap threshold, and while extraction runs, glibc keeps what is freed
(``M_MMAP_THRESHOLD`` at its 32 MiB cap, ``M_TRIM_THRESHOLD`` 1 GiB), so the next micro-batch reuses the same
pages. Conv weights and inputs are laid out ``channels_last`` (oneDNN's native layout on the CPU).
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit hosts
MICRO_BATCH_BYTES = 24 << 20  # the largest activation a micro-batch may hold: below the threshold, with room


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """While inside, glibc keeps freed blocks up to 32 MiB in the heap and does not trim it below 1 GiB of free
    top, so repeated forward passes reuse their pages. On leaving, the trim threshold becomes 64 MiB (where glibc's
    own dynamic rule ends once a 32 MiB block was freed) and the free top is handed back (``malloc_trim``). Yields
    whether it applied: off glibc (macOS, musl) it does nothing."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield True
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


@torch.inference_mode()
def largest_activation_bytes(module: nn.Module, example: Tensor) -> int:
    """Bytes of the largest tensor any submodule of ``module`` returns for ``example`` (one item, batch dim 1)."""
    largest = [example.numel() * example.element_size()]

    def hook(_module, _inputs, output) -> None:
        if isinstance(output, Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        module(example)
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def micro_batch_size(module: nn.Module, example: Tensor, budget: int = MICRO_BATCH_BYTES) -> int:
    """Items per forward pass so that no activation exceeds ``budget`` bytes (at least 1)."""
    return max(1, budget // largest_activation_bytes(module, example[:1]))


def channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def forward_in_micro_batches(module: nn.Module, x: Tensor, micro: int) -> Tensor:
    """``module(x)`` computed ``micro`` items at a time (inputs ``channels_last``), concatenated."""
    if len(x) <= micro:
        return module(channels_last(x))
    return torch.cat([module(channels_last(part)) for part in x.split(micro)])
