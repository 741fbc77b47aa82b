import pytest
import torch
import torch.nn as nn

import neurocoder
from neurocoder import NeurocoderConv2d, NeurocoderLinear


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_convert_small_cnn_with_mlp_head_and_train_a_step():
    model = SmallCNN()
    neurocoder.convert(model, targets=["head.*", "features.3"], num_programs=12, rank=4)
    assert isinstance(model.head[1], NeurocoderLinear) and isinstance(model.head[3], NeurocoderLinear)
    assert isinstance(model.features[3], NeurocoderConv2d)
    assert isinstance(model.features[0], nn.Conv2d) and not isinstance(model.features[0], NeurocoderConv2d)
    assert model.head[3].bias is not None and model.head[3].num_programs == 12
    x, labels = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels) + 0.01 * neurocoder.regularization(model)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with neurocoder.record(model) as traces:
        model(x)
    assert set(traces) == {"features.3", "head.1", "head.3"}
    assert traces["head.3"][0].sigma.shape == (8, 4)


def test_convert_pattern_forms_and_errors():
    model = SmallCNN()
    neurocoder.convert(model, targets="3", num_programs=6, rank=2)       # suffix match: head.3
    assert isinstance(model.head[3], NeurocoderLinear) and isinstance(model.features[3], NeurocoderConv2d)
    with pytest.raises(ValueError, match=r"pattern 'classifier' matches no nn.Linear or nn.Conv2d.*features.0"):
        neurocoder.convert(SmallCNN(), targets=["classifier"])
    with pytest.raises(ValueError, match="init must be one of"):
        neurocoder.convert(SmallCNN(), targets=["head.1"], init="xavier")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped convolution"):
        neurocoder.convert(grouped, targets=["0"])
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        neurocoder.convert(SmallCNN(), targets=["head.1"], rank=0)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("key_mode", ["content", "learned"])
def test_svd_init_reproduces_a_low_rank_layer(key_mode):
    # A dense layer of rank 4 <= R: the converted layer starts at (nearly) the same function.
    linear = nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 4) @ torch.randn(4, 32) / 6)
    x = torch.randn(256, 32)
    expected = linear(x).detach()
    model = nn.Sequential(linear)
    neurocoder.convert(model, ["0"], init="svd", num_programs=16, rank=4, key_dim=8, key_mode=key_mode)
    error = _relative_error(model(x).detach(), expected)
    print(f"\nsvd init, rank-4 weight, key_mode={key_mode}: relative output error {error:.4f}")
    assert error < 0.02


def test_svd_init_close_to_best_rank_r_on_full_rank_layer():
    """Reports how close a converted layer is to the original at initialisation."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    x = torch.randn(512, 64)
    expected = linear(x).detach()
    R = 8
    u, s, vh = torch.linalg.svd(linear.weight.detach().T, full_matrices=False)
    truncated = x @ (u[:, :R] * s[:R]) @ vh[:R] + linear.bias.detach()
    best = _relative_error(truncated, expected)
    svd_model = neurocoder.convert(nn.Sequential(nn.Linear(64, 32)), ["0"], init="random", rank=R)
    random_error = _relative_error(svd_model(x).detach(), expected)
    converted = neurocoder.convert(nn.Sequential(linear), ["0"], init="svd", num_programs=32, rank=R, key_dim=8)
    svd_error = _relative_error(converted(x).detach(), expected)
    print(f"\nconvert at init, 64->32 random dense layer, rank {R}: relative output error "
          f"svd {svd_error:.3f}, best rank-{R} {best:.3f}, random init {random_error:.3f}")
    assert svd_error < best + 0.05
    assert svd_error < 0.9 * random_error


def test_svd_init_conv():
    conv = nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    expected = conv(x).detach()
    model = neurocoder.convert(nn.Sequential(conv), ["0"], init="svd", num_programs=27, rank=6, key_dim=8)
    # 6 components reach full rank (min(27, 6) = 6): the filters are reproduced. (Before session
    # 16 the attention leaked onto the 21 unseeded slots: 0.022; their keys now point away.)
    assert _relative_error(model(x).detach(), expected) < 1e-3


@pytest.mark.parametrize("key_mode", ["content", "learned"])
@pytest.mark.parametrize("num_programs,rank", [(4, 3), (16, 4), (8, 10)])
def test_svd_init_with_more_components_or_slots_than_the_weight_has_directions(key_mode, num_programs, rank):
    """A 4 -> 2 layer has 2 singular vectors: the components past them, the slots nobody reads,
    and (rank > num_programs) the components that wrap around to read a slot again must all
    start silent, so the layer starts at the weight itself."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 2)
    x = torch.randn(64, 4)
    expected = linear(x).detach()
    model = neurocoder.convert(nn.Sequential(linear), ["0"], init="svd", num_programs=num_programs, rank=rank,
                               key_mode=key_mode)
    assert _relative_error(model(x).detach(), expected) < 1e-3


