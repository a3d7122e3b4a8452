import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from privoffload import data as data_mod
from privoffload.data import DeviceData, load_cifar10, parse_subset, select, subset_indices
from privoffload.errors import UserError

from .helpers import assert_user_error, cli

PER_FILE = 60  # records per batch file in the small layouts written below


def write_layouts(cifar, root):
    """A small copy of the data in both official layouts, from the same records."""
    bin_dir, py_dir = root / "bin" / "cifar-10-batches-bin", root / "py" / "cifar-10-batches-py"
    bin_dir.mkdir(parents=True)
    py_dir.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        if name == "test_batch":
            x, y = cifar.x_test[:PER_FILE], cifar.y_test[:PER_FILE]
        else:
            s = slice(i * 10000, i * 10000 + PER_FILE)
            x, y = cifar.x_train[s], cifar.y_train[s]
        flat = x.reshape(len(x), -1)
        (bin_dir / f"{name}.bin").write_bytes(np.concatenate([y[:, None].astype(np.uint8), flat], 1).tobytes())
        with open(py_dir / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": flat,
                         b"filenames": [b"x.png"] * len(y)}, f)
    return root / "bin", root / "py"


def test_both_layouts_parse_to_identical_arrays(cifar, tmp_path):
    bin_root, py_root = write_layouts(cifar, tmp_path)
    a, b = load_cifar10(bin_root), load_cifar10(py_root)
    assert a.x_train.shape == (5 * PER_FILE, 3, 32, 32) and a.x_train.dtype == np.uint8
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.x_train[:PER_FILE], cifar.x_train[:PER_FILE])


def test_full_data_set_shape(cifar):
    assert cifar.x_train.shape == (50000, 3, 32, 32) and cifar.x_test.shape == (10000, 3, 32, 32)
    assert set(np.unique(cifar.y_train)) == set(range(10))
    assert np.bincount(cifar.y_test).tolist() == [1000] * 10


def test_truncated_file_is_a_clear_error(cifar, tmp_path):
    bin_root, py_root = write_layouts(cifar, tmp_path)
    f = bin_root / "cifar-10-batches-bin" / "data_batch_3.bin"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_cifar10(bin_root)
    g = py_root / "cifar-10-batches-py" / "data_batch_2"
    g.write_bytes(g.read_bytes()[:500])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_cifar10(py_root)
    done = cli("train-classifier", "--out", tmp_path / "r", "--data", bin_root, "--epochs", "1")
    assert_user_error(done, "data_batch_3.bin is truncated")


