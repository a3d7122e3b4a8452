"""Data sets beyond CIFAR-10: each loader on a tiny copy the test writes and on the real shared files, the
errors a user meets, networks built for the data's images, and one grey data set end to end through the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from privoffload import nets
from privoffload.config import ClassifierConfig
from privoffload.data import load_dataset, pneumoniamnist, shared_data
from privoffload.errors import UserError

from .helpers import assert_user_error, cli, run_cli

SHARED = shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="no ../shared/data beside the checkout")


# ---------------------------------------------------------------- CIFAR-10

def test_cifar10_through_the_one_interface(cifar, tmp_path):
    """A tiny copy of the real images in the official binary layout reads the same through `load_dataset`, resized on
    request; the default root is the real data set."""
    from .test_data import PER_FILE, write_layouts

    bin_root, _ = write_layouts(cifar, tmp_path)
    d = load_dataset("cifar10", bin_root)
    assert d.name == "cifar10" and d.shape == (3, 32, 32) and len(d.classes) == 10
    assert np.array_equal(d.x_train[:PER_FILE], cifar.x_train[:PER_FILE]) and np.array_equal(d.y_test, cifar.y_test[:PER_FILE])
    big = load_dataset("cifar10", bin_root, image_size="64x48")
    assert big.shape == (3, 64, 48) and big.x_train.dtype == np.uint8 and len(big.x_test) == PER_FILE
    assert cifar.shape == (3, 32, 32) and (len(cifar.x_train), len(cifar.x_test)) == (50000, 10000)


# ---------------------------------------------------------------- PneumoniaMNIST

def write_official_pneumonia(root, n_train=12, n_test=6):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", 4), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(root / pneumoniamnist.FILE, **arrays)
    return arrays


def test_pneumonia_official_layout(tmp_path):
    arrays = write_official_pneumonia(tmp_path)
    d = load_dataset("pneumoniamnist", tmp_path, image_size="")
    assert d.shape == (1, 32, 32) and d.x_train.dtype == np.uint8 and len(d.x_train) == 12 and len(d.x_test) == 6
    assert d.classes == ("normal", "pneumonia") and d.y_train.tolist() == (np.arange(12) % 2).tolist()
    big = load_dataset("pneumoniamnist", tmp_path, image_size="64x64")
    assert big.shape == (1, 64, 64)
    # the official order is kept (only the class-sorted reconstructed copy is shuffled)
    again = load_dataset("pneumoniamnist", tmp_path, image_size="")
    assert np.array_equal(again.y_train, arrays["train_labels"].ravel())


@needs_shared
def test_pneumonia_shared_copy():
    d = load_dataset("pneumoniamnist")
    assert (len(d.x_train), len(d.x_test)) == (4708, 624) and d.shape == (1, 32, 32)
    assert np.bincount(d.y_test).tolist() == [234, 390] and "reconstructed" in d.source
    assert 0.2 < d.y_train[:1000].mean() < 0.95  # shuffled: the first images hold both classes


# ---------------------------------------------------------------- ORL faces

@needs_shared
def test_orl_shared_copy_and_the_archive_layout_agree(tmp_path):
    """The AT&T archive's sN/M.pgm files, written from the shared copy's pixels, load to the same arrays."""
    shared = load_dataset("orl", image_size="112x88")  # 112 is a multiple of 8; 92 -> 88
    assert (len(shared.x_train), len(shared.x_test), len(shared.classes)) == (280, 120, 40)
    assert np.bincount(shared.y_train).tolist() == [7] * 40 and np.bincount(shared.y_test).tolist() == [3] * 40
    with np.load(SHARED / "faces" / "orl_faces.npz") as z:
        x = np.concatenate([z["x_train"], z["x_test"]])[..., 0]
        y = np.concatenate([z["y_train"], z["y_test"]])
        number = np.concatenate([z["image_number_train"], z["image_number_test"]])
    for img, person, k in zip(x, y, number):
        folder = tmp_path / "att_faces" / f"s{person + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{k}.pgm")
    archive = load_dataset("orl", tmp_path, image_size="112x88")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(archive, name), getattr(shared, name)), name
    assert load_dataset("orl", tmp_path).shape == (1, 64, 56)  # the default size
    (tmp_path / "att_faces" / "s7" / "3.pgm").unlink()
    with pytest.raises(UserError, match="lack 1 of 400 images .first: s7/3.pgm"):
        load_dataset("orl", tmp_path)


# ---------------------------------------------------------------- folder:PATH

def write_folder(root, classes=("cat", "dog"), n=3, size=(24, 16), mode="RGB", split_sizes=None):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (split_sizes or {}).get((split, c, i), size)
                shape = (h, w, 3) if mode == "RGB" else (h, w)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")
    return root


def test_folder_reads_the_imagefolder_layout(tmp_path):
    root = write_folder(tmp_path / "rgb")
    d = load_dataset(f"folder:{root}")
    assert d.shape == (3, 16, 24) and d.classes == ("cat", "dog") and d.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    with Image.open(root / "test" / "dog" / "2.png") as im:
        assert np.array_equal(d.x_test[-1], np.asarray(im).transpose(2, 0, 1))
    grey = load_dataset(f"folder:{write_folder(tmp_path / 'grey', mode='L', size=(20, 12))}", image_size="32x32")
    assert grey.shape == (1, 32, 32) and grey.x_train.dtype == np.uint8
    with pytest.raises(UserError, match="multiples of 8: set image_size, e.g. 16x24"):
        load_dataset(f"folder:{tmp_path / 'grey'}")


@needs_shared
def test_folder_reads_real_xrays_as_the_pneumoniamnist_loader_does(tmp_path):
    """Real chest X-rays from the shared copy, written as PNG files in the ImageFolder layout, load (grey, resized to
    32x32) to exactly the arrays the PneumoniaMNIST loader gives for them."""
    with np.load(SHARED / "medical" / "pneumoniamnist_reconstructed.npz") as z:
        x, y = z["x_test"][..., 0], z["y_test"].reshape(-1)
    picked = np.concatenate([np.flatnonzero(y == c)[:4] for c in (0, 1)])
    for split in ("train", "test"):
        for i in picked:
            folder = tmp_path / split / pneumoniamnist.CLASSES[y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / f"{i:04d}.png")
    mine = load_dataset(f"folder:{tmp_path}", image_size="32x32")
    official = load_dataset("pneumoniamnist")
    assert mine.shape == (1, 32, 32) and mine.classes == pneumoniamnist.CLASSES
    assert np.array_equal(mine.x_test, official.x_test[picked]) and np.array_equal(mine.y_test, official.y_test[picked])


@pytest.mark.parametrize("damage, words", [
    (lambda r: (r / "test" / "cat" / "0.png").rename(r / "test" / "0.png"), "outside class folders"),
    (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "holds no images"),
    (lambda r: (r / "train" / "dog").rename(r / "train" / ".dog"), "needs at least two"),
    (lambda r: (r / "test" / "dog").rename(r / "test" / "cow"), "is not a class of the training split"),
    (lambda r: shutil.rmtree(r / "test"), "it needs test/CLASS"),
    (lambda r: (r / "train" / "cat" / "1.png").write_bytes(b"not an image"), "is not a readable image"),
])
def test_folder_layout_errors(tmp_path, damage, words):
    root = write_folder(tmp_path / "d", size=(16, 16))
    damage(root)
    with pytest.raises(UserError, match=words):
        load_dataset(f"folder:{root}")


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    mixed = write_folder(tmp_path / "mixed", size=(16, 16), split_sizes={("test", "dog", 1): (24, 16)})
    done = run_cli("train-classifier", "--out", tmp_path / "r", "--dataset", f"folder:{mixed}", "--epochs", "1", check=False)
    assert_user_error(done, "mixed sizes", "give images of one size")
    for args, words in ((("--dataset", "mnist"), ("unknown data set 'mnist'", "folder:PATH")),
                        (("--dataset", "orl", "--image-size", "60x56"), ("multiples of 8",)),
                        (("--dataset", f"folder:{tmp_path / 'nowhere'}"), ("is not a folder",)),
                        (("--dataset", f"folder:{tmp_path / 'mixed' / 'train'}"), ("is not an image folder", "train/CLASS"))):
        result = cli("train-classifier", "--out", tmp_path / "r2", "--epochs", "1", *args)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert all(w in lines[0] for w in words), lines[0]
    with pytest.raises(UserError, match="unknown data set"):
        ClassifierConfig(dataset="imagenet").validate()


# ---------------------------------------------------------------- networks for the data's images

def test_networks_take_the_data_sets_images(tmp_path):
    clf = nets.build("resnet18", 4, channels=1, size=(64, 56), num_classes=40, mean=(0.44,), std=(0.19,)).eval()
    assert clf(torch.rand(2, 1, 64, 56)).shape == (2, 40)
    xray = nets.build("resnet18", 4, channels=1, size=(32, 32), num_classes=2, mean=(0.5,), std=(0.25,)).eval()
    assert xray(torch.rand(2, 1, 32, 32)).shape == (2, 2) and nets.image_shape(xray) == (1, 32, 32)
    assert nets.build("resnet18", 4, size=(128, 128))(torch.rand(1, 3, 128, 128)).shape == (1, 10)  # ImageNet stem
    for arch in ("codec", "unet"):
        for size in ((64, 56), (32, 32)):
            net = nets.build(arch, 4, channels=1, size=size).eval()
            assert net(torch.rand(2, 1, *size)).shape == (2, 1, *size)
    with pytest.raises(UserError, match="multiples of 8"):
        nets.build("codec", 4, channels=1, size=(28, 28))
    nets.save(clf, tmp_path / "c.safetensors")
    again = nets.load(tmp_path / "c.safetensors").eval()
    assert nets.image_of(again) == nets.image_of(clf)
    x = torch.rand(3, 1, 64, 56)
    assert torch.equal(clf(x), again(x))


def test_files_without_image_metadata_are_cifar10(tmp_path):
    """Weights written before files recorded their images load as 3x32x32 with 10 classes."""
    old = nets.resnet18(4)
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"arch": "resnet18", "width": "4"})
    model = nets.load(tmp_path / "old.safetensors")
    assert nets.image_shape(model) == (3, 32, 32) and nets.image_of(model)["num_classes"] == 10
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(bad),
              metadata={"arch": "resnet18", "width": "4", "image": "3x99999x32"})
    with pytest.raises(UserError, match="unreadable image metadata"):
        nets.load(bad)


@needs_shared
def test_orl_end_to_end_through_the_cli(tmp_path):
    """A grey 40-class data set through every trainer: the runs record it, the obfuscator and attacker inherit it,
    the networks' files say what images they take, and the fresh classifier of reconstructions runs."""
    small = ("--epochs", "1", "--batch-size", "32", "--set", 'test_subset="random:40"')
    assert cli("train-classifier", "--out", tmp_path / "c", "--dataset", "orl", "--width", "4", "--subset", "random:64",
               *small).exit_code == 0
    assert 'dataset = "orl"' in (tmp_path / "c" / "config.toml").read_text()
    meta = nets.read_metadata(tmp_path / "c" / "classifier.safetensors")
    assert meta["image"] == "1x64x56" and meta["num_classes"] == "40" and meta["dataset"] == "orl"
    result = cli("train-obfuscator", "--out", tmp_path / "o", "--classifier", tmp_path / "c", "--width", "4",
                 "--subset", "random:64", *small)
    assert result.exit_code == 0, result.output
    assert nets.read_metadata(tmp_path / "o" / "obfuscator.safetensors")["image"] == "1x64x56"
    result = cli("attack", "--out", tmp_path / "a", "--obfuscator", tmp_path / "o", "--width", "4", "--subset",
                 "random:64", *small, "--set", "val_split=0.25")
    assert result.exit_code == 0, result.output
    from privoffload.config import IdentifyConfig
    from privoffload.privacy.identify import train_identify

    train_identify(IdentifyConfig(dataset="orl", attack=str(tmp_path / "a"), width=4, epochs=1, batch_size=32,
                                  subset="random:64", test_subset="random:40"), tmp_path / "i")
    record = [line for line in (tmp_path / "i" / "metrics.jsonl").read_text().splitlines()][-1]
    assert '"chance": 0.025' in record and '"test_accuracy"' in record
    # an ORL classifier does not fit another data set's images: refused before anything trains
    wrong = cli("train-obfuscator", "--out", tmp_path / "w", "--classifier", tmp_path / "c", "--dataset", "pneumoniamnist",
                "--subset", "random:64", *small)
    assert wrong.exit_code == 2 and "takes 1x64x56 images and 40 classes, but the data set pneumoniamnist gives 1x32x32" \
        in wrong.output


