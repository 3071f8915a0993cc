"""Image transforms: the deterministic one features are extracted with, and the augmentations of views.

Both normalise with the backbone's own input statistics: pass ``*backbone.normalization`` (``FeaturePrep`` does);
the defaults are ImageNet's, right only for weights trained with them.
"""

from __future__ import annotations

from torchvision import transforms as T

from icon_lightning.data.backbones import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "augment_transform", "eval_transform"]


def eval_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, grayscale_to_rgb: bool = False):
    """To tensor, resize the whole image to size × size (bilinear, on the tensor), normalise.

    Resizing the tensor rather than the PIL image reproduces the reference features in ../shared/data/features
    (EfficientNet-Lite0, CIFAR-10 test at 128 px: cosine ≥ 0.9999; PIL's bilinear resize gives 0.91-0.999).
    """
    steps = [T.Grayscale(3)] if grayscale_to_rgb else []
    steps += [
        T.ToTensor(),
        T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.Normalize(mean, std),
    ]
    return T.Compose(steps)


def augment_transform(
    size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, grayscale_to_rgb: bool = False, min_scale: float = 0.25
):
    """The views of the paper's clusterer: random resized crop, flip, colour jitter, grayscale."""
    steps = [T.Grayscale(3)] if grayscale_to_rgb else []
    steps += [
        T.ToTensor(),
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.Normalize(mean, std),
    ]
    return T.Compose(steps)
