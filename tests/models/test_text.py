"""Tests of the text branch: packaged encoder, tokenisation, and the encoder's modes."""

from __future__ import annotations

import pytest
import torch

from emofed.config import TextModelConfig
from models.errors import UnusableInput
from models.text import TEXT_MODES, TextEncoder, TextPreprocessor, default_encoder_path

_LAYERS = 6  # all-MiniLM-L6-v2


def _make_config(**overrides: object) -> TextModelConfig:
    return TextModelConfig(**{"max_length": 12, **overrides})


def _make_encoder(mode: str = "frozen", **overrides: object) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(_make_config(mode=mode, **overrides), embed_dim=16, dropout=0.1)


def test_default_encoder_path_holds_the_packaged_model() -> None:
    """The packaged MiniLM directory has its config, tokenizer and weights."""
    path = default_encoder_path()
    assert path.name == "model"
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (path / name).is_file(), name


def test_tokenize_shape_and_known_ids() -> None:
    """Texts become (N, max_length) int64 ids and masks; BERT ids are pinned."""
    ids, mask = TextPreprocessor(_make_config())(["hello world", "I am so angry today!"])
    assert ids.shape == mask.shape == (2, 12)
    assert ids.dtype == mask.dtype == torch.int64
    assert ids[0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert mask[0].tolist() == [1] * 4 + [0] * 8
    assert int(ids[0, 4:].abs().sum()) == 0  # padding id 0


def test_long_text_is_truncated() -> None:
    """A long text fills max_length and ends with [SEP]."""
    ids, mask = TextPreprocessor(_make_config())(["word " * 100])
    assert int(mask.sum()) == 12
    assert int(ids[0, -1]) == 102


def test_empty_batch_gives_empty_tensors() -> None:
    """No texts give (0, max_length) tensors."""
    ids, mask = TextPreprocessor(_make_config())([])
    assert ids.shape == mask.shape == (0, 12)


@pytest.mark.parametrize("text", ["", "   \n\t", None, 42])
def test_unusable_text_raises(text: object) -> None:
    """Empty, whitespace-only or non-str texts raise UnusableInput."""
    with pytest.raises(UnusableInput):
        TextPreprocessor(_make_config())(["fine", text])


def test_single_string_is_a_type_error() -> None:
    """A bare str (a sequence of characters) is rejected rather than tokenised per letter."""
    with pytest.raises(TypeError):
        TextPreprocessor(_make_config())("hello")


def test_text_modes_registry() -> None:
    """The four documented modes are registered; unknown ones list them."""
    assert set(TEXT_MODES) == {"frozen", "top", "lora", "full"}
    with pytest.raises(ValueError, match="frozen, top, lora, full"):
        _make_encoder("adapter")


def _trainable(encoder: TextEncoder) -> list[str]:
    return [name for name, p in encoder.encoder.named_parameters() if p.requires_grad]


def test_frozen_mode_stays_in_eval_and_untrainable() -> None:
    """Frozen: no encoder weight trains and the encoder stays in eval mode under train()."""
    encoder = _make_encoder("frozen").train()
    assert _trainable(encoder) == []
    assert encoder.training and not encoder.encoder.training
    assert encoder.proj.weight.requires_grad


@pytest.mark.parametrize("layers", [1, 2])
def test_top_mode_trains_only_the_last_layers(layers: int) -> None:
    """Top: exactly the last ``trainable_layers`` transformer layers train."""
    names = _trainable(_make_encoder("top", trainable_layers=layers))
    trained_layers = {int(name.split(".")[2]) for name in names}
    assert trained_layers == set(range(_LAYERS - layers, _LAYERS))
    assert all(name.startswith("encoder.layer.") for name in names)


@pytest.mark.parametrize("layers", [0, _LAYERS + 1])
def test_top_mode_rejects_out_of_range_layers(layers: int) -> None:
    """trainable_layers outside [1, num_layers] is a ValueError naming the key."""
    with pytest.raises(ValueError, match="trainable_layers"):
        _make_encoder("top", trainable_layers=layers)


def test_lora_mode_trains_only_query_value_adapters() -> None:
    """LoRA: only rank-r adapters on query and value train, two matrices each per layer."""
    encoder = _make_encoder("lora", lora_rank=3)
    names = _trainable(encoder)
    assert len(names) == _LAYERS * 2 * 2
    assert all("lora_" in name and (".query." in name or ".value." in name) for name in names)
    shapes = {tuple(p.shape) for p in encoder.encoder.parameters() if p.requires_grad}
    assert shapes == {(3, 384), (384, 3)}


def test_full_mode_trains_everything() -> None:
    """Full: every encoder weight trains."""
    encoder = _make_encoder("full")
    assert len(_trainable(encoder)) == len(list(encoder.encoder.parameters()))


def test_encoders_do_not_share_weights() -> None:
    """Two encoders built from the cached weights are independent copies."""
    first, second = _make_encoder("full"), _make_encoder("full")
    with torch.no_grad():
        next(first.encoder.parameters()).add_(1.0)
    assert not torch.equal(next(first.encoder.parameters()), next(second.encoder.parameters()))


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_rows_are_encoded_independently(mode: str) -> None:
    """A row's embedding does not depend on its batch, and empty rows stay finite."""
    encoder = _make_encoder(mode).eval()
    ids, mask = TextPreprocessor(_make_config())(["what a lovely day", "leave me alone"])
    empty = torch.zeros_like(ids[:1])
    with torch.no_grad():
        batch = encoder(torch.cat([ids, empty]), torch.cat([mask, empty]))
        alone = encoder(ids[1:], mask[1:])
    assert batch.shape == (3, 16)
    assert torch.isfinite(batch).all()
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


def test_frozen_memo_is_exact() -> None:
    """Memoised frozen-encoder outputs equal a fresh encoder pass, in any batch order."""
    encoder = _make_encoder("frozen").eval()
    ids, mask = TextPreprocessor(_make_config())(["so happy today", "this is awful", "ok then"])
    first = encoder(ids, mask)
    assert len(encoder._memo) == 3
    reordered = encoder(ids[[2, 0, 1]], mask[[2, 0, 1]])
    torch.testing.assert_close(reordered, first[[2, 0, 1]])
    with torch.no_grad():
        fresh = encoder.norm(encoder.proj(encoder._encode(ids, mask.long())))
    torch.testing.assert_close(first, fresh)
