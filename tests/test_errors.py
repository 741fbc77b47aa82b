"""Bad input gets a clear error naming the layer, what was expected and what was given."""

import pytest
import torch

from neurocoder import NeurocoderConv2d, NeurocoderLinear


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), r"rank must be an integer >= 1, got 0"),
    (dict(num_programs=0), r"num_programs must be an integer >= 1, got 0"),
    (dict(key_dim=0), r"key_dim must be an integer >= 1, got 0"),
    (dict(steps=0, composer="recurrent"), r"steps must be an integer >= 1, got 0"),
    (dict(steps=3), r"the feed-forward composer reads once \(steps=1\), got steps=3"),
    (dict(least_used=9, num_programs=8), r"least_used=9 exceeds num_programs=8"),
    (dict(least_used=-1), r"least_used must be an integer >= 0"),
    (dict(composer="lstm"), r"composer must be one of \('feedforward', 'recurrent'\), got 'lstm'"),
    (dict(key_mode="hashed"), r"key_mode must be one of \('learned', 'content'\), got 'hashed'"),
    (dict(sharpness=0.0), r"sharpness must be a finite number > 0 or 'learned', got 0.0"),
    (dict(sharpness="sharp"), r"sharpness must be a finite number > 0 or 'learned'"),
    (dict(rank=2.5), r"rank must be an integer >= 1, got 2.5"),
])
def test_invalid_options_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=r"^NeurocoderLinear\(in_features=8, out_features=4\): " + message):
        NeurocoderLinear(8, 4, **kwargs)
    with pytest.raises(ValueError, match=r"^NeurocoderConv2d\(in_channels=2, out_channels=4\): " + message):
        NeurocoderConv2d(2, 4, 3, **kwargs)


def test_invalid_sizes():
    with pytest.raises(ValueError, match="in_features must be an integer >= 1, got 0"):
        NeurocoderLinear(0, 4)
    with pytest.raises(ValueError, match="kernel_size must be positive integers"):
        NeurocoderConv2d(2, 4, 0)
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'same' or 'valid'"):
        NeurocoderConv2d(2, 4, 3, padding="full")


def test_wrong_feature_size_names_layer_expected_and_given():
    layer = NeurocoderLinear(8, 4)
    with pytest.raises(ValueError, match=r"NeurocoderLinear\(in_features=8, out_features=4\): expected input of "
                                         r"shape \(\.\.\., 8\) \(last dimension = in_features\), got \(3, 7\)"):
        layer(torch.randn(3, 7))
    conv = NeurocoderConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"NeurocoderConv2d\(in_channels=3, out_channels=4\): expected input of "
                                         r"shape \(B, 3, H, W\), got \(2, 5, 8, 8\)"):
        conv(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"got \(5, 8, 8\)"):
        conv(torch.randn(5, 8, 8))


def test_wrong_context():
    layer = NeurocoderLinear(8, 4, context_features=3)
    with pytest.raises(ValueError, match=r"expected context of shape \(\.\.\., 3\)"):
        layer(torch.randn(2, 8), context=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"context leading dimensions \(5,\) must match the input's \(2,\)"):
        layer(torch.randn(2, 8), context=torch.randn(5, 3))


def test_wrong_dtype_and_type():
    layer = NeurocoderLinear(8, 4)
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but the layer's parameters are torch.float32"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        layer([[0.0] * 8])


def test_mixed_devices():
    layer = NeurocoderLinear(8, 4)
    with pytest.raises(ValueError, match=r"input is on meta but the layer's parameters are on cpu"):
        layer(torch.randn(2, 8, device="meta"))
