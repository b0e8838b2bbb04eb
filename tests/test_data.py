"""Embedded digits data, image folders and seeded loaders."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from tp_eigendamage import data


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_is_fixed_stratified_and_disjoint(digits):
    train, test = data.digits_datasets(image_size=8, channels=1, seed=0)
    train_idx, test_idx = np.array(train.indices), np.array(test.indices)
    assert len(train) + len(test) == len(digits.target) == 1797
    assert set(train_idx).isdisjoint(test_idx) and len(set(train_idx) | set(test_idx)) == 1797
    for c in range(10):
        n_class = int((digits.target == c).sum())
        assert abs(int((digits.target[test_idx] == c).sum()) - 0.2 * n_class) <= 1
    again, _ = data.digits_datasets(image_size=8, channels=1, seed=0)
    other, _ = data.digits_datasets(image_size=8, channels=1, seed=1)
    assert again.indices == train.indices and other.indices != train.indices
    assert data.num_classes(train) == data.num_classes(test) == 10


def test_digits_values_labels_and_normalization(digits):
    train, test = data.digits_datasets(image_size=8, channels=1, seed=0)
    pixels = digits.images / 16.0
    mean, std = pixels[train.indices].mean(), pixels[train.indices].std(ddof=1)
    for subset in (train, test):
        for k in (0, 7, len(subset) - 1):
            image, label = subset[k]
            i = subset.indices[k]
            assert label == digits.target[i]
            np.testing.assert_allclose(image[0].numpy(), (pixels[i] - mean) / std, rtol=1e-5, atol=1e-5)
    train_pixels = torch.stack([train[k][0] for k in range(len(train))])
    assert abs(train_pixels.mean().item()) < 1e-5 and abs(train_pixels.std().item() - 1) < 1e-4


def test_digits_upsampling_and_channel_replication():
    small, _ = data.digits_datasets(image_size=8, channels=1, seed=0)
    big, _ = data.digits_datasets(image_size=32, channels=3, seed=0)
    image, _ = big[3]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    reference = TF.resize(small[3][0], [32, 32], interpolation=InterpolationMode.BILINEAR, antialias=False)
    torch.testing.assert_close(image[:1], reference, rtol=1e-5, atol=1e-5)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        data.digits_datasets(image_size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits_datasets(test_fraction=1.0)


def _write_images(root, classes, per_class, size=(10, 6)):
    colors = {"cat": (255, 0, 0), "dog": (0, 255, 0), "eel": (0, 0, 255)}
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", size, colors[c]).save(root / c / f"{k}.png")


def test_image_folder_flat_layout_is_split_by_seed(tmp_path):
    _write_images(tmp_path, ["cat", "dog"], per_class=5)
    train, test = data.image_folder_datasets(str(tmp_path), image_size=16, seed=0)
    assert len(train) == 8 and len(test) == 2 and set(train.indices).isdisjoint(test.indices)
    assert train.classes == ["cat", "dog"] and data.num_classes(test) == 2
    again, _ = data.image_folder_datasets(str(tmp_path), image_size=16, seed=0)
    assert again.indices == train.indices
    image, label = train[0]
    assert image.shape == (3, 16, 16)
    expected = [(v - m) / s for v, m, s in zip(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))[label],
                                               data.IMAGENET_MEAN, data.IMAGENET_STD)]
    torch.testing.assert_close(image.mean(dim=(1, 2)), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_image_folder_train_val_layout_and_grayscale(tmp_path):
    _write_images(tmp_path / "train", ["cat", "eel"], per_class=3)
    _write_images(tmp_path / "val", ["cat", "eel"], per_class=2)
    train, test = data.image_folder_datasets(str(tmp_path), image_size=8, channels=1)
    assert (len(train), len(test)) == (6, 4) and data.num_classes(train) == 2
    image, label = test[0]
    assert image.shape == (1, 8, 8) and label == 0
    gray = round(0.299 * 255) / 255  # PIL's L = R·299/1000 + G·587/1000 + B·114/1000 for pure red
    mean, std = sum(data.IMAGENET_MEAN) / 3, sum(data.IMAGENET_STD) / 3
    torch.testing.assert_close(image.mean(), torch.tensor((gray - mean) / std), rtol=1e-5, atol=1e-5)


def test_image_folder_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*expected"):
        data.image_folder_datasets(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an image folder.*expected"):
        data.image_folder_datasets(str(tmp_path / "empty"))
    _write_images(tmp_path / "only_train" / "train", ["cat", "dog"], per_class=1)
    with pytest.raises(ValueError, match="no val/ or test/ folder"):
        data.image_folder_datasets(str(tmp_path / "only_train"))
    _write_images(tmp_path / "mixed" / "train", ["cat", "dog"], per_class=1)
    _write_images(tmp_path / "mixed" / "test", ["cat", "eel"], per_class=1)
    with pytest.raises(ValueError, match="class folders differ"):
        data.image_folder_datasets(str(tmp_path / "mixed"))


def test_make_loaders_are_deterministic_given_the_seed():
    train, test = data.digits_datasets(image_size=8, channels=1, seed=0)

    def labels(seed):
        train_loader, test_loader = data.make_loaders(train, test, batch_size=64, seed=seed)
        return (torch.cat([y for _, y in train_loader]), torch.cat([y for _, y in test_loader]))

    a, b, c = labels(0), labels(0), labels(1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[1], torch.as_tensor(load_digits().target[test.indices]))
    assert torch.equal(a[1], c[1])
