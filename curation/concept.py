"""Make or refine a concept by example and score the whole collection with it.

    python -m curation.concept COLLECTION NAME --pos K1,K2 --neg K3 [--prompt TEXT]
                               [--modality image|text|both] [--add] [--suggest 10]
                               [--unlabelled 4096]
    python -m curation.concept COLLECTION NAME --labels [--pos ... --neg ...]

Fits the probe (`curation.concept_probe`), writes `concepts/NAME.json` (examples, model, threshold,
quality) and `concepts/NAME.parquet` (key, score for every sample), and prints the quality
(grade and the reasons it is capped, estimated precision and share of what passes) and the
samples worth labelling next as rows (key, id, score, why: the top of the ranking to confirm,
then the least certain). Give the search's text as --prompt: labels from one search page say
little about the rest of the collection, and the prompt is the prior they adjust. `--add`
adds the given keys to the saved concept's examples instead of replacing them: the labelling
loop is suggest, label, `--add`, again. `--labels` fits from the label set the web UI keeps
for NAME (`concepts/NAME.labels.json`, `curation.labels`), plus any --pos/--neg given.
"""

from __future__ import annotations

import argparse
import json

from collection import schema as S
from collection.parts import complete_parts, read_metadata
from models.runtime import setup_logging


def _keys(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m curation.concept",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collection")
    p.add_argument("name", help="concept name (letters, digits, - _ .)")
    p.add_argument(
        "--pos", default="", help="comma-separated keys of samples that show the concept"
    )
    p.add_argument("--neg", default="", help="comma-separated keys of samples that do not")
    p.add_argument("--prompt", default=None, help="a text describing the concept, used as a prior")
    p.add_argument(
        "--modality",
        default="both",
        choices=("image", "text", "both"),
        help="which CLIP embeddings the probe reads (text: the captions)",
    )
    p.add_argument(
        "--add", action="store_true", help="add the keys to the saved concept's examples"
    )
    p.add_argument(
        "--suggest", type=int, default=10, help="how many samples to suggest labelling next"
    )
    p.add_argument(
        "--no-columns", action="store_true", help="embeddings (and prompt) only; no score columns"
    )
    p.add_argument(
        "--unlabelled",
        type=int,
        default=None,
        help="unlabelled samples read for the scale, prompt prior and threshold (default 4096)",
    )
    p.add_argument(
        "--labels",
        action="store_true",
        help="add the label set the web UI saved for NAME (concepts/NAME.labels.json)",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    setup_logging()
    # the probe needs sklearn and the collection's CLIP (torch): imported after parsing
    from curation.concept_probe import (
        SCORE_COLUMNS,
        UNLABELLED_SAMPLE,
        fit_concept,
        load_concept,
        score_collection,
        suggest_rows,
    )  # noqa: E402
    from curation.concept_scores import save_concept  # noqa: E402
    from curation.labels import load_labels  # noqa: E402

    try:
        complete_parts(a.collection)  # a missing or unreachable collection, said in one line
        pos, neg, prompt = _keys(a.pos), _keys(a.neg), a.prompt
        if a.add:
            old = load_concept(a.collection, a.name)
            pos = list(dict.fromkeys(old.positives + pos))
            neg = list(dict.fromkeys(old.negatives + neg))
            prompt = prompt if prompt is not None else old.prompt
        if a.labels:
            saved = load_labels(a.collection, a.name)
            if not saved:
                raise ValueError(f"{a.collection}: no label set saved for concept {a.name!r}")
            pos = list(dict.fromkeys(pos + [k for k, v in saved.items() if v == 1]))
            neg = list(dict.fromkeys(neg + [k for k, v in saved.items() if v == 0]))
        concept = fit_concept(
            a.collection,
            a.name,
            pos,
            neg,
            prompt,
            a.modality,
            () if a.no_columns else SCORE_COLUMNS,
            seed=a.seed,
            unlabelled=UNLABELLED_SAMPLE if a.unlabelled is None else a.unlabelled,
        )
        keys = read_metadata(a.collection, [S.KEY]).column(S.KEY)  # Arrow, not 10M objects
        scores = score_collection(a.collection, concept)
        path = save_concept(a.collection, concept, scores, keys)
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, no traceback
        p.error(str(exc))
    print(
        json.dumps(
            {
                "concept": path,
                "threshold": round(concept.threshold, 4),
                "quality": concept.quality,
                "signals": concept.signals,
                "above_threshold": int((scores >= concept.threshold).sum()),
                "samples": len(keys),
                "label_next": suggest_rows(concept, keys, scores, a.suggest),
            }
        )
    )


if __name__ == "__main__":
    main()
