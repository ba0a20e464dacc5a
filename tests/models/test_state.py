"""Named weight views: which weights are shared, and loading a subset (personal layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import get_state, set_state, shared_state_keys


class _Net(nn.Module):
    """A body, a head, a module whose name starts with "head", and per-modality heads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.header = nn.Linear(3, 2)
        self.aux_heads = nn.ModuleList(nn.Linear(3, 2) for _ in range(2))


def _make_net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    return _Net()


def test_excluding_personal_modules_drops_exactly_their_weights() -> None:
    """Excluding head and aux_heads keeps the body and a module merely named like the head."""
    net = _make_net()
    shared = shared_state_keys(net, exclude=("head", "aux_heads"))
    assert shared == ["body.weight", "body.bias", "header.weight", "header.bias"]
    personal = [k for k in shared_state_keys(net) if k not in shared]
    assert personal == [
        "head.weight", "head.bias",
        "aux_heads.0.weight", "aux_heads.0.bias", "aux_heads.1.weight", "aux_heads.1.bias",
    ]


def test_loading_a_subset_changes_only_those_weights() -> None:
    """set_state with keys= loads the personal subset and leaves every other weight alone."""
    net, other = _make_net(0), _make_net(1)
    keys = ["head.weight", "head.bias"]
    before = get_state(net)
    set_state(net, get_state(other, keys), keys=keys)
    after = get_state(net)
    for key in after:
        source = get_state(other, [key])[key] if key in keys else before[key]
        assert np.array_equal(after[key], source), key


def test_subset_load_refuses_a_missing_or_extra_key() -> None:
    """A subset load is all or nothing: a missing or unexpected key changes no weight."""
    net, other = _make_net(0), _make_net(1)
    before = get_state(net)
    arrays = get_state(other, ["head.weight"])
    with pytest.raises(ValueError, match="Missing state key 'head.bias'"):
        set_state(net, arrays, keys=["head.weight", "head.bias"])
    with pytest.raises(ValueError, match="Unexpected state key 'body.bias'"):
        set_state(net, {**arrays, "body.bias": np.zeros(3, np.float32)}, keys=["head.weight"])
    assert all(np.array_equal(before[k], v) for k, v in get_state(net).items())
