"""Quantisation-aware distillation: fake-quant maths vs a float64 reference, STE, training, export round trip, PTQ."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_config, llama_config, lm_dataset, seeded
from safetensors.torch import load_file
from test_trainer import TERMS, make_trainer
from torch import nn
from transformers import BertForSequenceClassification, LlamaForCausalLM

from llmkd.students import quantize as Q

IDS = torch.tensor([[4, 7, 9, 11, 13, 8, 20, 31], [4, 40, 12, 3, 50, 9, 9, 1]])


def reference_dequantize(weight: torch.Tensor, bits: int, group_size: int | None):
    """Hand-written float64 loop: codes and Ŵ per row and group, independent of llmkd.students.quantize."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().double()
    size = group_size or w.shape[1]
    codes, values = torch.empty_like(w), torch.empty_like(w)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], size):
            block = w[row, start : start + size]
            scale = block.abs().max().item() / qmax or 1.0
            q = [max(-qmax, min(qmax, round(x / scale))) for x in block.tolist()]
            codes[row, start : start + size] = torch.tensor(q, dtype=torch.float64)
            values[row, start : start + size] = torch.tensor(q, dtype=torch.float64) * scale
    return codes, values


def llama(layers=2, hidden=32, seed=1):
    return seeded(LlamaForCausalLM, llama_config(layers=layers, hidden=hidden), seed)


