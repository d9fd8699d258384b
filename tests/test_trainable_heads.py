"""Trainable base modules (modules_to_save) for text and vision classification, equal to HF PEFT both ways.

One PEFT checkpoint per architecture (BERT SEQ_CLS, ViT with modules_to_save=["classifier"],
Llama SEQ_CLS with a new `score` head) is imported once; every test reuses that import.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, INPUTS, randomize_adapters

import pefc
from pefc.interop import peft as interop

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LABELS = 3
IMAGE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "image_size": 16, "patch_size": 8, "num_labels": LABELS}


def _hf(cls_name: str, config: dict, seed: int = 0) -> torch.nn.Module:
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**config))
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _bert() -> torch.nn.Module:
    return _hf("BertForSequenceClassification", {**FAMILIES["bert"]["config"], "num_labels": LABELS})


def _vit() -> torch.nn.Module:
    return _hf("ViTForImageClassification", IMAGE)


def _llama() -> torch.nn.Module:
    return _hf("LlamaForSequenceClassification", {**FAMILIES["llama"]["config"], "num_labels": LABELS})


def _peft_checkpoint(base: torch.nn.Module, config, directory) -> torch.nn.Module:
    """A PEFT model with non-trivial LoRA and head values, saved to ``directory``."""
    model = peft.get_peft_model(base, config)
    randomize_adapters(model, scale=0.2)  # LoRA B and the head copy PEFT trains
    model.save_pretrained(directory)
    return model.eval()


def _text_inputs(labels_shape: list) -> dict:
    return {**copy.deepcopy(INPUTS) | {"attention_mask": {**INPUTS["attention_mask"], "optional": True}},
            "labels": {"shape": labels_shape, "dtype": "int64", "high": LABELS, "optional": True}}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert_seq_cls")
    reference = _peft_checkpoint(_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                          target_modules=["query", "value"]), directory)
    inputs = _text_inputs(["batch"])
    inputs["token_type_ids"] = {"shape": ["batch", "seq"], "dtype": "int64", "high": 2, "optional": True}
    return reference, interop.load(directory, _bert(), inputs=inputs), directory


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vit")
    reference = _peft_checkpoint(_vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         modules_to_save=["classifier"]), directory)
    return reference, interop.load(directory, _vit()), directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_seq_cls")
    reference = _peft_checkpoint(_llama(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                           target_modules=["q_proj", "v_proj"]), directory)
    return reference, interop.load(directory, _llama(), inputs=_text_inputs(["batch"])), directory


def _ids(seed: int = 0, b: int = 3, s: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, LABELS, (b,), generator=g)}


def _pixels(seed: int = 0, b: int = 3) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


CASES = [("bert", _ids, ["classifier"]), ("vit", _pixels, ["classifier"]), ("llama", _ids, ["score"])]


@pytest.mark.parametrize(("family", "batch", "heads"), CASES)
def test_peft_checkpoints_with_modules_to_save_load_with_equal_logits(family, batch, heads, request):
    reference, cm, _ = request.getfixturevalue(family)
    inputs = batch()
    with torch.no_grad():
        _close(cm(**inputs).logits, reference(**inputs).logits)
    assert cm.pefc.spec.modules_to_save == heads
    head = dict(cm.named_parameters())[f"{heads[0]}.weight"]
    assert head.requires_grad
    report = cm.parameter_report().adapters[-1]
    assert (report.name, report.method, report.mergeable) == ("modules_to_save", "full", True)
    assert report.params == sum(p.numel() for n, p in cm.named_parameters() if n.startswith(heads[0] + "."))
    assert report.params > 0 and [s.path for s in report.sites] == heads


@pytest.mark.parametrize(("family", "batch", "base"), [("bert", _ids, _bert), ("vit", _pixels, _vit),
                                                       ("llama", _ids, _llama)])
def test_pefc_exports_load_in_peft_with_equal_logits(family, batch, base, request, tmp_path):
    _, cm, _ = request.getfixturevalue(family)
    head = cm.pefc.spec.modules_to_save[0]
    with torch.no_grad():
        cm.get_parameter(f"{head}.weight").mul_(1.5)  # a head pefc trained further
        interop.save(cm, tmp_path)
        reloaded = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
        inputs = batch(seed=1)
        _close(reloaded(**inputs).logits, cm(**inputs).logits)
        cm.get_parameter(f"{head}.weight").div_(1.5)


def test_heads_are_saved_reloaded_and_kept_by_merge(bert, tmp_path):
    reference, cm, _ = bert
    cm.save_adapters(tmp_path)
    fresh = cm.clone()
    with torch.no_grad():
        for value in fresh.adapter_state_dict().values():
            value.zero_()
    fresh.load_adapters(tmp_path)
    for name, value in cm.adapter_state_dict().items():
        assert torch.equal(fresh.adapter_state_dict()[name], value), name
    assert "classifier.weight" in fresh.adapter_state_dict()
    merged = cm.merge()
    inputs = _ids(2)
    with torch.no_grad():
        _close(merged(**inputs).logits, reference(**inputs).logits)
    assert torch.equal(merged.get_parameter("classifier.weight"), cm.get_parameter("classifier.weight"))
    assert merged.parameter_report().adapters[-1].name == "modules_to_save"


def test_save_refuses_a_trainable_parameter_it_would_drop(bert, tmp_path):
    _, cm, _ = bert
    model = cm.clone()
    model.get_parameter("bert.pooler.dense.bias").requires_grad_(True)
    with pytest.raises(pefc.CheckpointError, match=r"'bert\.pooler\.dense\.bias' is trainable.*modules_to_save"):
        model.save_adapters(tmp_path)
    assert not (tmp_path / "adapters.safetensors").exists()


def test_omitted_optional_inputs_give_the_original_outputs(bert):
    reference, cm, _ = bert
    ids = _ids(3)["input_ids"]
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(cm(ids).logits, reference(input_ids=ids).logits)
        _close(cm(input_ids=ids, token_type_ids=types).logits, reference(input_ids=ids, token_type_ids=types).logits)
        assert cm(input_ids=ids).loss is None


def test_classification_loss_equals_the_original_through_training(llama, bert):
    """``loss = cm(**batch).loss`` with class labels, trained in lockstep with the PEFT model."""
    for reference, cm, _ in (llama, bert):
        ours, theirs = cm.clone().eval(), copy.deepcopy(reference).eval()  # no dropout: same losses
        _lockstep(ours, theirs, [_ids(seed) for seed in range(3)])


def _lockstep(ours: torch.nn.Module, theirs: torch.nn.Module, batches: list[dict]) -> None:
    """Train both with SGD on the same batches; their losses must agree at every step."""
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    assert len(opt_ours.param_groups[0]["params"]) == len(opt_theirs.param_groups[0]["params"])
    for batch in batches:
        loss, want = ours(**batch).loss, theirs(**batch).loss
        _close(loss, want)
        for model_loss, opt in ((loss, opt_ours), (want, opt_theirs)):
            opt.zero_grad()
            model_loss.backward()
            opt.step()


def _task(seed: int, n: int = 24) -> dict[str, torch.Tensor]:
    """The class is which of three marker tokens comes first; the other tokens are noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    ids = torch.randint(3, 100, (n, 4), generator=g)
    ids[:, 0] = torch.tensor([10, 20, 30])[labels]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _accuracy_after_training(model: torch.nn.Module, steps: int = 12) -> float:
    model.eval()  # no dropout: the comparison is about what can be learned
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(steps):
        optimizer.zero_grad()
        model(**_task(step)).loss.backward()
        optimizer.step()
    test = _task(10_000, n=256)
    with torch.no_grad():
        return float((model(**test).logits.argmax(-1) == test["labels"]).float().mean())


