"""A concept's scores of the collection, saved beside it (concepts/NAME.parquet: key, score) and
read back by a subset spec's `concept` clause, so resolving a clause scores nothing again.

The scores file carries a tag of the model that made them (weights, columns, bias) in its
schema metadata; a clause reads it when the tag and the row count match the concept and the
collection as they are now. Otherwise the rows are scored: by a `Scorer` the caller gives (the
web UI's encoder process, so its own process never loads torch), else here
(`curation.concept_probe.score_collection`, torch's half-precision kernels).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collection import schema as S
from collection.parts import read_metadata
from collection.storage import REMOTE_ERRORS, url_to_fs, write_json
from curation.catalog import read_parts
from curation.concept_probe import Concept, load_concept, score_collection
from curation.vectors import write_table

log = logging.getLogger(__name__)

#: the scores file's schema-metadata key holding `scores_tag` of the concept that made them
TAG_KEY = b"sieve.concept_scores"
#: rows per batch when saved scores are read back
READ_ROWS = 1 << 20

#: scores a concept elsewhere: (collection, concept, min_score) -> `np.packbits` of
#: score >= min_score over every embedded row, in global-id order
Scorer = Callable[[str, Concept, float], np.ndarray]


def scores_tag(concept: Concept) -> str:
    """What decides a concept's scores (its linear model, not its name, examples or threshold)."""
    model = {
        "image": concept.image_weights,
        "text": concept.text_weights,
        "columns": concept.columns,
        "bias": concept.bias,
    }
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:32]


def save_concept(
    collection: str,
    concept: Concept,
    scores: np.ndarray | None = None,
    keys: np.ndarray | pa.ChunkedArray | None = None,
) -> str:
    """Write concepts/{name}.json (and, given scores, concepts/{name}.parquet: key, score, tagged
    with `scores_tag`); return the json path."""
    layout = S.InsightLayout(collection)
    path = layout.concept(concept.name)
    if scores is not None:  # first: the json is what lists a concept as saved
        # the key column as Arrow reads it: no Python object per row
        keys = read_metadata(collection, [S.KEY]).column(S.KEY) if keys is None else keys
        table = pa.table(
            {
                S.KEY: keys if isinstance(keys, pa.ChunkedArray) else pa.array(keys, pa.string()),
                S.CONCEPT_SCORE: pa.array(scores, pa.float32()),
            }
        )
        write_table(
            layout.concept_scores(concept.name),
            table.replace_schema_metadata({TAG_KEY: scores_tag(concept).encode()}),
        )
    write_json(path, concept.to_json())
    return path


def saved_passing(collection: str, concept: Concept, limit: float) -> np.ndarray | None:
    """A boolean mask over every embedded row of score >= `limit`, from the saved scores when
    they are this concept's and the collection's (tag and row count); None when they are not."""
    url = S.InsightLayout(collection).concept_scores(concept.name)
    try:
        fs, path = url_to_fs(url)
        with fs.open(path, "rb") as fh:
            f = pq.ParquetFile(fh)
            tag = (f.schema_arrow.metadata or {}).get(TAG_KEY, b"").decode()
            rows = read_parts(collection).ok_rows
            if tag != scores_tag(concept) or f.metadata.num_rows != rows:
                log.info("%s: not the scores of concept %s as it is now", url, concept.name)
                return None
            mask = np.zeros(rows, dtype=bool)
            at = 0
            for batch in f.iter_batches(READ_ROWS, columns=[S.CONCEPT_SCORE]):
                scores = batch.column(0).to_numpy(zero_copy_only=False)
                mask[at : at + len(scores)] = scores >= limit
                at += len(scores)
    except (FileNotFoundError, pa.ArrowInvalid, *REMOTE_ERRORS) as exc:
        log.info("%s: no saved scores read (%s)", url, exc)
        return None
    return mask


def passing(
    collection: str, concept: Concept, limit: float, scorer: Scorer | None = None
) -> np.ndarray:
    """A boolean mask over every embedded row of score >= `limit`: the saved scores, else
    scored by `scorer`, else here."""
    mask = saved_passing(collection, concept, limit)
    if mask is not None:
        return mask
    if scorer is not None:
        rows = read_parts(collection).ok_rows
        return np.unpackbits(scorer(collection, concept, limit), count=rows).astype(bool)
    return score_collection(collection, concept) >= limit


def subset_clause(
    collection: str,
    ids: Sequence[int] | np.ndarray,
    name: str,
    min_score: float | None = None,
    scorer: Scorer | None = None,
) -> np.ndarray:
    """A subset spec's `concept: {name, min_score}` clause: the ids whose score is at least
    min_score (default: the concept's cross-validated threshold)."""
    concept = load_concept(collection, name)
    limit = concept.threshold if min_score is None else float(min_score)
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"concept clause: min_score must be in [0, 1], got {min_score!r}")
    ids = np.asarray(ids, dtype=np.int64)
    mask = passing(collection, concept, limit, scorer)
    if len(ids) and int(ids.max()) >= len(mask):
        raise ValueError(f"concept {name}: ids beyond the collection's {len(mask)} embedded rows")
    return ids[mask[ids]]
