"""Datasets for the command-line job: the embedded digits data and user image folders.

* :func:`digits_datasets` — scikit-learn's 8×8 handwritten digits (1797 images, 10 classes,
  shipped with scikit-learn, no download), a fixed stratified train/test split, images
  upsampled (bilinear) to ``image_size`` and replicated to ``channels``.
* :func:`image_folder_datasets` — a torchvision ``ImageFolder`` tree.
* :func:`make_loaders` — deterministic loaders (seeded shuffling).

Every dataset returned here has a ``classes`` attribute; :func:`num_classes` reads it.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import InvalidArgumentError

__all__ = ["digits_datasets", "image_folder_datasets", "make_loaders", "num_classes", "LabeledSubset",
           "IMAGE_FOLDER_LAYOUT"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_FOLDER_LAYOUT = ("either PATH/train/<class>/<image> plus PATH/val/<class>/<image> "
                       "(or PATH/test/...), or PATH/<class>/<image> (split at random, fixed by seed)")


class LabeledSubset(Subset):
    """A ``Subset`` that keeps the class names of the dataset it indexes."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], classes: Sequence[str]):
        super().__init__(dataset, list(indices))
        self.classes = list(classes)


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset made by this module (``len(dataset.classes)``)."""
    return len(dataset.classes)


def digits_datasets(image_size: int = 32, channels: int = 3, seed: int = 0,
                    test_fraction: float = 0.2) -> Tuple[LabeledSubset, LabeledSubset]:
    """The 8×8 digits as ``(train, test)`` datasets of ``(channels, image_size, image_size)``.

    Split: stratified by class, ``test_fraction`` of each class in the test set, fixed by
    ``seed`` (``sklearn.model_selection.train_test_split``).

    Normalization: pixels ``p ∈ {0..16}`` become ``x = (p/16 − μ) / σ`` where ``μ, σ`` are the
    mean and standard deviation of ``p/16`` over the TRAIN split's 8×8 pixels (the test split
    uses the same ``μ, σ``). Upsampling is bilinear (``align_corners=False``) after
    normalization, which keeps the zero mean and lowers the variance a little (σ ≈ 0.86 at
    32×32); channels are identical copies.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if image_size < 8:
        raise InvalidArgumentError(f"image_size={image_size} is smaller than the 8x8 digits; use >= 8 (e.g. 32)")
    if channels < 1:
        raise InvalidArgumentError(f"channels={channels} must be >= 1 (3 for timm models)")
    if not 0 < test_fraction < 1:
        raise InvalidArgumentError(f"test_fraction={test_fraction} must be strictly between 0 and 1 (e.g. 0.2)")
    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=digits.target)
    mean, std = pixels[train_idx].mean(), pixels[train_idx].std()
    images = F.interpolate(((pixels - mean) / std).unsqueeze(1), size=(image_size, image_size),
                           mode="bilinear", align_corners=False)
    base = TensorDataset(images.expand(-1, channels, -1, -1), labels)
    classes = [str(c) for c in digits.target_names]
    return LabeledSubset(base, train_idx.tolist(), classes), LabeledSubset(base, test_idx.tolist(), classes)


def _image_folder(root: str, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise InvalidArgumentError(f"{root!r} is not an image folder ({exc}); expected {IMAGE_FOLDER_LAYOUT}") from None


def image_folder_datasets(path: str, image_size: int = 32, channels: int = 3, seed: int = 0,
                          test_fraction: float = 0.2) -> Tuple[Dataset, Dataset]:
    """``(train, test)`` ``ImageFolder`` datasets resized to ``image_size × image_size``.

    Layout: ``path/train`` + ``path/val`` (or ``path/test``) if both exist, otherwise ``path``
    itself holds one sub-folder per class and a random ``test_fraction`` (fixed by ``seed``)
    becomes the test set (a ``train/`` without ``val/``/``test/``, or the reverse, is an
    error). Images are resized (bilinear), converted to ``channels`` (1 or 3)
    and normalized with the ImageNet mean/std (the mean of the three for 1 channel).
    """
    from torchvision import transforms

    if not os.path.isdir(path):
        raise InvalidArgumentError(f"data path {path!r} does not exist or is not a directory; expected {IMAGE_FOLDER_LAYOUT}")
    if channels not in (1, 3):
        raise InvalidArgumentError(f"channels={channels} must be 1 or 3 for image folders")
    mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
    std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
    grayscale = [transforms.Grayscale(num_output_channels=1)] if channels == 1 else []
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), *grayscale,
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    train_dir = os.path.join(path, "train")
    test_dir = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
    if os.path.isdir(train_dir) and test_dir is None:
        raise InvalidArgumentError(f"{path!r} has a train/ folder but no val/ or test/ folder; expected {IMAGE_FOLDER_LAYOUT}")
    if test_dir is not None and not os.path.isdir(train_dir):
        raise InvalidArgumentError(f"{path!r} has {os.path.basename(test_dir)}/ but no train/ folder; expected {IMAGE_FOLDER_LAYOUT}")
    if test_dir is not None:
        train, test = _image_folder(train_dir, transform), _image_folder(test_dir, transform)
        if train.classes != test.classes:
            raise InvalidArgumentError(f"class folders differ between {train_dir!r} and {test_dir!r}: "
                             f"{train.classes} vs {test.classes}; give both the same class sub-folders")
        return train, test
    folder = _image_folder(path, transform)
    if len(folder) < 2:
        raise InvalidArgumentError(f"{path!r} holds {len(folder)} image(s); a train/test split needs at least 2")
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(max(1, round(test_fraction * len(folder))), len(folder) - 1)
    return (LabeledSubset(folder, sorted(order[n_test:]), folder.classes),
            LabeledSubset(folder, sorted(order[:n_test]), folder.classes))


def make_loaders(train: Dataset, test: Dataset, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0) -> Tuple[DataLoader, DataLoader]:
    """Train loader (shuffled by a ``torch.Generator`` seeded with ``seed``) and test loader
    (fixed order). The same seed gives the same batches in the same order on every run."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers),
            DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers))
