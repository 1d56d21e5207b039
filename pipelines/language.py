"""Caption language with CLD3, as LAION-5B split its pairs into English,
multilingual and no-language.

`detect_languages(rows)` fills `language` (a CLD3 code such as `en`, `de`, `zh`, or `und`
when CLD3 cannot tell reliably) and `language_score` (CLD3's probability for its top language)
for every row with a caption; rows without one keep NULLs. The `cld3-py` wheel ships CLD3's
model, so this works offline. `curation.filters` turns the split into presets
(`english`, `multilingual`, `nolang`).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import gcld3

from collection import schema as S

#: CLD3 reads at most this many bytes of a caption (LAION's setting); longer alt-texts are cut
MAX_BYTES = 1000

_local = threading.local()


def _detector() -> Any:
    """One CLD3 model per thread (its C++ object keeps per-call scratch state)."""
    det = getattr(_local, "detector", None)
    if det is None:
        det = _local.detector = gcld3.NNetLanguageIdentifier(
            min_num_bytes=0, max_num_bytes=MAX_BYTES
        )
    return det


def detect(text: str) -> tuple[str, float]:
    """(language code or `und`, probability) of one text; `und` when CLD3's result is unreliable."""
    result = _detector().FindLanguage(text=text)
    language = (
        result.language
        if result.is_reliable and result.language != "und"
        else S.LANGUAGE_UNDETERMINED
    )
    return language, float(result.probability)


def detect_languages(rows: Sequence[dict[str, Any]]) -> None:
    """Fill `language` and `language_score` of each row whose caption is a non-empty string."""
    for row in rows:
        caption = row.get(S.CAPTION)
        if isinstance(caption, str) and caption.strip():
            row[S.LANGUAGE], row[S.LANGUAGE_SCORE] = detect(caption)
