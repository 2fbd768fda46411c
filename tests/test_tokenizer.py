"""The embedded default tokenizer and checkpoint tokenizers: ids, padding, truncation."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from sdjax.tokenizer import DEFAULT_FOLDER, Tokenizer, load_tokenizer

BOS, EOS = 49406, 49407

# Ids from OpenAI CLIP's own SimpleTokenizer (the reference SD's tokenizer reproduces).
GOLDEN = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "An astronaut riding a horse, 4k, trending on ArtStation!! café": [
        *[BOS, 550, 18376, 6765, 320, 4558, 267, 275, 330, 267, 6087, 525, 1486, 2631],
        *[748, 15304, EOS],
    ],
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def test_embedded_tokenizer_golden_ids(tok):
    prompts = list(GOLDEN)
    ids, truncations = tok.tokenize(prompts)
    assert ids.dtype == np.int32 and ids.shape == (len(prompts), 77)
    assert truncations == ()
    for row, want in zip(ids, GOLDEN.values(), strict=True):
        assert list(row[: len(want)]) == want
        assert (row[len(want) :] == EOS).all()  # SD 1.x pads with <|endoftext|>


def test_embedded_vocabulary_size(tok):
    assert len(tok.hf) == 49408
    assert tok.max_length == 77 and tok.pad_token_id == EOS


def test_matches_hf_padding_and_truncation(tok):
    prompts = ["", "x", "a dog " * 60, "UPPER case, punctuation!? 123"]
    ids, _ = tok.tokenize(prompts)
    want = tok.hf(prompts, padding="max_length", truncation=True, max_length=77).input_ids
    np.testing.assert_array_equal(ids, np.asarray(want, np.int32))


def test_truncation_is_warned_and_returned(tok, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(100))
    with caplog.at_level(logging.WARNING, logger="sdjax.tokenizer"):
        ids, truncations = tok.tokenize(["short", long_prompt])
    assert ids.shape == (2, 77) and ids[1, -1] == EOS
    (t,) = truncations
    assert t.index == 1 and t.prompt == long_prompt
    assert t.num_dropped_tokens == len(tok.hf(long_prompt, verbose=False).input_ids) - 77
    # `dropped` is the prompt's own text from the first token cut off (here mid-number:
    # CLIP's BPE splits digits), and the rest is exactly what fits.
    assert long_prompt.endswith(t.dropped) and t.dropped.endswith("word99")
    kept = long_prompt[: -len(t.dropped)]
    assert len(tok.hf(kept).input_ids) == 77
    (record,) = [r for r in caplog.records if r.name == "sdjax.tokenizer"]
    assert "word99" in record.getMessage() and "prompt 1" in record.getMessage()


def test_checkpoint_pad_token_is_respected(tmp_path):
    """SD 2.x's tokenizer pads with '!' (id 0), not <|endoftext|>."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(DEFAULT_FOLDER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))
    tok = load_tokenizer(tmp_path)
    ids, _ = tok.tokenize("a photo of a cat")
    assert list(ids[0, :8]) == [*GOLDEN["a photo of a cat"], 0]
    assert (ids[0, 7:] == 0).all()


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)
