"""Tests of the multimodal network, its loss, and weight exchange; DP-SGD over every config."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from client.dp import DPSGDSettings, plan_dp_sgd, private_training
from emofed.config import FusionConfig, ModelConfig, TextModelConfig, VoiceModelConfig
from models.fusion import FUSIONS, MODALITIES, build_model, emotion_loss
from models.labels import NUM_CLASSES
from models.state import get_state, set_state, shared_state_keys
from models.text import TEXT_MODES

_LENGTH = 8  # tokens
_CLIP = 0.5  # seconds → 51 frames


def _make_config(
    fusion: str = "gated", mode: str = "frozen", **fusion_overrides: object
) -> ModelConfig:
    return ModelConfig(
        kind="cnn",
        embed_dim=16,
        voice=VoiceModelConfig(clip_seconds=_CLIP, width=8),
        text=TextModelConfig(mode=mode, max_length=_LENGTH),
        fusion=FusionConfig(kind=fusion, **fusion_overrides),
    )


def _make_model(fusion: str = "gated", mode: str = "frozen", **fusion_overrides: object):
    torch.manual_seed(0)
    return build_model(_make_config(fusion, mode, **fusion_overrides), device="cpu")


def _make_batch(batch: int = 4, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs; row i has modality mask pattern i of (all, face, voice, text, none...)."""
    generator = torch.Generator().manual_seed(seed)
    face = torch.randn(batch, 1, 48, 48, generator=generator)
    voice = torch.randn(batch, 1, 64, 51, generator=generator)
    ids = torch.randint(1000, 5000, (batch, _LENGTH), generator=generator)
    ids[:, 0] = 101
    text_mask = torch.ones(batch, _LENGTH, dtype=torch.long)
    patterns = [[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]]
    modality_mask = torch.tensor(
        [patterns[i % len(patterns)] for i in range(batch)], dtype=torch.float32
    )
    # Absent inputs are zeros, as the preprocessor makes them.
    face[modality_mask[:, 0] == 0] = 0
    voice[modality_mask[:, 1] == 0] = 0
    ids[modality_mask[:, 2] == 0] = 0
    text_mask[modality_mask[:, 2] == 0] = 0
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return face, voice, ids, text_mask, modality_mask, labels


_ALL_CONFIGS = list(itertools.product(FUSIONS, TEXT_MODES))


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_output_shapes(fusion: str) -> None:
    """Fused logits are (B, 7) and per-modality logits (B, 3, 7), zero where absent."""
    model = _make_model(fusion).eval()
    *inputs, _ = _make_batch(6)
    with torch.no_grad():
        fused, per_modality = model(*inputs)
    assert fused.shape == (6, NUM_CLASSES)
    assert per_modality.shape == (6, len(MODALITIES), NUM_CLASSES)
    absent = inputs[-1] == 0
    assert torch.count_nonzero(per_modality[absent]) == 0
    assert torch.count_nonzero(per_modality[~absent]) > 0


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("modality", range(len(MODALITIES)))
def test_masked_modality_input_does_not_change_output(fusion: str, modality: int) -> None:
    """Changing the input of a masked-out modality leaves the fused output unchanged (eval)."""
    model = _make_model(fusion).eval()
    face, voice, ids, text_mask, modality_mask, _ = _make_batch(4)
    modality_mask[:, modality] = 0
    altered = [face.clone(), voice.clone(), ids.clone(), text_mask.clone()]
    if modality == 2:
        altered[2] = torch.randint(1000, 5000, ids.shape)
        altered[3] = torch.ones_like(text_mask)
    else:
        altered[modality] = torch.randn_like(altered[modality]) * 5
    with torch.no_grad():
        before, _ = model(face, voice, ids, text_mask, modality_mask)
        after, _ = model(*altered, modality_mask)
        unmasked, _ = model(*altered, torch.ones_like(modality_mask))
    assert torch.equal(before, after)
    assert not torch.allclose(after, unmasked)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_all_masked_row_returns_head_bias(fusion: str) -> None:
    """A row with no modality gives finite logits equal to the head's bias."""
    model = _make_model(fusion).eval()
    face, voice, ids, text_mask, modality_mask, _ = _make_batch(3)
    modality_mask[1] = 0
    with torch.no_grad():
        fused, per_modality = model(face, voice, ids, text_mask, modality_mask)
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused[1], model.head.bias)
    assert torch.count_nonzero(per_modality[1]) == 0


