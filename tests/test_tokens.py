"""The worker's tokenizer gives open_clip's token ids for every kind of caption."""

import pytest
import torch

from models.scenes import iter_samples
from models.tokens import fast_tokenizer

TRICKY = [
    "",
    "   ",
    "A Red CIRCLE  on\ta blue\nbackground ",
    "fish &amp; chips",
    "R&D",
    "&lt;b&gt;bold",
    "<b>bold</b> & more",
    "caf\u00e9 na\u00efve",
    "cafÃ© mojibake",
    "\u201ccurly quotes\u201d",
    "line\r\nbreaks\rhere",
    "bell\x07char",
    "esc \x1b[31mred",
    "ligature \ufb01ne",
    "\u00a0nbsp",
    "emoji \U0001f600 ok",
    "fullwidth \uff21\uff22",
    "don't it's we're I'm you'll he'd",
    "numbers 12345 and 3.14",
    "x" * 500,
    " ".join(["word"] * 100),
    "!!!???...",
    "\u65e5\u672c\u8a9e",
]


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
@pytest.mark.parametrize("context", [20, 77])
def test_same_ids_as_open_clip(clean, context):
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context, clean=clean)
    fast = fast_tokenizer(tok)
    assert fast is not tok  # the fast path is taken for these
    captions = [s.caption for s in iter_samples(200, size=16)] + TRICKY
    assert torch.equal(fast(captions), tok(captions))
    assert torch.equal(fast(TRICKY[2]), tok(TRICKY[2]))


def test_other_tokenizers_are_used_as_they_are():
    from open_clip.tokenizer import SimpleTokenizer

    masked = SimpleTokenizer(reduction_mask="simple")
    assert fast_tokenizer(masked) is masked
    plain = object()
    assert fast_tokenizer(plain) is plain


def test_word_cache_gives_the_same_ids_when_warm_and_when_it_starts_over(monkeypatch):
    from open_clip.tokenizer import SimpleTokenizer

    from models import tokens

    tok = SimpleTokenizer()
    fast = fast_tokenizer(tok)
    captions = [s.caption for s in iter_samples(300, size=16)] + TRICKY
    cold = fast(captions)
    assert fast.words  # words were cached
    assert torch.equal(fast(captions), cold)  # served from the cache
    monkeypatch.setattr(tokens, "WORD_CACHE_SIZE", 5)
    fresh = fast_tokenizer(tok)
    assert torch.equal(fresh(captions), tok(captions))
    assert len(fresh.words) <= 5
