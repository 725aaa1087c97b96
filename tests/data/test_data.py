import numpy as np
import pytest
import torch
from PIL import Image

from hardprobe.data.datasets import (
    SplitDataset,
    load_cifar10,
    load_dataset,
    load_imagefolder,
    read_image,
)
from hardprobe.errors import DataError


def test_imagefolder_examples_table(tiny_folder):
    train, test = tiny_folder
    ds = load_imagefolder(train, test)
    assert ds.class_names == ["cat", "dog", "frog"]
    tr = ds.splits["train"].examples
    assert list(tr.columns) == ["id", "split", "path", "label", "label_name"]
    assert len(tr) == 36 and len(ds.splits["test"]) == 12
    assert tr["id"].is_unique and tr["id"].iloc[0] == "train/cat/img_000.png"
    assert (tr["label_name"] == np.array(ds.class_names)[tr["label"]]).all()
    img = ds.splits["test"].decode(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)


def test_ids_are_stable_across_loads(tiny_folder):
    a = load_imagefolder(*tiny_folder).splits["train"]
    b = load_imagefolder(*tiny_folder).splits["train"]
    assert a.examples.equals(b.examples) and a.manifest_digest == b.manifest_digest


def test_manifest_changes_when_an_image_changes(tiny_folder):
    train, test = tiny_folder
    before = load_imagefolder(train, test).splits["train"].manifest_digest
    Image.new("RGB", (40, 40), (1, 2, 3)).save(train / "dog" / "img_003.png")
    assert load_imagefolder(train, test).splits["train"].manifest_digest != before


def test_test_labels_follow_train_classes(tmp_path, tiny_folder):
    train, test = tiny_folder
    import shutil
    shutil.rmtree(test / "cat")  # test lacks a class: labels still index the train classes
    ds = load_imagefolder(train, test)
    assert set(ds.splits["test"].examples["label"]) == {1, 2}


def test_class_missing_from_train_is_an_error(tiny_folder):
    train, test = tiny_folder
    (test / "zebra").mkdir()
    Image.new("RGB", (32, 32)).save(test / "zebra" / "z.png")
    with pytest.raises(DataError, match="zebra"):
        load_imagefolder(train, test)


def test_empty_class_folder_is_named(tiny_folder):
    train, _ = tiny_folder
    (train / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        load_imagefolder(train)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_imagefolder(tmp_path / "nope")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    arr = (np.arange(20 * 10) % 256).astype(np.uint8).reshape(10, 20)
    img = (Image.fromarray(arr).convert(mode) if mode != "I;16"
           else Image.fromarray(arr.astype(np.uint16) * 257))  # 16-bit gray, same levels
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    t = read_image(path)
    assert t.dtype == torch.uint8 and t.shape == (3, 10, 20)
    if mode in ("L", "I;16"):  # gray level survives the conversion
        assert (t[0].int() - torch.from_numpy(arr).int()).abs().max() <= 1


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (3, 20, 10)


def test_corrupt_image_error_names_file(tmp_path):
    p = tmp_path / "bad.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0not really a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        read_image(p)


def test_fake_cifar_in_torchvision_format(fake_cifar):
    ds = load_cifar10(fake_cifar, download=False)
    assert ds.class_names[0] == "airplane" and len(ds.class_names) == 10
    assert len(ds.splits["train"]) == 30 and len(ds.splits["test"]) == 4
    ex = ds.splits["train"].examples
    assert ex["path"].iloc[6] == "data_batch_2:00000"
    # the decoded image is the batch row, channel-major -> (3, 32, 32)
    import pickle
    with open(fake_cifar / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][1]
    assert torch.equal(ds.splits["train"].decode(1), torch.from_numpy(row.reshape(3, 32, 32)))


def test_cifar_offline_error_names_folder(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_root=str(tmp_path), download=False)


def test_split_dataset_applies_transform(tiny_folder):
    split = load_imagefolder(*tiny_folder).splits["test"]
    ds = SplitDataset(split, lambda t: t.float() / 255, indices=np.array([3, 1]))
    x, i, err = ds[0]
    assert i == 3 and err == "" and x.dtype == torch.float32 and float(x.max()) <= 1.0


def test_undecodable_item_is_reported_not_raised(tiny_folder):
    from hardprobe.data.datasets import collate_skipping
    train, test = tiny_folder
    (test / "dog" / "img_001.png").write_bytes(b"")  # zero-byte file
    split = load_imagefolder(train, test).splits["test"]
    ds = SplitDataset(split)
    bad = int(np.flatnonzero(split.examples["path"] == "dog/img_001.png")[0])
    x, i, err = ds[bad]
    assert x is None and i == bad and "img_001.png" in err
    xb, rows, failed = collate_skipping([ds[0], ds[bad], ds[1]])
    assert xb.shape == (2, 3, 32, 32) and rows.tolist() == [0, 1] and failed[0][0] == bad


def test_mixed_sizes_without_resize_is_a_clear_error(tiny_folder):
    from hardprobe.data.datasets import collate_skipping
    train, test = tiny_folder
    Image.new("RGB", (40, 30)).save(test / "cat" / "img_000.png")
    ds = SplitDataset(load_imagefolder(train, test).splits["test"])
    with pytest.raises(DataError, match="--image-size"):
        collate_skipping([ds[0], ds[1]])
