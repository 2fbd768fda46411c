"""Regenerates the embedded default tokenizer under sdjax/assets/tokenizer/.

Input: OpenAI CLIP's BPE vocabulary `clip/bpe_simple_vocab_16e6.txt.gz` (MIT licence), taken
from the `openai-clip` sdist on PyPI without installing the package:

    pip download --no-deps --no-binary :all: openai-clip -d /tmp/clip
    tar xzf /tmp/clip/openai-clip-*.tar.gz -C /tmp/clip --wildcards '*/bpe_simple_vocab_16e6.txt.gz'
    python experiments/make_tokenizer_assets.py --bpe=/tmp/clip/openai-clip-1.0.1/clip/bpe_simple_vocab_16e6.txt.gz

Output: `vocab.json` + `merges.txt` in the layout `transformers.CLIPTokenizer` reads, plus the
tokenizer config of SD 1.x's `tokenizer/` folder (pads with <|endoftext|>) and a LICENSE note.
The vocabulary is built as OpenAI's `SimpleTokenizer` builds it: the 256 byte symbols, the
same with the end-of-word marker `</w>`, one token per merge, then the two special tokens.
"""

from __future__ import annotations

import gzip
import json
import pathlib

from absl import app, flags

_BPE = flags.DEFINE_string("bpe", None, "path to bpe_simple_vocab_16e6.txt.gz", required=True)
_OUT = flags.DEFINE_string(
    "out",
    str(pathlib.Path(__file__).resolve().parent.parent / "sdjax" / "assets" / "tokenizer"),
    "output folder",
)

NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's SimpleTokenizer: 48894 merges, 49408 tokens
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

LICENSE = """\
The files vocab.json and merges.txt in this folder are derived from the byte-pair-encoding
vocabulary `bpe_simple_vocab_16e6.txt.gz` of OpenAI's CLIP (https://github.com/openai/CLIP),
as shipped in the `openai-clip` package on PyPI, and are distributed under its licence:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

Regenerate with experiments/make_tokenizer_assets.py.
"""

# SD 1.x's tokenizer/tokenizer_config.json, reduced to what CLIPTokenizer reads.
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
    "add_prefix_space": False,
    "errors": "replace",
}


def bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in the order CLIP's vocab uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build(bpe_gz: pathlib.Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} does not look like CLIP's BPE vocabulary")
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 distinct tokens, got {len(vocab)}")
    return vocab, merges


def main(argv):
    del argv
    vocab, merges = build(pathlib.Path(_BPE.value))
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "LICENSE").write_text(LICENSE)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    app.run(main)
