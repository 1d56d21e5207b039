"""open_clip's SimpleTokenizer with the same token ids at a fraction of the cost per caption.

In the embed worker the tokenizer is part of the per-sample reader cost
(bench/results/embed_stages.json, `stages_ms_per_sample.tokenize`).
Two things in `SimpleTokenizer.__call__` cost more than the BPE itself on short captions:
- `ftfy.fix_text`, which returns plain text unchanged. Plain here means printable ASCII, tab
  and newline, with no '&': nothing for ftfy to repair (no mojibake, curly quotes, control
  characters, line-break variants or HTML entities), and html.unescape is then a no-op too.
  Checked against ftfy on every such character and 200k random strings; tests/test_tokens.py
  compares whole token tensors. Any other caption goes through open_clip's own cleaning.
- one `torch.tensor` per caption; the rows are filled into one numpy array instead.
And each word's ids are cached: captions repeat their words (Zipf), and a cached word skips
the byte-to-unicode mapping, the BPE lookup and the vocabulary lookups.
Other tokenizers (Hugging Face ones, reduction masks) are used as they are.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import torch
from open_clip import tokenizer as oc

#: printable ASCII, tab and newline, no '&': text ftfy.fix_text and html.unescape leave as is
_PLAIN = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def fast_tokenizer(tokenizer: Any) -> Callable[[Sequence[str]], Any]:
    """A drop-in for `tokenizer(texts)` giving the same LongTensor, or the tokenizer itself."""
    plain_clean = {
        oc._clean_lower: lambda s: oc.whitespace_clean(s).lower(),
        oc._clean_whitespace: oc.whitespace_clean,
        oc._clean_canonicalize: oc.canonicalize_text,
    }
    if (
        type(tokenizer) is not oc.SimpleTokenizer
        or tokenizer.reduction_fn is not None
        or tokenizer.clean_fn not in plain_clean
    ):
        return tokenizer
    return _SimpleTokens(tokenizer, plain_clean[tokenizer.clean_fn])


#: words whose ids `_SimpleTokens` keeps; the cache starts over when full
WORD_CACHE_SIZE = 1 << 17


class _SimpleTokens:
    def __init__(self, tokenizer: Any, plain_clean: Callable[[str], str]):
        self.tok, self.plain_clean = tokenizer, plain_clean
        self.words: dict[str, list[int]] = {}

    def word_ids(self, word: str) -> list[int]:
        """The BPE ids of one word of the cleaned text (as SimpleTokenizer.encode makes them)."""
        tok = self.tok
        token = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
        ids = [tok.encoder[piece] for piece in tok.bpe(token).split(" ")]
        if len(self.words) >= WORD_CACHE_SIZE:
            self.words.clear()
        self.words[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """`SimpleTokenizer.encode`, with basic_clean reduced to strip() for plain text."""
        tok = self.tok
        text = self.plain_clean(text.strip()) if _PLAIN.fullmatch(text) else tok.clean_fn(text)
        ids: list[int] = []
        words = self.words
        for word in tok.pat.findall(text):
            cached = words.get(word)
            ids.extend(cached if cached is not None else self.word_ids(word))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Any:
        texts = [texts] if isinstance(texts, str) else texts
        ctx = context_length or self.tok.context_length
        sot, eot = self.tok.sot_token_id, self.tok.eot_token_id
        out = np.zeros((len(texts), ctx), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [sot, *self.encode(text), eot]
            if len(ids) > ctx:  # truncate, keeping the end-of-text token last (as open_clip does)
                ids = ids[:ctx]
                ids[-1] = eot
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)
