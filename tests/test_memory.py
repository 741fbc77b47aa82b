import json

import pytest
import torch

import neurocoder
from neurocoder import NeurocoderLinear, ProgramMemory


@pytest.mark.parametrize("key_mode", ["learned", "content"])
def test_memory_shapes_and_keys(key_mode):
    m = ProgramMemory(7, 11, 5, key_dim=3, key_mode=key_mode)
    assert m.u.shape == (7, 11) and m.v.shape == (7, 5) and m.s.shape == (7,)
    assert m.keys().shape == (3, 7, 3)
    if key_mode == "content":
        # A content key follows its program: changing a value changes that slot's key only.
        before = m.keys().detach().clone()
        with torch.no_grad():
            m.u_values[2] += 1.0
        after = m.keys().detach()
        changed = (after[0] - before[0]).abs().sum(-1) > 0
        assert changed.tolist() == [False, False, True, False, False, False, False]
        torch.testing.assert_close(after[1:], before[1:])


def test_orthogonality_loss_value():
    m = ProgramMemory(3, 4, 3, key_dim=2, dtype=torch.float64)
    with torch.no_grad():
        m.u_values.copy_(torch.eye(4, dtype=torch.float64)[:3])
        m.v_values.copy_(2 * torch.eye(3, dtype=torch.float64))
    # U rows orthonormal: 0; V = 2I: ||4I - I||_F = 3 * sqrt(3)
    torch.testing.assert_close(m.orthogonality_loss(), torch.tensor(3 * 3 ** 0.5, dtype=torch.float64))


def test_orthogonality_over_keys_covers_key_and_value_together(tmp_path):
    """The released code's loss: ||[K_U | U][K_U | U]^T - I|| + the same for V. In content mode
    the key columns are parameters of their own that only the loss reaches; in learned mode
    they are the keys the reads use. Default off: the loss on the values alone."""
    torch.manual_seed(0)
    for key_mode in ("content", "learned"):
        m = ProgramMemory(5, 7, 4, key_dim=3, key_mode=key_mode, orthogonality_over_keys=True, dtype=torch.float64)
        ku, kv = ((m.u_key_columns, m.v_key_columns) if key_mode == "content" else (m.u_keys, m.v_keys))
        u, v = torch.cat([ku, m.u], 1), torch.cat([kv, m.v], 1)
        eye = torch.eye(5, dtype=torch.float64)
        expected = torch.linalg.matrix_norm(u @ u.T - eye) + torch.linalg.matrix_norm(v @ v.T - eye)
        torch.testing.assert_close(m.orthogonality_loss(), expected)
        plain = ProgramMemory(5, 7, 4, key_dim=3, key_mode=key_mode, dtype=torch.float64)
        plain.load_state_dict({n: t for n, t in m.state_dict().items() if "key_columns" not in n})
        assert not torch.allclose(plain.orthogonality_loss(), m.orthogonality_loss())
    # Content mode: 2 P k more parameters, which the output never reads and the loss does.
    torch.manual_seed(1)
    layer = NeurocoderLinear(7, 4, num_programs=5, key_dim=3, orthogonality_over_keys=True)
    base = NeurocoderLinear(7, 4, num_programs=5, key_dim=3)
    assert sum(p.numel() for p in layer.parameters()) - sum(p.numel() for p in base.parameters()) == 2 * 5 * 3
    layer(torch.randn(6, 7)).pow(2).sum().backward()
    assert layer.memory.u_key_columns.grad is None and layer.memory.v_key_columns.grad is None
    layer.orthogonality_loss().backward()
    assert layer.memory.u_key_columns.grad.abs().sum() > 0 and layer.memory.v_key_columns.grad.abs().sum() > 0
    # Grows with the memory; saves and loads; a memory without the option refuses the file.
    layer.memory.grow(2)
    assert layer.memory.u_key_columns.shape == (7, 3) and layer.memory.v_key_columns.shape == (7, 3)
    path = layer.save_programs(tmp_path / "okeys.safetensors")
    assert ProgramMemory.from_file(path).orthogonality_over_keys
    rebuilt = ProgramMemory.from_file(path)
    torch.testing.assert_close(rebuilt.orthogonality_loss(), layer.memory.orthogonality_loss())
    with pytest.raises(ValueError, match="orthogonality_over_keys: file True, this memory False"):
        ProgramMemory(7, 7, 4, key_dim=3).load_programs(path)
    with pytest.raises(TypeError, match=r"NeurocoderLinear\(in_features=7, out_features=4\): orthogonality_over_keys must be True or False, got .yes."):
        NeurocoderLinear(7, 4, orthogonality_over_keys="yes")


def test_regularization_sums_over_layers():
    model = torch.nn.Sequential(NeurocoderLinear(6, 5), torch.nn.ReLU(), NeurocoderLinear(5, 2))
    expected = model[0].memory.orthogonality_loss() + model[2].memory.orthogonality_loss()
    torch.testing.assert_close(neurocoder.regularization(model), expected)
    torch.testing.assert_close(neurocoder.regularization(model, weight=0.5), 0.5 * expected)
    assert neurocoder.regularization(torch.nn.Linear(3, 2)).item() == 0.0
    with pytest.raises(TypeError, match="regularization: expected an nn.Module .*got list"):
        neurocoder.regularization(list(model.parameters()))


