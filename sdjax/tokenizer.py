"""Prompt tokenization: `transformers.CLIPTokenizer` padded/truncated to the text encoder's length.

A checkpoint brings its own `tokenizer/` folder, and its config decides the padding token
(SD 1.x pads with <|endoftext|> = 49407, SD 2.x with "!" = 0). Without a checkpoint, the
embedded copy of OpenAI CLIP's vocabulary under `sdjax/assets/tokenizer/` (SD 1.x config)
is used; `experiments/make_tokenizer_assets.py` regenerates it.

    tok = Tokenizer.from_folder(checkpoint / "tokenizer")   # or Tokenizer.default()
    ids, truncations = tok.tokenize(["a photo of a cat"])   # ids: int32 [1, 77]

A prompt longer than the encoder's window is cut (as diffusers does); each cut is logged as a
warning naming the prompt and the dropped text, and returned in `truncations`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = pathlib.Path(__file__).resolve().parent / "assets" / "tokenizer"
CLIP_MAX_LENGTH = 77


@dataclasses.dataclass(frozen=True)
class Truncation:
    """One prompt that did not fit: `dropped` is the decoded text of the tokens cut off."""

    index: int
    prompt: str
    dropped: str
    num_dropped_tokens: int


class Tokens(NamedTuple):
    ids: np.ndarray  # int32 [N, max_length]
    truncations: tuple[Truncation, ...]


class Tokenizer:
    """A CLIP BPE tokenizer that always returns int32 [N, max_length]."""

    def __init__(self, hf_tokenizer, *, max_length: int | None = None):
        self.hf = hf_tokenizer
        if max_length is None:
            model_max = getattr(hf_tokenizer, "model_max_length", None)
            # transformers uses a huge sentinel when the config sets no model_max_length.
            max_length = model_max if model_max and model_max <= 4096 else CLIP_MAX_LENGTH
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS; got {max_length}")
        self.max_length = int(max_length)

    @classmethod
    def from_folder(cls, folder: os.PathLike | str, *, max_length: int | None = None) -> Tokenizer:
        """Loads a checkpoint's `tokenizer/` folder (vocab.json, merges.txt, configs)."""
        from transformers import CLIPTokenizer

        folder = pathlib.Path(folder)
        has_bpe = (folder / "vocab.json").exists() and (folder / "merges.txt").exists()
        if not has_bpe and not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json) in {folder}"
            )
        return cls(CLIPTokenizer.from_pretrained(str(folder)), max_length=max_length)

    @classmethod
    def default(cls, *, max_length: int | None = None) -> Tokenizer:
        """The embedded OpenAI CLIP vocabulary with SD 1.x's config (pads with <|endoftext|>)."""
        return cls.from_folder(DEFAULT_FOLDER, max_length=max_length)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    def tokenize(self, prompts: str | Sequence[str]) -> Tokens:
        """prompts -> Tokens(ids int32 [N, max_length], truncations)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        # verbose=False: we report truncation ourselves, with the dropped text.
        fast = bool(getattr(self.hf, "is_fast", False))
        encoded = self.hf(
            prompts, padding=False, truncation=False, verbose=False, return_offsets_mapping=fast
        )
        full = encoded.input_ids
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        truncations = []
        for i, (prompt, seq) in enumerate(zip(prompts, full, strict=True)):
            if len(seq) > self.max_length:
                # Keep BOS + the first max_length - 2 tokens + EOS, as the HF tokenizer does.
                tail = seq[self.max_length - 1 : -1]
                if fast:  # the prompt's own text from the first dropped token on
                    dropped = prompt[encoded.offset_mapping[i][self.max_length - 1][0] :]
                else:
                    dropped = self.hf.decode(tail, skip_special_tokens=True)
                truncations.append(Truncation(i, prompt, dropped, len(tail)))
                logger.warning(
                    "prompt %d is longer than %d tokens; %d tokens were dropped: %r (prompt: %r)",
                    i,
                    self.max_length,
                    len(tail),
                    dropped,
                    prompt,
                )
                seq = seq[: self.max_length - 1] + seq[-1:]
            ids[i, : len(seq)] = seq
        return Tokens(ids, tuple(truncations))

    def __call__(self, prompts: str | Sequence[str]) -> Tokens:
        return self.tokenize(prompts)


def load_tokenizer(
    checkpoint: os.PathLike | str | None = None, *, max_length: int | None = None
) -> Tokenizer:
    """The tokenizer of a diffusers-layout checkpoint folder, or the embedded default if None."""
    if checkpoint is None:
        return Tokenizer.default(max_length=max_length)
    return Tokenizer.from_folder(pathlib.Path(checkpoint) / "tokenizer", max_length=max_length)
