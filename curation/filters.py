"""LAION-5B's filtering recipe as named, overridable defaults rendered to a DuckDB WHERE clause.

`render("laion")` gives the recipe over the catalog's `samples` columns; any field of
`FilterSpec` can be overridden (`render("laion", max_punsafe=0.2, min_width=256)`), and None
turns a clause off. Presets: `laion` (the recipe), `english` / `multilingual` / `nolang`
(LAION's language split of the recipe's output, by CLD3's `language`), `none` (no clause;
build your own from overrides).

The recipe (LAION-5B, Schuhmann et al. 2022): the sample downloaded and decoded
(`status = 'ok'`); image·text CLIP cosine at least 0.28 with OpenAI's ViT-B/32 (English; 0.26
for the multilingual part with mCLIP); alt-text at least 5 characters. LAION tagged rather than
dropped NSFW (`punsafe`), watermarks (`pwatermark`) and toxic text; the thresholds here are
the ones its safe / aesthetic subsets and clip-retrieval's safe mode use. Unscored rows pass
the score clauses (as clip back does) unless `keep_unscored=False`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from collection import schema as S
from models.specs import TINY_NAME, parse_spec

#: `language` values of LAION's split (CLD3 codes are accepted too, comma-separated: "de,fr")
LANGUAGE_SPLITS = ("english", "multilingual", "nolang")
_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,8})?$")

#: Image·text cosine thresholds per CLIP. ViT-B-32: LAION's 0.28 (set on OpenAI's weights).
#: sieve-tiny: calibrated on generated data (`pipelines.generate --n 3000 --seed 1
#: --mismatch-fraction 0.1`, embedded with sieve-tiny) as the equal-error threshold, where the
#: share of matched pairs kept equals the share of swapped-caption pairs removed, to 0.01.
#: `python -m bench.curation --only filter` re-derives it (`filter.calibration.threshold`) and
#: measures this value on held-out seeds (`filter_mismatch_removed`, `filter_match_kept`).
#: sieve-tiny is far more confident than CLIP on web data, hence a much higher floor.
SIMILARITY_THRESHOLDS: dict[str, float] = {"ViT-B-32": 0.28, TINY_NAME: 0.57}
#: arch spellings that mean the same model
_ARCH_ALIASES = {"ViT-B/32": "ViT-B-32"}


def similarity_threshold(clip_model: str) -> float:
    """LAION's image·text cosine floor for this CLIP spec (ValueError when none is known: pass
    `min_similarity=` yourself; a wrong threshold silently keeps or drops everything)."""
    spec = parse_spec(clip_model)
    if spec.kind == "tiny":
        return SIMILARITY_THRESHOLDS[TINY_NAME]
    arch = _ARCH_ALIASES.get(spec.arch, spec.arch)
    if spec.kind == "open_clip" and spec.weights and arch in SIMILARITY_THRESHOLDS:
        return SIMILARITY_THRESHOLDS[arch]
    raise ValueError(
        f"no calibrated image-text similarity threshold for CLIP {clip_model!r} "
        "(known: sieve-tiny and trained "
        f"{sorted(a for a in SIMILARITY_THRESHOLDS if a != TINY_NAME)}); "
        "pass min_similarity=... or min_similarity=None"
    )


@dataclass(frozen=True)
class FilterSpec:
    """One filter: each field is a clause, None turns it off."""

    status: str | None = S.STATUS_OK
    #: "auto": `similarity_threshold(clip_model)`
    min_similarity: float | str | None = "auto"
    clip_model: str = TINY_NAME
    min_caption_length: int | None = 5
    max_punsafe: float | None = 0.5
    max_pwatermark: float | None = 0.8
    max_ptoxic: float | None = 0.5
    min_width: int | None = None
    min_height: int | None = None
    #: one of LANGUAGE_SPLITS, or CLD3 codes ("en", "de,fr")
    language: str | None = None
    keep_unscored: bool = True

    def clauses(self) -> list[str]:
        """The WHERE clause's conjuncts, in a fixed order (each one a parenthesised SQL term)."""
        out = []
        if self.status is not None:
            out.append(f"{S.STATUS} = {_literal(self.status)}")
        sim = (
            similarity_threshold(self.clip_model)
            if self.min_similarity == "auto"
            else self.min_similarity
        )
        if sim is not None:
            out.append(f"{S.CLIP_SIMILARITY} >= {_number('min_similarity', sim)}")
        if self.min_caption_length is not None:
            n = int(_number("min_caption_length", self.min_caption_length))
            # characters, as LAION counted them: counted once at embed time (the catalog counts
            # them for older parts), since measuring every caption per query costs more than the
            # rest of the filter (bench/results/curation.json, `sql`)
            out.append(f"{S.CAPTION_LENGTH} >= {n}")
        for col, limit in (
            (S.PUNSAFE, self.max_punsafe),
            (S.PWATERMARK, self.max_pwatermark),
            (S.PTOXIC, self.max_ptoxic),
        ):
            if limit is not None:
                term = f"{col} < {_number('max_' + col, limit)}"
                out.append(f"{col} IS NULL OR {term}" if self.keep_unscored else term)
        for col, least in ((S.WIDTH, self.min_width), (S.HEIGHT, self.min_height)):
            if least is not None:
                out.append(f"{col} >= {int(_number('min_' + col, least))}")
        if self.language is not None:
            out.append(_language_clause(self.language))
        return [f"({c})" for c in out]

    def render(self) -> str:
        """The clauses joined with AND ('TRUE' when every clause is off)."""
        return " AND ".join(self.clauses()) or "TRUE"


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"filter {name}: expected a number, got {value!r}")
    return value