def test_routing_parameters_are_what_decides_the_reads():
    """neurocoder.routing_parameters: composer, keys (learned, or the content-key maps) and a grown
    memory's slot bias, with their names in the model; never the stored values, working program
    or bias. A change to any of them changes what is read; a change to the rest does not."""
    model = torch.nn.Sequential(NeurocoderLinear(6, 5, key_mode="learned", residual=True), torch.nn.ReLU(),
                                NeurocoderLinear(5, 2, composer="recurrent", steps=2))
    names = [name for name, _ in neurocoder.routing_parameters(model)]
    assert {n.split(".")[0] for n in names} == {"0", "2"}
    assert {n for n in names if n.startswith("0.memory")} == {"0.memory.s_keys", "0.memory.u_keys", "0.memory.v_keys"}
    assert {n for n in names if n.startswith("2.memory")} == {
        "2.memory.s_keys", "2.memory.u_key_map.weight", "2.memory.u_key_map.bias", "2.memory.v_key_map.weight",
        "2.memory.v_key_map.bias"}
    assert all(n.startswith(("0.composer.", "2.composer.")) for n in names if ".memory." not in n)
    assert not any(n.endswith(("_values", "residual_weight")) or n in ("0.bias", "2.bias") for n in names)
    model[0].memory.grow(2)
    assert "0.memory.slot_bias" in [name for name, _ in neurocoder.routing_parameters(model)]
    assert neurocoder.routing_parameters(torch.nn.Linear(3, 2)) == []
    layer = NeurocoderLinear(6, 5, key_mode="learned")
    x = torch.randn(4, 6)
    reads = lambda: layer(x, return_trace=True)[1].read_weights["u"].detach().clone()   # noqa: E731
    before = reads()
    with torch.no_grad():
        layer.memory.u_values.add_(1.0)
        layer.memory.v_values.add_(1.0)
    torch.testing.assert_close(reads(), before)               # values moved, reads did not
    with torch.no_grad():
        for _, p in neurocoder.routing_parameters(layer):
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(reads(), before)


def test_save_load_round_trip(tmp_path):
    layer = NeurocoderLinear(10, 6, num_programs=8, key_mode="learned")
    layer.memory.freeze([3])
    path = layer.save_programs(tmp_path / "programs.safetensors")
    other = NeurocoderLinear(10, 6, num_programs=8, key_mode="learned")
    other.load_programs(path)
    for name, tensor in layer.memory.state_dict().items():
        assert torch.equal(tensor, other.memory.state_dict()[name]), name
    assert other.memory.frozen_slots == [3]
    rebuilt = ProgramMemory.from_file(path)
    assert torch.equal(rebuilt.u, layer.memory.u) and rebuilt.key_mode == "learned"
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["neurocoder"])
    assert meta["num_programs"] == 8 and meta["in_features"] == 10 and meta["key_mode"] == "learned"
    assert meta["library_version"] == neurocoder.__version__
    assert meta["shapes"]["u_values"] == [8, 10]
    assert not list(tmp_path.glob("*.tmp"))


def test_load_mismatched_shape_names_what_differs(tmp_path):
    path = NeurocoderLinear(10, 6, num_programs=8).save_programs(tmp_path / "p.safetensors")
    wrong = NeurocoderLinear(10, 7, num_programs=9)
    with pytest.raises(ValueError, match=r"num_programs: file 8, this memory 9.*out_features: file 6, this memory 7"):
        wrong.load_programs(path)