def test_the_service_and_client_take_the_models_own_images(tmp_path):
    """A grey 64x56 classifier with named classes, published and served: the manifest and the model metadata carry
    its shape and names, uploads of its shape are classified by name, others are refused; the client reads image
    files at its obfuscator's shape."""
    import json

    from privoffload.client import Client
    from privoffload.cloud.repository import Repository

    from .cloud.cloud_helpers import TOKEN, auth, serve

    image = {"channels": 1, "size": (64, 56)}
    torch.manual_seed(0)
    classes = [f"person{i}" for i in range(5)]
    nets.save(nets.build("resnet18", 4, **image, num_classes=5, mean=(0.4,), std=(0.2,)), tmp_path / "c.safetensors",
              classes=json.dumps(classes), dataset="orl")
    nets.save(nets.build("codec", 4, **image), tmp_path / "o.safetensors")
    repo = Repository(tmp_path / "repo")
    m = repo.publish(tmp_path / "c.safetensors", "faces")
    assert m.shape == (1, 64, 56) and list(m.classes) == classes
    for i in range(3):
        Image.fromarray(np.full((112, 92), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    with serve(repo) as server:
        import httpx

        meta = httpx.get(f"{server.url}/v2/models/faces", headers=auth()).json()
        assert meta["inputs"][0]["shape"] == [-1, 1, 64, 56] and meta["outputs"][0]["shape"] == [-1, 5]
        with Client(server.url, tmp_path / "o.safetensors", token=TOKEN, model="faces") as client:
            result = client.classify_files([tmp_path / f"{i}.png" for i in range(3)])
            assert result.probabilities.shape == (3, 5) and set(result.labels) <= set(classes)
            with pytest.raises(UserError, match=r"images must be \[N, 1, 64, 56\]"):
                client.classify(np.zeros((1, 3, 32, 32), np.uint8))
            with pytest.raises(UserError, match=r"input shape must be \[N, 1, 64, 56\]"):
                client.send(np.zeros((1, 3, 32, 32), np.uint8))