def _language_clause(language: str) -> str:
    col = S.LANGUAGE
    if language == "english":
        return f"{col} = '{S.LANGUAGE_ENGLISH}'"
    if language == "multilingual":
        return (
            f"{col} IS NOT NULL AND {col} NOT IN "
            f"('{S.LANGUAGE_ENGLISH}', '{S.LANGUAGE_UNDETERMINED}')"
        )
    if (
        language == "nolang"
    ):  # not reliably detected, or never detected (no caption, older collections)
        return f"coalesce({col}, '{S.LANGUAGE_UNDETERMINED}') = '{S.LANGUAGE_UNDETERMINED}'"
    codes = [c.strip() for c in str(language).split(",") if c.strip()]
    bad = [c for c in codes if not _CODE.match(c)]
    if not codes or bad:
        raise ValueError(
            f"filter language {language!r}: expected one of {list(LANGUAGE_SPLITS)} "
            "or CLD3 codes such as 'en' or 'de,fr'"
        )
    return f"{col} IN ({', '.join(_literal(c) for c in codes)})"


_OFF = {f.name: None for f in fields(FilterSpec) if f.name not in ("clip_model", "keep_unscored")}
PRESETS: dict[str, FilterSpec] = {
    "laion": FilterSpec(),
    "english": FilterSpec(language="english"),
    "multilingual": FilterSpec(language="multilingual"),
    "nolang": FilterSpec(language="nolang"),
    "none": FilterSpec(**_OFF),
}


def spec(preset: str = "laion", **overrides: Any) -> FilterSpec:
    """The preset with overrides applied; ValueError naming unknown presets or fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown filter preset {preset!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in fields(FilterSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown filter field(s) {unknown}; known: {sorted(known)}")
    return replace(PRESETS[preset], **overrides)


def render(preset: str = "laion", **overrides: Any) -> str:
    """A DuckDB WHERE clause over `samples`' columns for the preset with overrides."""
    return spec(preset, **overrides).render()


def describe(preset: str = "laion", **overrides: Any) -> dict[str, Any]:
    """The effective settings (for manifests and dry runs), with `min_similarity` resolved."""
    s = spec(preset, **overrides)
    doc = asdict(s)
    if s.min_similarity == "auto":
        doc["min_similarity"] = similarity_threshold(s.clip_model)
    return {"preset": preset, **doc}