def test_load_corrupt_or_foreign_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable programs file"):
        ProgramMemory.from_file(bad)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="holds no Neurocoder programs"):
        ProgramMemory.from_file(foreign)
    with pytest.raises(FileNotFoundError):
        ProgramMemory.from_file(tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged-metadata.safetensors"
    save_file({"x": torch.zeros(2)}, str(damaged), metadata={"neurocoder": '{"format": '})
    with pytest.raises(ValueError, match="'neurocoder' metadata is not valid JSON"):
        ProgramMemory.from_file(damaged)
    # A truncated file (an interrupted copy) is refused, not half-loaded.
    good = NeurocoderLinear(4, 3).save_programs(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError):
        ProgramMemory.from_file(truncated)
    with pytest.raises(FileNotFoundError, match=r"save_programs: the folder .*nope does not exist; create it first"):
        NeurocoderLinear(4, 3).save_programs(tmp_path / "nope" / "p.safetensors")


@pytest.mark.parametrize("key_mode", ["learned", "content"])
def test_frozen_slots_stay_bit_identical_under_adamw(key_mode):
    layer = NeurocoderLinear(12, 6, num_programs=8, rank=4, key_mode=key_mode, least_used=2)
    optimiser = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    # Train a little first so the optimiser has momentum on every slot.
    for _ in range(3):
        optimiser.zero_grad()
        layer(torch.randn(16, 12)).square().mean().backward()
        optimiser.step()
    frozen = [1, 4, 5]
    layer.memory.freeze(frozen)
    u, v, s, keys = (t.detach().clone() for t in (layer.memory.u, layer.memory.v, layer.memory.s,
                                                   layer.memory.keys()))
    for _ in range(5):
        optimiser.zero_grad()
        (layer(torch.randn(16, 12)).square().mean() + neurocoder.regularization(layer)).backward()
        optimiser.step()
    assert torch.equal(layer.memory.u[frozen], u[frozen])
    assert torch.equal(layer.memory.v[frozen], v[frozen])
    assert torch.equal(layer.memory.s[frozen], s[frozen])
    assert torch.equal(layer.memory.keys()[:, frozen], keys[:, frozen])
    free = [0, 2, 3, 6, 7]
    assert not torch.equal(layer.memory.u[free], u[free])
    layer.memory.unfreeze(frozen)
    assert layer.memory.frozen_slots == []
    assert torch.equal(layer.memory.u[frozen], u[frozen])  # unfreezing starts from the frozen values


@pytest.mark.parametrize("key_mode", ["learned", "content"])
def test_grow_keeps_outputs_of_old_inputs_close(key_mode):
    layer = NeurocoderLinear(20, 10, num_programs=40, rank=4, key_mode=key_mode)
    layer.eval()
    x = torch.randn(64, 20)
    before = layer(x).detach()
    layer.memory.grow(4)
    assert layer.num_programs == 44 and layer.memory.u.shape == (44, 20)
    after, trace = layer(x, return_trace=True)
    assert trace.read_weights["u"].shape[-1] == 44
    change = ((after - before).norm() / before.norm()).item()
    # Measured about 0.004-0.01 here; without the slot offsets, dilution alone moved it ~0.18.
    assert change < 0.03, change
    assert layer.memory.slot_bias.shape == (3, 44)
    assert (layer.memory.slot_bias[:, :40] == 0).all() and (layer.memory.slot_bias[:, 40:] < 0).all()
    # The same growth without the offsets: softmax over more slots dilutes every old read.
    offsets = layer.memory.slot_bias.detach().clone()
    with torch.no_grad():
        layer.memory.slot_bias.zero_()
        diluted = ((layer(x) - before).norm() / before.norm()).item()
        layer.memory.slot_bias.copy_(offsets)
    print(f"\ngrow 40 -> 44 slots ({key_mode} keys): old outputs move {change:.4f} with the slot offsets, "
          f"{diluted:.4f} without")
    assert change < diluted
    # The new slots are trainable: after a step they hold non-zero programs.
    optimiser = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer.train()
    layer(x).square().mean().backward()
    optimiser.step()
    assert layer.memory.u[40:].abs().sum() > 0
    assert layer.memory.slot_bias.grad[:, 40:].abs().sum() > 0


def test_grow_then_save_and_load(tmp_path):
    layer = NeurocoderLinear(6, 4, num_programs=5)
    layer.memory.grow(3)
    path = layer.save_programs(tmp_path / "grown.safetensors")
    assert ProgramMemory.from_file(path).num_programs == 8
    with pytest.raises(ValueError, match="num_programs"):
        NeurocoderLinear(6, 4, num_programs=5).load_programs(path)


def test_freeze_rejects_bad_slots():
    m = ProgramMemory(4, 3, 3, key_dim=2)
    with pytest.raises(ValueError, match=r"slot indices must lie in \[0, 4\)"):
        m.freeze([4])
    with pytest.raises(ValueError, match=r"down to -4\), got \[-5\]"):
        m.freeze([-5])
    m.freeze([-1])                               # counted from the end, as Python indexes
    assert m.frozen.tolist() == [False, False, False, True]


def test_a_grown_layers_state_dict_loads_once_the_memory_fits():
    grown = NeurocoderLinear(8, 4, num_programs=6, rank=2)
    grown.memory.grow(2)
    grown.eval()
    x = torch.randn(3, 8)
    fresh = NeurocoderLinear(8, 4, num_programs=6, rank=2)
    with pytest.raises(RuntimeError, match=r"memory.u_values: the state_dict holds 8 program slots, this memory 6; "
                                           r"grow it first \(memory.grow\(2\)\), then load"):
        fresh.load_state_dict(grown.state_dict())
    with pytest.raises(RuntimeError, match="build the layer with num_programs=8"):
        NeurocoderLinear(8, 4, num_programs=10, rank=2).load_state_dict(grown.state_dict())
    fresh.memory.grow(2)
    fresh.load_state_dict(grown.state_dict())
    # A layer built with as many slots takes on the grown memory's attention offsets too.
    built = NeurocoderLinear(8, 4, num_programs=8, rank=2)
    built.load_state_dict(grown.state_dict())
    for layer in (fresh, built):
        layer.eval()
        torch.testing.assert_close(layer(x), grown(x))