def test_bool_and_float_masks_agree() -> None:
    """A bool modality mask and its float version give one output."""
    model = _make_model().eval()
    *inputs, modality_mask, _ = _make_batch(4)
    with torch.no_grad():
        as_float, _ = model(*inputs, modality_mask)
        as_bool, _ = model(*inputs, modality_mask.bool())
    assert torch.equal(as_float, as_bool)


def test_modality_dropout_never_hides_every_present_modality() -> None:
    """Training-time dropout hides only present modalities and keeps one per non-empty row."""
    model = _make_model(modality_dropout=0.9).train()
    torch.manual_seed(1)
    mask = torch.rand(2000, 3) < 0.6
    kept = model._drop_modalities(mask)
    assert not (kept & ~mask).any()
    assert torch.equal(kept.any(dim=1), mask.any(dim=1))
    single = mask.sum(dim=1) == 1
    assert torch.equal(kept[single], mask[single])
    # With p = 0.9 about half of the present modalities are hidden (the rest rescued).
    hidden = (mask & ~kept).sum().item() / mask.sum().item()
    assert 0.3 < hidden < 0.7


def test_emotion_loss_matches_per_sample_formula() -> None:
    """The loss is the batch mean of CE(fused) + w * mean CE over present modalities."""
    generator = torch.Generator().manual_seed(0)
    fused = torch.randn(3, NUM_CLASSES, generator=generator)
    per_modality = torch.randn(3, 3, NUM_CLASSES, generator=generator)
    mask = torch.tensor([[1, 1, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.float32)
    labels = torch.tensor([0, 4, 6])
    expected = []
    for i in range(3):
        ce = torch.nn.functional.cross_entropy
        aux = [ce(per_modality[i, m], labels[i]) for m in range(3) if mask[i, m]]
        expected.append(ce(fused[i], labels[i]) + 0.3 * (sum(aux) / len(aux) if aux else 0))
    loss = emotion_loss(fused, per_modality, mask, labels, 0.3)
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    # Absent modalities' logits do not matter.
    per_modality[2] = 100.0
    per_modality[1, 0] = -100.0
    assert emotion_loss(fused, per_modality, mask, labels, 0.3).item() == pytest.approx(loss.item())


def test_emotion_loss_empty_batch_is_zero() -> None:
    """An empty batch (possible under Poisson sampling) gives loss 0, not NaN."""
    fused = torch.zeros(0, NUM_CLASSES, requires_grad=True)
    loss = emotion_loss(
        fused,
        torch.zeros(0, 3, NUM_CLASSES),
        torch.zeros(0, 3),
        torch.zeros(0, dtype=torch.long),
        0.3,
    )
    assert loss.item() == 0.0
    loss.backward()
    assert fused.grad is not None


# Voice-stem conv biases the GroupNorm after them cancels: they get no gradient, only DP noise.
_DEAD_VOICE_BIASES = ("voice.body.features.0.bias", "voice.body.features.3.bias")


@pytest.mark.parametrize(("fusion", "mode"), [c for c in _ALL_CONFIGS if c[1] != "lora"])
def test_opacus_validates_and_one_dp_step_updates_weights(fusion: str, mode: str) -> None:
    """Opacus accepts every config; one noiseless step of the device's DP-SGD path moves all trainable, no frozen weights.

    Noise is off (σ = 0), so a weight moves only if its clipped per-sample gradients reach it:
    a weight Opacus cannot see, or one cut off from the loss, fails this test.
    """
    model = _make_model(fusion, mode).train()
    assert ModuleValidator.validate(model, strict=True) == []
    trainable = shared_state_keys(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loader = DataLoader(TensorDataset(*_make_batch(6, seed=1)), batch_size=6)
    settings = DPSGDSettings(plan=plan_dp_sgd(6, batch_size=6, local_epochs=1), noise_multiplier=0.0, max_grad_norm=1.0)
    with private_training(model, optimizer, loader, settings=settings, seed=0) as (private_model, private_optimizer, _):
        # q = 1: Poisson sampling would draw each row with probability 1; use the whole batch.
        *inputs, labels = _make_batch(6, seed=1)
        fused, per_modality = private_model(*inputs)
        loss = emotion_loss(fused, per_modality, inputs[-1], labels, 0.3)
        private_optimizer.zero_grad()
        loss.backward()
        private_optimizer.step()
    after = dict(model.named_parameters())
    unchanged = [name for name in trainable if torch.equal(before[name], after[name])]
    # Structurally zero at this step: LoRA's A matrices (B starts at zero, Hu et al. 2021,
    # §4.1) and the biases of the voice stem's convolutions, which GroupNorm cancels.
    expected = {name for name in trainable if ".lora_A." in name} | set(_DEAD_VOICE_BIASES)
    assert set(unchanged) <= expected, f"no gradient reaches {sorted(set(unchanged) - expected)}"
    frozen = [name for name, p in after.items() if not p.requires_grad]
    assert all(torch.equal(before[name], after[name]) for name in frozen)
    if mode != "full":
        assert any(name.startswith("text.encoder.") for name in frozen)


@pytest.mark.parametrize("mode", list(TEXT_MODES))
def test_shared_keys_exclude_frozen_encoder_weights(mode: str) -> None:
    """Only trainable weights travel: none of a frozen encoder, only adapters under LoRA."""
    model = _make_model(mode=mode)
    keys = shared_state_keys(model)
    encoder_keys = [k for k in keys if k.startswith("text.encoder.")]
    if mode == "frozen":
        assert encoder_keys == []
    elif mode == "lora":
        assert encoder_keys and all("lora_" in k for k in encoder_keys)
    assert "head.weight" in keys and "face.body.proj.weight" in keys
    assert len(keys) == sum(p.requires_grad for p in model.parameters())
    personal = shared_state_keys(model, exclude=("head",))
    assert set(keys) - set(personal) == {"head.weight", "head.bias"}


def test_get_set_state_round_trip() -> None:
    """Weights copied out of one model and into another make the two agree."""
    source, target = _make_model(), _make_model()
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.01)
    arrays = get_state(source)
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    set_state(target, arrays)
    *inputs, _ = _make_batch(4)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(*inputs)[0], target(*inputs)[0])
    arrays["head.bias"][:] = 7.0  # a copy: the model must not change
    assert not torch.equal(source.head.bias, torch.full_like(source.head.bias, 7.0))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(
            lambda a: a.update({"head.bias": np.zeros(3, np.float32)}), "head.bias", id="shape"
        ),
        pytest.param(lambda a: a.pop("head.weight"), "head.weight", id="missing"),
        pytest.param(lambda a: a.update({"head.extra": np.zeros(1)}), "head.extra", id="unknown"),
        pytest.param(
            lambda a: a.update({"head.bias": np.full(NUM_CLASSES, np.nan, np.float32)}),
            "head.bias",
            id="nan",
        ),
    ],
)
def test_set_state_rejects_bad_arrays_atomically(edit, message: str) -> None:
    """A bad array raises ValueError naming its key, and no weight changes."""
    model = _make_model()
    arrays = {k: v + 1.0 for k, v in get_state(model).items()}
    edit(arrays)
    before = get_state(model)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        set_state(model, arrays)
    after = get_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_get_state_unknown_key_raises() -> None:
    """Asking for a weight the model lacks is a ValueError naming it."""
    with pytest.raises(ValueError, match="nope"):
        get_state(_make_model(), ["nope"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dataclasses.replace(_make_config(), fusion=FusionConfig(kind="attention")), "gated, mean"),
        (
            dataclasses.replace(_make_config(), fusion=FusionConfig(modality_dropout=1.0)),
            "modality_dropout",
        ),
    ],
)
def test_build_model_rejects_bad_config(config: ModelConfig, message: str) -> None:
    """Unknown fusions list the known ones; out-of-range values name their key."""
    with pytest.raises(ValueError, match=message):
        build_model(config, device="cpu")


def test_embed_then_classify_equals_forward() -> None:
    """Forward is exactly classify(embed(...)), which evaluation uses per modality mask."""
    model = _make_model().eval()
    face, voice, ids, attn, mask = _make_batch()[:5]
    fused, per_modality = model(face, voice, ids, attn, mask)
    fused2, per_modality2 = model.classify(model.embed(face, voice, ids, attn), mask)
    torch.testing.assert_close(fused, fused2)
    torch.testing.assert_close(per_modality, per_modality2)
