"""Write the predicted cluster of every dataset index as CSV and .npy into the run directory."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from icon_lightning.io import atomic_write


class ClusterAssignmentWriter(BasePredictionWriter):
    """``predictions.csv`` (index, cluster, confidence) and ``predictions.npy`` ((N,) cluster per dataset
    index, -1 for items not predicted), written atomically to ``output_dir`` (`icon` sets the run's folder) or the
    logger's folder."""

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        index = torch.cat([b["index"] for b in batches]).cpu().numpy()
        cluster = torch.cat([b["cluster"] for b in batches]).cpu().numpy()
        confidence = torch.cat([b["probs"].max(-1).values for b in batches]).float().cpu().numpy()
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir: asked on every rank
        if trainer.world_size > 1:
            # Each process predicted its shard: gather them, drop the sampler's padding, and write once.
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, (index, cluster, confidence))
            index, cluster, confidence = (np.concatenate([part[i] for part in parts]) for i in range(3))
            index, first = np.unique(index, return_index=True)
            cluster, confidence = cluster[first], confidence[first]
            if not trainer.is_global_zero:
                return
        dense = np.full(int(index.max()) + 1, -1, dtype=np.int64)
        dense[index] = cluster
        atomic_write(out / "predictions.npy", lambda f: np.save(f, dense), binary=True)

        def write_csv(f) -> None:
            writer = csv.writer(f)
            writer.writerow(["index", "cluster", "confidence"])
            for row in sorted(zip(index.tolist(), cluster.tolist(), confidence.tolist())):
                writer.writerow([row[0], row[1], f"{row[2]:.6f}"])

        atomic_write(out / "predictions.csv", write_csv)
        print(f"predictions: {out / 'predictions.csv'} and predictions.npy ({len(index)} items)")
