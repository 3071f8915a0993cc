"""Extract and cache features, build the k-NN table, and print the k-NN label agreement.

    python -m icon_lightning.data --tar ../shared/data/cifar10/cifar10_jpeg_test.tar --split test \\
        --backbone efficientnet_lite0 --image-size 128 --k 10

Datasets: --tar PATH [--split S] | --image-folder DIR | --idx DIR [--prefix t10k] | --npz PATH | --digits.
Backbones: efficientnet_lite0 (offline ImageNet weights), a timm name (e.g. vit_small_patch14_dinov2.lvd142m;
needs the hub or --checkpoint), or identity.
"""

from __future__ import annotations

import argparse
import time

from icon_lightning.data.backbones import EfficientNetLite0, Identity, TimmBackbone
from icon_lightning.data.datasets import DigitsDataset, FeaturesFile, IdxDataset, ImageFolderDataset, TarImageFolder
from icon_lightning.data.feature_store import FeatureStore, cached_features
from icon_lightning.data.neighbours import NeighbourTable, centred_unit_rows, label_agreement
from icon_lightning.data.transforms import eval_transform


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tar")
    source.add_argument("--image-folder")
    source.add_argument("--idx")
    source.add_argument("--npz")
    source.add_argument("--digits", action="store_true")
    parser.add_argument("--split", default=None)
    parser.add_argument("--prefix", default="t10k")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--knn-backend", default="auto", choices=["auto", "faiss", "torch"])
    parser.add_argument("--cache-dir", default=".cache/icon_lightning")
    args = parser.parse_args(argv)

    gray = args.idx is not None
    if args.tar:
        dataset = TarImageFolder(args.tar, split=args.split)
    elif args.image_folder:
        dataset = ImageFolderDataset(args.image_folder)
    elif args.idx:
        dataset = IdxDataset(args.idx, prefix=args.prefix)
    elif args.npz:
        dataset = FeaturesFile(args.npz)
    else:
        dataset = DigitsDataset()
    features_given = args.npz or args.digits
    if features_given or args.backbone == "identity":
        backbone, transform = Identity(), None
    elif args.backbone == "efficientnet_lite0":
        backbone = EfficientNetLite0(args.checkpoint)
        transform = eval_transform(args.image_size, *backbone.normalization, grayscale_to_rgb=gray)
    else:
        backbone = TimmBackbone(args.backbone, args.checkpoint)
        transform = eval_transform(args.image_size, *backbone.normalization, grayscale_to_rgb=gray)

    store = FeatureStore(args.cache_dir)
    start = time.perf_counter()
    features = cached_features(
        store, backbone, dataset, transform, batch_size=args.batch_size, num_workers=args.num_workers
    )
    extract_s = time.perf_counter() - start
    x = centred_unit_rows(features)
    start = time.perf_counter()
    table = NeighbourTable.in_folder(x, args.k, store.root, args.knn_backend)
    knn_s = time.perf_counter() - start
    result = {"n": len(x), "dim": x.shape[1], "extract_s": extract_s, "knn_s": knn_s}
    print(f"features: {x.shape[0]} x {x.shape[1]} in {store.root} ({extract_s:.1f} s, cached after the first run)")
    print(f"k-NN (k={args.k}): {knn_s:.2f} s")
    if (dataset.labels >= 0).all():
        result["knn_agreement"] = label_agreement(table.indices, dataset.labels)
        print(f"{args.k}-NN label agreement: {result['knn_agreement']:.3f} (diagnostic; labels never train)")
    return result


if __name__ == "__main__":
    main()
