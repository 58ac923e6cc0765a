"""Hugging Face transformers as a client: tiny random models built from configs (no downloads).

convert -> a few trainer steps -> finalize -> save_pretrained -> from_pretrained (strict) gives
identical logits; save_masked/load_masked keeps the masks; frozen parameters stay frozen; tied
weights stay tied.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")

from autoprune_ext import convert, finalize, hf  # noqa: E402
from autoprune_ext.autoprune import AutoPrune  # noqa: E402
from autoprune_ext.convert import masked_modules, tied_weights  # noqa: E402
from autoprune_ext.nn import MaskedLinear  # noqa: E402

VOCAB = 61


def llama(tied: bool):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48, num_labels=3)
    return transformers.ViTForImageClassification(cfg)


def lm_batch(g: torch.Generator, n: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def cls_batch(g: torch.Generator, n: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (n,), generator=g)}


def image_batch(g: torch.Generator, n: int = 4) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


CASES = {
    "llama-tied": (lambda: llama(True), lm_batch, transformers.LlamaForCausalLM),
    "llama-untied": (lambda: llama(False), lm_batch, transformers.LlamaForCausalLM),
    "gpt2": (gpt2, lm_batch, transformers.GPT2LMHeadModel),
    "bert": (bert, cls_batch, transformers.BertForSequenceClassification),
    "vit": (vit, image_batch, transformers.ViTForImageClassification),
}


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates shared tensors


def frozen_param(model: torch.nn.Module) -> torch.nn.Parameter:
    """The input embedding matrix (or ViT's position embeddings): what a user typically freezes."""
    emb = model.get_input_embeddings()
    if isinstance(getattr(emb, "weight", None), torch.nn.Parameter):
        return emb.weight
    return dict(model.named_parameters())["vit.embeddings.position_embeddings"]


def scramble_masks(model: torch.nn.Module, seed: int = 0) -> None:
    """Masks with about a third pruned, so that a wrong mask anywhere changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in masked_modules(model):
            m.weight_aux.copy_(torch.randn(m.weight_aux.shape, generator=g) * 0.5 + 0.2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_train_finalize_reload(case, tmp_path):
    make, batch_fn, cls = CASES[case]
    torch.manual_seed(0)
    model = make()
    dense_unique = unique_params(model)
    frozen = frozen_param(model)
    frozen.requires_grad_(False)  # the user freezes the embedding
    frozen_before = frozen.detach().clone()
    hf.prepare(model)
    layers = dict(masked_modules(model))
    assert layers, "nothing converted"
    if case == "gpt2":
        assert any(type(m).__name__ == "MaskedConv1D" for m in layers.values())
        assert "lm_head" not in layers  # tied to wte
    if case == "llama-tied":
        assert "lm_head" not in layers
    if case == "llama-untied":
        assert "lm_head" in layers
    scramble_masks(model)
    g = torch.Generator().manual_seed(1)
    trainer = AutoPrune(model, lr_weight=1e-3, lr_aux=0.05, penalty=0.5, batch_size=4)
    aux_before = {n: m.weight_aux.detach().clone() for n, m in layers.items()}
    for _ in range(3):
        record = trainer.step(batch_fn(g), batch_fn(g))
        assert torch.isfinite(torch.tensor(record["weight_loss"]))
    assert torch.equal(frozen, frozen_before), "a frozen parameter changed"
    assert not frozen.requires_grad, "the trainer unfroze a frozen parameter"
    assert any(not torch.equal(aux_before[n], m.weight_aux) for n, m in layers.items()), "masks did not train"

    model.eval()
    probe = inputs_of(batch_fn(torch.Generator().manual_seed(2)))
    with torch.no_grad():
        logits = model(**probe).logits
    dense = finalize(model)
    assert unique_params(dense) == dense_unique, "finalize changed the number of unique parameters (a tie broke?)"
    assert tied_weights(dense).keys() == tied_weights(make()).keys()
    with torch.no_grad():
        assert torch.equal(dense(**probe).logits, logits)
    dense.save_pretrained(tmp_path / "final")
    reloaded, info = cls.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).logits, logits)
    assert unique_params(reloaded) == dense_unique


@pytest.mark.parametrize("case", ["gpt2", "llama-tied", "bert"])
def test_save_masked_load_masked_keeps_masks(case, tmp_path):
    make, batch_fn, cls = CASES[case]
    torch.manual_seed(0)
    model = hf.prepare(make(), exclude=["*classifier*"])
    scramble_masks(model, seed=3)
    model.eval()
    probe = inputs_of(batch_fn(torch.Generator().manual_seed(2)))
    with torch.no_grad():
        logits = model(**probe).logits
    hf.save_masked(model, tmp_path / "masked")
    # the directory is an ordinary checkpoint of the original class (dense W, no aux keys)
    _, info = cls.from_pretrained(tmp_path / "masked", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    loaded = hf.load_masked(cls, tmp_path / "masked")
    loaded.eval()
    got = dict(masked_modules(loaded))
    want = dict(masked_modules(model))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name].weight_aux, want[name].weight_aux), name
        assert type(got[name]) is type(want[name])
    with torch.no_grad():
        assert torch.equal(loaded(**probe).logits, logits)


def test_load_masked_detects_corruption(tmp_path):
    model = hf.prepare(gpt2())
    hf.save_masked(model, tmp_path / "m")
    path = tmp_path / "m" / hf.MASKS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        hf.load_masked(transformers.GPT2LMHeadModel, tmp_path / "m")


def test_conv1d_matches_dense_and_unit_granularity():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(7, 5)
    x = torch.randn(3, 4, 5)
    masked = convert(layer, init=0.3)
    assert masked.weight_aux.shape == (7, 5)  # [out, in], as for nn.Linear
    assert torch.allclose(masked(x), layer(x))
    with torch.no_grad():
        masked.weight_aux[2, 1] = -1.0
    w = layer.weight.detach().clone()
    w[1, 2] = 0  # weight is [in, out]
    assert torch.allclose(masked(x), x @ w + layer.bias)
    assert masked.mask().shape == layer.weight.shape and not bool(masked.mask()[1, 2])
    unit = convert(Conv1D(7, 5), granularity="unit", init=0.3)
    assert unit.weight_aux.shape == (7,)
    with torch.no_grad():
        unit.weight_aux[4] = -1.0
    assert torch.count_nonzero(unit(x)[..., 4] - unit.bias[4]) == 0
    assert unit.kept() == 5 * 6


def test_tied_layers_are_not_masked_and_include_says_why():
    model = gpt2()
    assert "lm_head" in {m for mods in tied_weights(model).values() for m in mods}
    with pytest.raises(ValueError, match="tied"):
        convert(model, include=["lm_head"])
    from transformers.pytorch_utils import Conv1D

    convert(model, include=[Conv1D])  # was "no layer matches" before Conv1D support
    assert all(type(m).__name__ == "MaskedConv1D" for _, m in masked_modules(model))


def test_fit_on_dict_dataset_and_default_loss():
    class Tokens(Dataset):
        def __init__(self, n: int) -> None:
            self.ids = torch.randint(0, VOCAB, (n, 10), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = hf.prepare(llama(False))
    trainer = AutoPrune(model, batch_size=4, penalty=1.0, lr_aux=0.05, lr_weight=1e-3)
    history = trainer.fit(Tokens(16), Tokens(8), steps=3)
    assert len(history) == 3 and all(r["weight_loss"] > 0 for r in history)


def test_prepare_rejects_non_hf_model():
    with pytest.raises(TypeError, match="model"):
        hf.prepare(torch.nn.Linear(2, 2))


def test_compile_fullgraph_converted_llama():
    torch.manual_seed(0)
    model = hf.prepare(llama(True)).eval()
    scramble_masks(model)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager)
    assert isinstance(model.model.layers[0].self_attn.q_proj, MaskedLinear)


def test_causal_lm_example_smoke(tmp_path):
    """The README's language-model example end to end on a small generated text (a few steps)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "prune_causal_lm", Path(__file__).resolve().parents[1] / "examples" / "prune_causal_lm.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    words = ["alpha", "beta", "gamma", "delta", "mask", "prune", "weight"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=g))
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "r.json"
    result = example.main(["--text-file", str(tmp_path / "t.txt"), "--dense-steps", "5", "--prune-steps", "5",
                           "--hidden", "32", "--context", "32", "--batch", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == result
    for key in ("ppl_dense", "ppl_dense_same_budget", "ppl_autoprune", "ppl_autoprune_finetuned",
                "ppl_magnitude_oneshot", "ppl_magnitude_finetuned"):
        assert 1.0 < result[key] < 1e4, key
    assert 0.0 < result["density_autoprune"] <= 1.0
    with pytest.raises(SystemExit):
        example.main(["--text-file", str(tmp_path / "missing.txt")])