def test_svd_init_says_when_components_cannot_start_silent():
    with pytest.warns(UserWarning, match="rank 10 exceeds num_programs 2 and the weight fills every slot"):
        neurocoder.convert(nn.Sequential(nn.Linear(4, 2)), ["0"], init="svd", num_programs=2, rank=10)


def test_convert_a_transformer_encoders_feed_forward_layers():
    """nn.TransformerEncoderLayer's inference fast path (and nn.TransformerEncoder's nested-tensor
    path) read linear1/linear2's weights without calling them; after convert the converted layers
    run in evaluation too, with and without a padding mask, exactly as on the ordinary path."""
    torch.manual_seed(0)
    stack = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), 2,
                                  enable_nested_tensor=True)
    neurocoder.convert(stack, ["linear1", "linear2"], num_programs=4, rank=2)
    assert all(isinstance(layer.linear1, NeurocoderLinear) for layer in stack.layers)
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    stack.eval()
    with torch.no_grad():
        for padding in (None, mask):
            expected = x
            for layer in stack.layers:           # the ordinary path, written out
                expected = layer.norm1(expected + layer._sa_block(expected, None, padding))
                expected = layer.norm2(expected + layer._ff_block(expected))
            torch.testing.assert_close(stack(x, src_key_padding_mask=padding), expected)
    stack.train()
    stack(x).sum().backward()
    assert stack.layers[0].linear1.memory.u_values.grad is not None


def test_convert_refuses_attentions_output_projection_and_changes_nothing():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    with pytest.raises(ValueError, match=r"self_attn.out_proj is nn.MultiheadAttention's output projection"):
        neurocoder.convert(layer, ["*"], num_programs=4, rank=2)
    # Nothing was replaced: a conversion that fails leaves the model as it was.
    assert type(layer.linear1) is nn.Linear and type(layer.linear2) is nn.Linear
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped convolution"):
        neurocoder.convert(model, ["*"], num_programs=4, rank=2)
    assert type(model[0]) is nn.Conv2d


def test_convert_never_reaches_inside_neurocoder_or_baseline_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), neurocoder.MoELinear(2, 2, num_experts=2, top_k=1))
    neurocoder.convert(model, ["0"], num_programs=4, rank=2)
    neurocoder.convert(model, ["*"], num_programs=4, rank=2)           # converts "2" only
    converted = [name for name, m in model.named_modules() if isinstance(m, NeurocoderLinear)]
    assert converted == ["0", "2"]
    with pytest.raises(ValueError, match="those it has: none"):
        neurocoder.convert(model, ["*"], num_programs=4, rank=2)


def test_convert_keeps_a_shared_module_shared_and_warns_of_a_tied_weight():
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.a, model.b = shared, shared                       # one module, two places
    neurocoder.convert(model, ["a"], num_programs=4, rank=2)
    assert isinstance(model.a, NeurocoderLinear) and model.b is model.a

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

    lm = TiedLM()
    with pytest.warns(UserWarning, match=r"head.weight is also emb.weight \(tied weights\).*the tie is gone"):
        neurocoder.convert(lm, ["head"], num_programs=4, rank=2)
    assert isinstance(lm.head, NeurocoderLinear) and isinstance(lm.emb, nn.Embedding)