def with_weights(model, weights: dict[str, torch.Tensor]):
    """A plain copy whose Linear weights are replaced by the given tensors (no quantisation code involved)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in weights.items():
            twin.get_submodule(name).weight.copy_(value.float())
    return twin.eval()


def linear_names(model, exclude=("lm_head",)):
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in exclude
    ]


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 8), (8, 16)])
def test_fake_quant_forward_equals_hand_dequantised_model(bits, group_size):
    model = llama().eval()
    reference = with_weights(
        model,
        {
            n: reference_dequantize(model.get_submodule(n).weight, bits, group_size)[1]
            for n in linear_names(model)
        },
    )
    qat = Q.quantize_student(copy.deepcopy(model), bits, group_size).eval()
    assert set(Q.quantized_modules(qat)) == set(linear_names(model))  # lm_head excluded by default
    with torch.no_grad():
        got, want, plain = qat(IDS).logits, reference(IDS).logits, model(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-4)  # control: quantisation changes the output


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 4)])
def test_codes_lie_on_the_int_grid(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.logspace(-3, 1, 16).unsqueeze(1)  # rows of very different ranges
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, scale = Q.quantize_weight(w, bits, group_size)
    qmax = Q.QMAX[bits]
    assert q.dtype == torch.int8 and q.abs().max() == qmax == 2 ** (bits - 1) - 1
    codes, values = reference_dequantize(w, bits, group_size)
    assert torch.equal(q.double(), codes)
    assert (q[3] == 0).all() and torch.isfinite(scale).all()
    groups = q.reshape(16, scale.shape[1], -1).abs().amax(-1)
    assert ((groups == qmax) | (scale == 1)).all()  # every non-zero group uses its full range
    torch.testing.assert_close(Q.dequantize_weight(q, scale).double(), values, rtol=1e-6, atol=0)


def test_straight_through_gradient_is_the_identity():
    torch.manual_seed(0)
    layer = Q.QATLinear.wrap(nn.Linear(16, 8), bits=4, group_size=8)
    x, target = torch.randn(5, 16), torch.randn(5, 8)
    F.mse_loss(layer(x), target).backward()
    # The plain path: Ŵ as a leaf tensor of an ordinary linear layer.
    w_hat = Q.dequantize_weight(*Q.quantize_weight(layer.weight, 4, 8)).requires_grad_()
    F.mse_loss(F.linear(x, w_hat, layer.bias), target).backward()
    assert torch.equal(layer.weight.grad, w_hat.grad) and layer.weight.grad.abs().sum() > 0
    # Control: differentiating through round() itself gives zero gradient, which is why the STE exists.
    w = layer.weight.detach().clone().requires_grad_()
    scale = w.detach().abs().amax(1, keepdim=True) / 7
    F.mse_loss(F.linear(x, torch.round(w / scale) * scale, layer.bias), target).backward()
    assert w.grad.abs().sum() == 0


def test_qat_student_distils_and_its_latent_weights_learn(tmp_path):
    teacher = llama(layers=4, hidden=32, seed=0)
    student = Q.quantize_student(llama(seed=1), bits=4, group_size=8)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    data = lm_dataset(8)
    trainer = make_trainer(
        teacher, student, "lm", tmp_path, TERMS["logits"], train=data, max_steps=16, learning_rate=3e-3
    )
    trainer.train()
    losses = [
        h["distill/logits_forward_kl"] for h in trainer.state.log_history if "distill/logits_forward_kl" in h
    ]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    moved = {n for n, p in student.named_parameters() if not torch.equal(before[n], p.detach())}
    assert "model.layers.0.mlp.up_proj.weight" in moved and "lm_head.weight" in moved
    assert isinstance(student.model.layers[0].self_attn.q_proj, Q.QATLinear)
    trainer.save_model()  # a plain checkpoint of the latent weights: same keys, loads without warnings
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert set(plain.state_dict()) == set(llama().state_dict())


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 8)])
def test_export_and_load_round_trip_is_exact(bits, group_size, tmp_path):
    qat = Q.quantize_student(llama(), bits, group_size)
    with torch.no_grad():  # move the latent weights off their initial values, as training would
        for p in qat.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = Q.export_quantized(qat, tmp_path / "int")
    stored = load_file(tmp_path / "int" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    layer = qat.get_submodule(name[: -len(".weight")])
    assert name not in stored  # no full-precision copy of a quantised weight
    if bits == 8:
        assert stored[name + "_q"].dtype == torch.int8 and stored[name + "_q"].shape == layer.weight.shape
    else:
        assert stored[name + "_q"].dtype == torch.uint8
        assert stored[name + "_q"].shape == (layer.out_features, layer.in_features // 2)
    assert json.loads((tmp_path / "int" / "quantization_config.json").read_text())["layers"] == meta["layers"]
    loaded = Q.load_quantized(tmp_path / "int")
    assert type(loaded) is LlamaForCausalLM and not Q.quantized_modules(loaded)
    for mod_name in Q.quantized_modules(qat):
        w = qat.get_submodule(mod_name).weight
        want = Q.dequantize_weight(*Q.quantize_weight(w, bits, group_size))
        assert torch.equal(loaded.get_submodule(mod_name).weight, want), mod_name
    assert torch.equal(loaded.lm_head.weight, qat.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, qat.eval()(IDS).logits)


def test_int4_packing_round_trip():
    q = torch.tensor([[1, -1, 7, -8, 0, 3]], dtype=torch.int8)
    packed = Q.pack_int4(q)
    # By hand: low nibble = even column; -1 = 0xF, -8 = 0x8.
    assert packed.tolist() == [[0x1 | 0xF0, 0x7 | 0x80, 0x0 | 0x30]]
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    assert torch.equal(Q.unpack_int4(Q.pack_int4(codes)), codes)
    with pytest.raises(ValueError, match="even number of columns"):
        Q.pack_int4(codes[:, :3])


def test_ptq_equals_quantize_then_dequantize_and_leaves_the_model_alone():
    model = seeded(BertForSequenceClassification, bert_config(), 0).eval()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    baseline = Q.ptq(model, bits=4, group_size=16)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
    assert set(Q.quantized_modules(baseline)) == set(names)  # pooler in, classifier head out
    reference = with_weights(
        model, {n: reference_dequantize(model.get_submodule(n).weight, 4, 16)[1] for n in names}
    )
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 12, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(
            baseline(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-5,
            atol=1e-6,
        )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert not Q.quantized_modules(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3}, "bits must be 8 or 4"),
        ({"bits": 16}, "bits must be 8 or 4"),
        ({"bits": 8, "group_size": 0}, "group_size must be a positive integer"),
        ({"bits": 8, "group_size": 5}, r"group_size=5 does not divide .*in_features=32"),
        ({"bits": 4, "exclude": ("model", "lm_head")}, "no nn.Linear layer left"),
    ],
)
def test_bad_settings_fail_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Q.quantize_student(llama(), **kwargs)


def test_misuse_is_refused(tmp_path):
    qat = Q.quantize_student(llama())
    with pytest.raises(ValueError, match="already fake-quantised"):
        Q.quantize_student(qat)
    with pytest.raises(ValueError, match="no fake-quantised layer"):
        Q.export_quantized(llama(), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not an llmkd quantised export"):
        Q.load_quantized(tmp_path)
    config = llama_config(layers=1)
    config.tie_word_embeddings = True
    tied = seeded(LlamaForCausalLM, config, 0)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied to the input embeddings"):
        Q.quantize_student(tied, exclude=())


def test_a_quantised_head_turns_the_fused_logit_path_off(tmp_path):
    teacher = llama(layers=4, hidden=32, seed=0)
    default = make_trainer(teacher, Q.quantize_student(llama()), "lm", tmp_path, TERMS["logits"])
    assert default.fused  # the head is full precision: logits from hidden states @ lm_head.weight are exact
    everything = Q.quantize_student(llama(), exclude=())
    assert isinstance(everything.lm_head, Q.QATLinear)
    assert not make_trainer(teacher, everything, "lm", tmp_path, TERMS["logits"]).fused  # .weight is not Ŵ
