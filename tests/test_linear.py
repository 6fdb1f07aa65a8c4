"""model/linear.py: the weight-major layout of few-row products computes what nn.Linear computes."""

import pytest
import torch
import torch.nn.functional as F

from storyseek.model.linear import Linear, set_weight_major_rows
from storyseek.model import Transformer, get_preset


@pytest.mark.parametrize("shape", [(64,), (1, 64), (3, 64), (2, 1, 64), (2, 4, 64), (9, 64), (0, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_major_equals_x_times_w_transposed(shape, bias):
    torch.manual_seed(0)
    layer = Linear(64, 300, bias=bias)
    layer.weight_major_rows = 8
    x = torch.randn(shape)
    y = layer(x)
    ref = F.linear(x, layer.weight, layer.bias)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_weight_major_only_up_to_its_row_count(monkeypatch):
    from storyseek.model import linear

    used = []
    real = linear.weight_major
    monkeypatch.setattr(linear, "weight_major", lambda x, w: used.append(x.shape[0]) or real(x, w))
    layer = Linear(16, 32, bias=False)
    for rows in (1, 2, 3):
        layer(torch.randn(rows, 16))
    assert used == []  # 0, the default (and training's): never
    layer.weight_major_rows = 2
    for rows in (1, 2, 3):
        layer(torch.randn(rows, 16))
    assert used == [1, 2]


def test_a_model_set_weight_major_decodes_the_same_logits():
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=256, block_size=32, n_layer=2)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        ref = model(idx).logits
        set_weight_major_rows(model, 8)
        cache = model.new_cache(2)
        model(idx[:, :-1], cache=cache)
        step = model(idx[:, -1:], cache=cache, pos=torch.full((2, 1), 11), length=12).logits
    torch.testing.assert_close(step[:, 0], ref[:, -1], rtol=1e-4, atol=1e-4)
