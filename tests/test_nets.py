import pytest
import torch

from privoffload import nets
from privoffload.errors import UserError


@pytest.mark.parametrize("width", [8, 64])
def test_resnet18_shapes(width):
    model = nets.resnet18(width).eval()
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 17  # stem + 8 blocks x 2: ResNet18
    assert convs[0].out_channels == width and convs[-1].out_channels == 8 * width


def test_real_resnet18_size():
    assert sum(p.numel() for p in nets.resnet18(64).parameters()) == 11_173_962


def test_codec_follows_table_one():
    model = nets.codec(32).eval()
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for m in model.net]
    out = model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes[3:] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (64, 8, 8), (32, 16, 16), (3, 32, 32)]
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert nets.codec(8)(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_save_and_load_round_trip(tmp_path):
    model = nets.codec(8)
    nets.save(model, tmp_path / "o.safetensors", note="x")
    again = nets.load(tmp_path / "o.safetensors", expect="codec")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), again.eval()(x))
    assert nets.read_metadata(tmp_path / "o.safetensors")["note"] == "x"
    with pytest.raises(UserError, match="holds a codec, expected a resnet18"):
        nets.load(tmp_path / "o.safetensors", expect="resnet18")
    with pytest.raises(UserError, match="does not fit"):
        nets.load_into(nets.codec(16), tmp_path / "o.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        nets.load(tmp_path / "bad.safetensors")
