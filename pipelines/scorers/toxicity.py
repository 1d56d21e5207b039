"""`ptoxic`: caption toxicity. Detoxify when it is installed and its weights load; otherwise
(always, offline) a built-in lexicon scorer.

The lexicon (`toxic_words.tsv` beside this file, term + weight) is matched after
normalisation that undoes common obfuscations: case, leetspeak (`sh1t`, `@ss`, `$hit`),
letters stretched by repetition (`fuuuck`), masking symbols inside a word (`f*ck`, `f**k`,
`b!tch` — a masked letter matches any letter), and separators between letters (`f.u.c.k`,
`f u c k`). Matching is on word boundaries, so `class` or `Scunthorpe` are not toxic. An
item's score is `1 - prod(1 - w)` over distinct matched terms: one strong term gives its
weight, several mild ones add up; no match gives 0.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from collection.schema import PTOXIC

log = logging.getLogger(__name__)
LEXICON_PATH = Path(__file__).with_name("toxic_words.tsv")
LEET = str.maketrans(
    {
        "0": "o",
        "1": "i",
        "3": "e",
        "4": "a",
        "5": "s",
        "7": "t",
        "8": "b",
        "@": "a",
        "$": "s",
        "!": "i",
        "|": "l",
        "+": "t",
        "9": "g",
    }
)
MASK = set("*#%^~?_")
# leetspeak undone inside masked tokens ("!" stays a mask there: f!ck, sh!t)
LEET_MASKED = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "@": "a", "$": "s", "!": "*"}
_TOKEN = re.compile(r"[a-z0-9@$!|+*#%^~?_]+(?:['’][a-z]+)?")


@lru_cache(maxsize=4)
def load_lexicon(
    path: str | Path = LEXICON_PATH,
) -> tuple[dict[tuple[str, ...], float], dict[str, float]]:
    """(phrases/whole words -> weight, stems -> weight) from a term<TAB>weight file."""
    words: dict[tuple[str, ...], float] = {}
    stems: dict[str, float] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            term, weight_text = line.split("\t")
            weight = float(weight_text)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: expected 'term<TAB>weight', got {line!r}") from exc
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"{path}:{lineno}: weight must be in (0, 1], got {weight}")
        if term.endswith("*"):
            stems[term[:-1].lower()] = weight
        else:
            words[tuple(term.lower().split())] = weight
    return words, stems


def _squeeze(word: str) -> str:
    """Collapse runs of 3+ equal letters to 2 (fuuuck -> fuuck; 'ass', 'piss' survive)."""
    return re.sub(r"(.)\1{2,}", r"\1\1", word)


def _variants(token: str) -> set[str]:
    """Plausible plain spellings of one token: leet undone, stretching collapsed."""
    plain = token.translate(LEET) if not any(c in MASK for c in token) else token
    out = {token, plain, _squeeze(plain), re.sub(r"(.)\1+", r"\1", plain)}
    return {v.strip("'’") for v in out if v}


def _joined_spellings(text: str) -> str:
    """Join letters separated by dots, dashes or single spaces (f.u.c.k, f u c k -> fuck)."""
    return re.sub(
        r"\b(?:[a-z0-9@$*!][.\-_ ]){2,}[a-z0-9@$*!]\b",
        lambda m: re.sub(r"[.\-_ ]", "", m.group(0)),
        text,
    )


class LexiconToxicity:
    """Word-list scorer robust to common obfuscations; pure Python, no model."""

    def __init__(self, path: str | Path = LEXICON_PATH) -> None:
        self.words, self.stems = load_lexicon(str(path))
        self._max_len = max((len(k) for k in self.words), default=1)
        self._single = [w[0] for w in self.words if len(w) == 1]

    def _masked_match(self, token: str) -> float:
        """A token with masking symbols (f*ck): each masked letter stands for any letter."""
        core = token.strip("'’")
        plain = core.translate(str.maketrans({k: v for k, v in LEET_MASKED.items()}))
        pattern = "".join("[a-z]" if c in MASK else re.escape(c) for c in plain)
        if not re.search("[a-z]", pattern.replace("[a-z]", "")):
            return 0.0  # all symbols (e.g. '***'): nothing to go on
        best = 0.0
        rx = re.compile(pattern)
        for word in self._single:
            if rx.fullmatch(word):
                best = max(best, self.words[(word,)])
        for stem, weight in self.stems.items():
            if rx.match(stem) and len(core) >= len(stem):
                best = max(best, weight)
        return best

    def matches(self, text: str) -> dict[str, float]:
        """Matched lexicon terms (normalised) -> weight for one caption."""
        text = _joined_spellings(text.lower())
        tokens = _TOKEN.findall(text)
        found: dict[str, float] = {}
        variants = [_variants(t) for t in tokens]
        for i, token in enumerate(tokens):
            if any(c in MASK for c in token.strip("*#")) and len(token) > 2:
                w = self._masked_match(token)
                if w:
                    found[token] = max(found.get(token, 0.0), w)
                continue
            for v in variants[i]:
                for stem, weight in self.stems.items():
                    if v.startswith(stem):
                        found[stem] = max(found.get(stem, 0.0), weight)
            for n in range(1, self._max_len + 1):
                if i + n > len(tokens):
                    break
                seqs = [()]
                for j in range(i, i + n):
                    seqs = [s + (v,) for s in seqs for v in variants[j]][:64]
                for seq in seqs:
                    if seq in self.words:
                        key = " ".join(seq)
                        found[key] = max(found.get(key, 0.0), self.words[seq])
        return found

    def score_one(self, text: str) -> float:
        safe = 1.0
        for weight in self.matches(text).values():
            safe *= 1.0 - weight
        return float(1.0 - safe)


def _load_detoxify(model: str, checkpoint: str | None, timeout_s: float) -> Any | None:
    """Detoxify if installed and loadable within timeout_s (its weights download); else None."""
    try:
        from detoxify import (
            Detoxify,
        )  # optional, and it imports transformers (seconds): tried only when asked
    except ImportError:
        return None
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["model"] = Detoxify(model, checkpoint=checkpoint, device="cpu")
        except Exception as exc:  # noqa: BLE001 - any download/load failure means: fall back
            box["error"] = exc

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "model" in box:
        return box["model"]
    reason = box.get("error", f"no answer within {timeout_s:.0f}s")
    log.warning(
        "Detoxify is installed but its %r weights could not be loaded (%s); using the "
        "built-in lexicon scorer",
        model,
        reason,
    )
    return None


class ToxicityScorer:
    """ptoxic per caption. backend: 'auto'
    (Detoxify if it loads, else lexicon), 'lexicon', 'detoxify'."""

    column = PTOXIC
    kind = "text"
    needs_embeddings = False

    def __init__(
        self,
        backend: str = "auto",
        detoxify_model: str = "original",
        detoxify_checkpoint: str | None = None,
        load_timeout_s: float = 60.0,
        lexicon_path: str | Path = LEXICON_PATH,
        device: str | None = None,
    ) -> None:
        if backend not in ("auto", "lexicon", "detoxify"):
            raise ValueError(f"toxicity backend must be auto, lexicon or detoxify; got {backend!r}")
        self.detoxify = None
        if backend != "lexicon":
            self.detoxify = _load_detoxify(detoxify_model, detoxify_checkpoint, load_timeout_s)
            if self.detoxify is None and backend == "detoxify":
                raise RuntimeError(
                    "backend='detoxify' but Detoxify is not installed or its weights "
                    "could not be loaded (pip install detoxify; pass detoxify_checkpoint="
                    "a local .ckpt when offline)"
                )
        self.lexicon = LexiconToxicity(lexicon_path)
        self.backend = "detoxify" if self.detoxify is not None else "lexicon"

    def score(self, items: Sequence[Any], embeddings: np.ndarray | None = None) -> np.ndarray:
        """ptoxic in [0, 1] per caption (NaN for a non-string item; '' scores 0)."""
        out = np.full(len(items), np.nan, np.float32)
        texts, where = [], []
        for i, item in enumerate(items):
            if isinstance(item, str):
                texts.append(item)
                where.append(i)
            elif item is not None:
                log.warning("toxicity: item %d is %s, not a caption string", i, type(item).__name__)
        if not texts:
            return out
        if self.detoxify is not None:
            values = np.asarray(self.detoxify.predict(texts)["toxicity"], np.float32)
        else:
            values = np.array([self.lexicon.score_one(t) for t in texts], np.float32)
        out[where] = np.clip(values, 0.0, 1.0)
        return out