def test_missing_data_and_wrong_layout(cifar, tmp_path):
    with pytest.raises(UserError, match="no CIFAR-10 under"):
        load_cifar10(tmp_path)
    bin_root, _ = write_layouts(cifar, tmp_path)
    (bin_root / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    with pytest.raises(UserError, match="test_batch.bin is missing"):
        load_cifar10(bin_root)
    wrong = tmp_path / "wrong" / "cifar-10-batches-py"
    wrong.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(wrong / name, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(UserError, match="does not hold CIFAR-10 records"):
        load_cifar10(tmp_path / "wrong")
    done = cli("train-classifier", "--out", tmp_path / "r", "--data", tmp_path / "nothing", "--epochs", "1")
    assert_user_error(done, "no CIFAR-10")


def test_subsets():
    assert subset_indices("first:5", 100).tolist() == [0, 1, 2, 3, 4]
    assert subset_indices("range:10:13", 100).tolist() == [10, 11, 12]
    assert len(subset_indices("all", 77)) == 77
    r1, r2, r3 = subset_indices("random:30", 100, seed=1), subset_indices("random:30", 100, seed=1), subset_indices("random:30", 100, seed=2)
    assert r1.tolist() == r2.tolist() and r1.tolist() != r3.tolist()
    assert len(set(r1.tolist())) == 30 and r1.max() < 100
    for bad in ("first", "first:0", "last:3", "range:5:2", "random:x", ""):
        with pytest.raises(UserError, match="is not one of"):
            parse_subset(bad)
    with pytest.raises(UserError, match="more than the 100"):
        subset_indices("first:101", 100)


def test_first_subset_is_the_file_order(cifar):
    x, y = select(cifar, "first:20000")
    assert len(y) == 20000
    np.testing.assert_array_equal(x[-1], cifar.x_train[19999])
    xt, _ = select(cifar, "first:10", split="test")
    np.testing.assert_array_equal(xt, cifar.x_test[:10])


def test_flips_mirror_about_half_and_nothing_else(cifar):
    data = DeviceData(cifar.x_train[:2000], cifar.y_train[:2000])
    x = next(data.batches(2000))[0]
    out = next(data.batches(2000, flip_images=True, seed=0))[0]
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    frac = (mirrored & ~same).float().mean().item()
    assert 0.4 < frac < 0.6


def test_batches_are_seeded_and_cover_the_data(cifar):
    data = DeviceData(cifar.x_train[:300], cifar.y_train[:300])
    a = [y for _, y in data.batches(64, shuffle=True, seed=5)]
    b = [y for _, y in data.batches(64, shuffle=True, seed=5)]
    c = [y for _, y in data.batches(64, shuffle=True, seed=6)]
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], c[0])
    assert sum(len(y) for y in a) == 300
    assert sum(len(y) for _, y in data.batches(64, drop_last=True)) == 256
    xb, _ = next(data.batches(8))
    assert xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
    np.testing.assert_allclose(xb[0].numpy() * 255, cifar.x_train[0], atol=1e-3)
    flipped = [x for x, _ in data.batches(300, flip_images=True, seed=1)][0]
    assert not torch.equal(flipped, next(data.batches(300))[0])


def test_ranks_take_disjoint_shards():
    data = DeviceData(np.zeros((100, 3, 32, 32), np.uint8), np.arange(100))
    r0 = torch.cat([y for _, y in data.batches(10, shuffle=True, seed=3, rank=0, world=2)])
    r1 = torch.cat([y for _, y in data.batches(10, shuffle=True, seed=3, rank=1, world=2)])
    assert len(r0) == len(r1) == 50 and not set(r0.tolist()) & set(r1.tolist())


def test_pairs_are_cut_with_one_index_and_never_mirrored(cifar):
    """Uploads (here the negative image) and answers come out beside their own images, shuffled, as floats; a
    mirrored pair would not be a pair."""
    x, y = cifar.x_train[:200], cifar.y_train[:200]
    answers = np.eye(10, dtype=np.float32)[y]
    pairs = DeviceData(x, y).paired(255 - x, answers)
    n = 0
    for xb, yb, upload, answer in pairs.batches(64, shuffle=True, seed=2, channels_last=True):
        assert upload.dtype == torch.float32 and upload.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(upload, 1 - xb, atol=1e-6, rtol=0)
        assert torch.equal(answer.argmax(1), yb)
        n += len(yb)
    assert n == 200 and pairs.upload.dtype == torch.uint8 and len(pairs.part(150)) == 50
    with pytest.raises(UserError, match="cannot be mirrored"):
        next(pairs.batches(64, flip_images=True))


def test_download_checks_the_md5_and_unpacks(tmp_path, monkeypatch):
    """The official tarball's path, with a small stand-in served from a file:// URL: a right md5 unpacks, a wrong one
    is refused with a one-line error that says what to do."""
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/batches.meta.txt")
        text = b"airplane\n"
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    source = tmp_path / "cifar-10-binary.tar.gz"
    source.write_bytes(payload.getvalue())
    md5 = hashlib.md5(source.read_bytes()).hexdigest()

    monkeypatch.setitem(data_mod.URLS, "bin", (source.as_uri(), md5))
    folder = data_mod.download(tmp_path / "ok")
    assert (folder / "batches.meta.txt").read_bytes() == text

    monkeypatch.setitem(data_mod.URLS, "bin", (source.as_uri(), "0" * 32))
    with pytest.raises(UserError, match="has md5 .* expected 0{32}: delete it and download again"):
        data_mod.download(tmp_path / "bad")
