"""Data layer: datasets with indices, transforms, the feature store, the neighbour index, the DataModule."""

from icon_lightning.data.batch import ClusteringBatch
from icon_lightning.data.datamodule import ClusteringDataModule
from icon_lightning.data.datasets import (
    DigitsDataset,
    DigitsImages,
    FeaturesArray,
    FeaturesFile,
    IdxDataset,
    ImageFolderDataset,
    IndexedDataset,
    TarImageFolder,
    TorchvisionDataset,
)
from icon_lightning.data.feature_store import FeatureKey, FeatureStore, cached_features, extract
from icon_lightning.data.neighbours import NeighbourTable, knn, knn_faiss, knn_torch, label_agreement, walks

__all__ = [
    "ClusteringBatch",
    "ClusteringDataModule",
    "DigitsDataset",
    "DigitsImages",
    "FeatureKey",
    "FeatureStore",
    "FeaturesArray",
    "FeaturesFile",
    "IdxDataset",
    "ImageFolderDataset",
    "IndexedDataset",
    "NeighbourTable",
    "TarImageFolder",
    "TorchvisionDataset",
    "cached_features",
    "extract",
    "knn",
    "knn_faiss",
    "knn_torch",
    "label_agreement",
    "walks",
]
