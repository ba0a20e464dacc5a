"""Fixed features, the public feature space and the private heads (models.features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from emofed.config import load_config
from models.features import (
    FeatureHeadsNet,
    HOGFeatures,
    MelStatsFeatures,
    PublicFeatureSpace,
    default_public_space,
    fit_public_space,
)
from models.labels import NUM_CLASSES


def _make_separable(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes separated along a few directions buried in many noisy ones."""
    centres = np.random.default_rng(1234).normal(0, 3.0, (NUM_CLASSES, 4))  # one world for every draw
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    x = rng.normal(0, 1.0, (n, dim))
    x[:, :4] += centres[labels]
    return x, labels


def _make_space(tmp_path: Path) -> tuple[PublicFeatureSpace, np.ndarray, np.ndarray]:
    x, y = _make_separable(700, 40, seed=0)
    present = {m: np.ones(len(y), bool) for m in ("face", "voice", "text")}
    space = fit_public_space(
        {"face": x, "voice": x[:, :20], "text": x[:, :30]}, present, y,
        extractors={"face": "hog", "voice": "mel-stats", "text": "minilm"}, components=6,
        provenance={"source": "test"},
    )
    return space, x, y


def test_lda_projection_keeps_the_class_structure(tmp_path: Path) -> None:
    """On fresh samples, nearest class mean in the 6-d public projection beats chance by far."""
    space, x, y = _make_space(tmp_path)
    z = space.modalities["face"](torch.from_numpy(x.astype(np.float32))).numpy()  # (N, 6)
    assert z.shape == (len(y), 6)
    assert np.allclose(z.std(0), 1.0, atol=1e-3)  # unit variance on the public data
    means = np.stack([z[y == c].mean(0) for c in range(NUM_CLASSES)])
    fresh, fresh_y = _make_separable(400, 40, seed=1)  # same centres, new samples
    fz = space.modalities["face"](torch.from_numpy(fresh.astype(np.float32))).numpy()
    pred = np.argmin(((fz[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == fresh_y).mean() > 0.8


def test_space_round_trips_and_a_broken_file_is_one_clear_error(tmp_path: Path) -> None:
    """Save → load gives the same projection; a truncated or foreign file is a ValueError naming it."""
    space, x, _ = _make_space(tmp_path)
    path = space.save(tmp_path / "space.json")
    again = PublicFeatureSpace.load(path)
    sample = torch.from_numpy(x[:5].astype(np.float32))
    assert torch.allclose(space.modalities["face"](sample), again.modalities["face"](sample), atol=1e-4)
    assert again.provenance == {"source": "test"}
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="not a public feature space"):
        PublicFeatureSpace.load(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format 'something-else'"):
        PublicFeatureSpace.load(path)
    with pytest.raises(FileNotFoundError, match="emofed pretrain"):
        PublicFeatureSpace.load(tmp_path / "missing.json")


def test_packaged_space_matches_the_default_extractors() -> None:
    """The shipped space was fitted on public synthetic people with the default extractors."""
    space = PublicFeatureSpace.load(default_public_space())
    cfg = load_config(None, [])
    assert dict(space.extractors) == {"face": cfg.model.features.face, "voice": cfg.model.features.voice,
                                      "text": cfg.model.features.text}
    assert space.provenance["source"] == "synthetic" and space.provenance["seed"] != cfg.seed


def test_extractor_shapes() -> None:
    """HOG of a 48×48 face is 900 values; mel functionals are 3 per band."""
    hog = HOGFeatures(48)
    assert hog(torch.randn(2, 1, 48, 48)).shape == (2, 900)
    assert MelStatsFeatures(64)(torch.randn(3, 1, 64, 101)).shape == (3, 192)
    with pytest.raises(ValueError, match="multiple of 8"):
        HOGFeatures(50)


def _make_batch(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    face, voice, text = (torch.randn(n, 6, generator=g) for _ in range(3))
    mask = (torch.rand(n, 3, generator=g) > 0.3).float()
    mask[:, 2] = 1.0
    return face, voice, text, torch.zeros(n, 0), mask, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def test_heads_start_at_the_uniform_prediction_and_ignore_absent_modalities() -> None:
    """Zero-initialised heads give uniform logits; an absent modality's input changes nothing."""
    model = FeatureHeadsNet([6, 6, 6])
    face, voice, text, empty, mask, _ = _make_batch(8, 0)
    fused, per_modality = model(face, voice, text, empty, mask)
    assert torch.count_nonzero(fused) == 0 and per_modality.shape == (8, 3, NUM_CLASSES)
    torch.nn.init.normal_(model.face.weight)
    mask[:, 0] = 0
    a, _ = model(face, voice, text, empty, mask)
    b, _ = model(face * 100, voice, text, empty, mask)
    assert torch.equal(a, b)


def test_per_sample_gradients_of_the_fusion_match_autograd() -> None:
    """The registered grad sampler gives each sample's exact gradient (what DP-SGD clips)."""
    model = FeatureHeadsNet([6, 6, 6])
    for linear in (model.face, model.voice, model.text):
        torch.nn.init.normal_(linear.weight)
    assert ModuleValidator.validate(model, strict=True) == []
    face, voice, text, empty, mask, label = _make_batch(5, 1)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    fused, _ = wrapped(face, voice, text, empty, mask)
    torch.nn.functional.cross_entropy(fused, label, reduction="sum").backward()
    for i in range(5):
        single = FeatureHeadsNet([6, 6, 6])
        single.load_state_dict(model.state_dict())
        out, _ = single(face[i : i + 1], voice[i : i + 1], text[i : i + 1], empty[i : i + 1], mask[i : i + 1])
        torch.nn.functional.cross_entropy(out, label[i : i + 1]).backward()
        for name, p in single.named_parameters():
            assert torch.allclose(p.grad, dict(model.named_parameters())[name].grad_sample[i], atol=1e-5), name


def test_logits_outside_the_corpus_label_set_are_off() -> None:
    """A 5-class corpus is scored over its 5 classes: the other two are never predicted."""
    labels = ["neutral", "happy", "sad", "angry", "fearful"]
    model = FeatureHeadsNet([6, 6, 6], labels)
    for linear in (model.face, model.voice, model.text):
        torch.nn.init.normal_(linear.weight, std=5.0)
    face, voice, text, empty, mask, _ = _make_batch(200, 3)
    fused, _ = model(face, voice, text, empty, mask)
    assert set(fused.argmax(1).tolist()) <= {0, 1, 2, 3, 4}
    assert torch.isfinite(torch.nn.functional.cross_entropy(fused, torch.zeros(200, dtype=torch.long)))
    assert "allowed" not in model.state_dict()  # a fixed buffer: never saved, never sent


def test_model_labels_are_checked_at_the_edge() -> None:
    """An unknown emotion or a single-class set is one ConfigError naming the key."""
    from emofed.config import ConfigError

    assert load_config(None, ["model.labels=[happy,sad]"]).model.labels == ["happy", "sad"]
    with pytest.raises(ConfigError, match="'model.labels' must name only neutral, happy"):
        load_config(None, ["model.labels=[happy,bored]"])
    with pytest.raises(ConfigError, match="at least two emotions"):
        load_config(None, ["model.labels=[happy]"])


def test_a_space_of_other_feature_sizes_is_refused(tmp_path: Path) -> None:
    """A space fitted under other settings (face size, mels, encoder) is one clear error, not a crash later."""
    from models.features import FeatureExtractor

    space, _, _ = _make_space(tmp_path)  # fitted on 40/20/30-dimensional features
    path = space.save(tmp_path / "small.json")
    cfg = load_config(None, [f"model.features.public={path}"])
    with pytest.raises(ValueError, match="fitted on feature sizes"):
        FeatureExtractor(cfg.model)


def test_a_space_fitted_on_the_run_s_own_folder_is_refused(tmp_path: Path) -> None:
    """Public means not the devices': a space whose provenance is the run's data folder stops the run."""
    from emofed.config import ConfigError
    from models.features import check_public_space

    folder = tmp_path / "fed"
    folder.mkdir()
    (folder / "federation.json").write_text('{"format": "emofed-federation/1"}')
    space, _, _ = _make_space(tmp_path)
    own = PublicFeatureSpace(space.extractors, space.modalities, {"source": "folder", "path": str(folder.resolve())})
    path = own.save(tmp_path / "own.json")
    cfg = load_config(None, ["data.source=folder", f"data.path={folder}", f"model.features.public={path}"])
    with pytest.raises(ConfigError, match="the run's own device data"):
        check_public_space(cfg)