def test_a_trainable_head_learns_what_a_frozen_random_head_cannot(bert):
    """The head: BERT's init scale (std 0.02) and biases 0, -2, -4. BERT's pooled output is tanh-bounded,
    so a frozen head moves logit k - logit 0 by at most ||w_k - w_0||_1 < 2: it always says class 0."""
    _, cm, _ = bert
    trained, frozen = cm.clone(), cm.clone()
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(LABELS, 32, generator=g) * 0.02, torch.tensor([0.0, -2.0, -4.0])
    assert (weight[1:] - weight[0]).abs().sum(-1).max() < 2
    for model in (trained, frozen):
        with torch.no_grad():
            model.get_parameter("classifier.weight").copy_(weight)
            model.get_parameter("classifier.bias").copy_(bias)
    for name in ("classifier.weight", "classifier.bias"):
        frozen.get_parameter(name).requires_grad_(False)
    with_head, without = _accuracy_after_training(trained), _accuracy_after_training(frozen)
    print(f"accuracy after 12 steps: LoRA + trainable head {with_head:.3f}, LoRA + frozen head {without:.3f}")
    assert with_head >= 0.9 and without < 0.5


def test_onnx_export_keeps_the_head_and_leaves_out_labels(bert, tmp_path):
    _, cm, _ = bert
    model = cm.clone()
    with torch.no_grad():
        model.get_parameter("classifier.bias").add_(1.0)  # verify compares with this trained head
    result = pefc.export_onnx(model, tmp_path / "classifier.onnx", verify=True)
    assert "labels" not in result.inputs and result.outputs == ["logits"]
    assert max(result.verify_max_abs_diff.values()) < 1e-4
