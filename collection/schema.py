"""The collection contract: column names, statuses and on-disk layout, defined once.

Every stage (pipelines, indices, curation, webui, hdit_train) imports names from here
instead of spelling strings, so the layout in docs/design.md has one source of truth.
This module imports only the standard library so that it is cheap everywhere.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Sequence

SCHEMA_VERSION = 1

# ---- metadata columns -------------------------------------------------------------------
KEY = "key"
PART = "part"
ROW = "row"
EMB_ROW = "emb_row"
CAPTION = "caption"
URL = "url"
SOURCE_SHARD = "source_shard"
#: where the image member's bytes start inside its source tar, and how many there are: export reads
#: exactly those bytes by range; NULL where the source is not a plain tar (parquet, files, .tar.gz)
SOURCE_OFFSET = "source_offset"
SOURCE_SIZE = "source_size"
WIDTH = "width"
HEIGHT = "height"
SHA256 = "sha256"
PHASH = "phash"
CLIP_SIMILARITY = "clip_similarity"
PUNSAFE = "punsafe"
PWATERMARK = "pwatermark"
PTOXIC = "ptoxic"
#: CLD3's language code, as LAION split its pairs
LANGUAGE = "language"
#: CLD3's probability for `language` (filled at embed time for every row with a caption)
LANGUAGE_SCORE = "language_score"
#: `language` when CLD3 cannot tell reliably (CLD3's and BCP 47's "undetermined")
LANGUAGE_UNDETERMINED = "und"
LANGUAGE_ENGLISH = "en"
#: characters in the caption (null without one): LAION's caption-length filter reads this
#: integer instead of measuring every caption's string at query time
CAPTION_LENGTH = "caption_length"
STATUS = "status"
ERROR = "error"

#: a vector's global id: its position among the ok rows of all complete parts in part order
#: (clip-retrieval's rule); a column of the catalog's `samples` table, of subset resolutions and
#: of search results, never stored in a part
ID = "id"

#: Arrow type names (pyarrow type factory names) of the columns every metadata part has, in this
#: order; the source's own json fields follow.
METADATA_TYPES: dict[str, str] = {
    KEY: "string",
    PART: "int32",
    ROW: "int32",
    EMB_ROW: "int32",
    CAPTION: "string",
    URL: "string",
    SOURCE_SHARD: "string",
    WIDTH: "int32",
    HEIGHT: "int32",
    SHA256: "string",
    PHASH: "string",
    CLIP_SIMILARITY: "float32",
    PUNSAFE: "float32",
    PWATERMARK: "float32",
    PTOXIC: "float32",
    LANGUAGE: "string",
    STATUS: "string",
    ERROR: "string",
    SOURCE_OFFSET: "int64",
    SOURCE_SIZE: "int64",
    LANGUAGE_SCORE: "float32",
    CAPTION_LENGTH: "int32",
}
METADATA_COLUMNS: tuple[str, ...] = tuple(METADATA_TYPES)
#: Names a source json field may not keep (renamed `src_<name>` by the embed job).
RESERVED_COLUMNS: frozenset[str] = frozenset(METADATA_COLUMNS) | {ID}

# ---- the takedown list ------------------------------------------------------------------
#: takedown.parquet: one entry per row, exactly one of key / url / sha256 set, why and when
TAKEDOWN_REASON = "reason"
TAKEDOWN_ADDED = "added"
TAKEDOWN_MATCH_COLUMNS: tuple[str, ...] = (KEY, URL, SHA256)
TAKEDOWN_COLUMNS: tuple[str, ...] = (KEY, URL, SHA256, TAKEDOWN_REASON, TAKEDOWN_ADDED)

# ---- statuses ---------------------------------------------------------------------------
STATUS_OK = "ok"
STATUS_DECODE_ERROR = "decode_error"  # truncated / garbage image bytes
STATUS_TOO_LARGE = "too_large"  # over the pixel limit (decompression bomb)
STATUS_MISSING_IMAGE = "missing_image"  # caption/json without an image member
STATUS_MISSING_CAPTION = "missing_caption"  # image without a caption
STATUS_READ_ERROR = "read_error"  # the shard broke mid-member (cut tar, bad row)
STATUS_ERROR = "error"  # anything else, message in `error`
STATUSES: tuple[str, ...] = (
    STATUS_OK,
    STATUS_DECODE_ERROR,
    STATUS_TOO_LARGE,
    STATUS_MISSING_IMAGE,
    STATUS_MISSING_CAPTION,
    STATUS_READ_ERROR,
    STATUS_ERROR,
)

# ---- collection layout ------------------------------------------------------------------
COLLECTION_JSON = "collection.json"
METADATA_DIR = "metadata"
IMG_EMB_DIR = "img_emb"
TEXT_EMB_DIR = "text_emb"
DONE_DIR = "_done"
INDICES_DIR = "indices"
#: under indices/: each part's embedded rows as memory-mapped Arrow (a cache of the parquet,
#: indices.rows)
ROWS_DIR = "rows"
SUBSETS_DIR = "subsets"
TAKEDOWN_FILE = "takedown.parquet"
EMB_DTYPE = "float16"

MODALITY_IMAGE = "image"
MODALITY_TEXT = "text"
MODALITIES: tuple[str, ...] = (MODALITY_IMAGE, MODALITY_TEXT)


def part_name(n: int) -> str:
    """Zero-padded part id used in every per-part file name (clip-retrieval style)."""
    return f"{n}"


def rows_name(n: int) -> str:
    """File name of part n's rows file under `indices/rows/` (indices.rows)."""
    return f"rows_{part_name(n)}.arrow"


@dataclass(frozen=True)
class CollectionLayout:
    """Paths inside one collection folder (a local path or an fsspec URL)."""

    root: str

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root.rstrip("/"), *parts)

    @property
    def collection_json(self) -> str:
        return self._join(COLLECTION_JSON)

    @property
    def metadata_dir(self) -> str:
        return self._join(METADATA_DIR)

    @property
    def img_emb_dir(self) -> str:
        return self._join(IMG_EMB_DIR)

    @property
    def text_emb_dir(self) -> str:
        return self._join(TEXT_EMB_DIR)

    @property
    def done_dir(self) -> str:
        return self._join(DONE_DIR)

    @property
    def indices_dir(self) -> str:
        return self._join(INDICES_DIR)

    @property
    def rows_dir(self) -> str:
        return self._join(INDICES_DIR, ROWS_DIR)

    @property
    def subsets_dir(self) -> str:
        return self._join(SUBSETS_DIR)

    @property
    def takedown(self) -> str:
        return self._join(TAKEDOWN_FILE)

    def metadata(self, n: int) -> str:
        return self._join(METADATA_DIR, f"metadata_{part_name(n)}.parquet")

    def img_emb(self, n: int) -> str:
        return self._join(IMG_EMB_DIR, f"img_emb_{part_name(n)}.npy")

    def text_emb(self, n: int) -> str:
        return self._join(TEXT_EMB_DIR, f"text_emb_{part_name(n)}.npy")

    def emb(self, modality: str, n: int) -> str:
        if modality == MODALITY_IMAGE:
            return self.img_emb(n)
        if modality == MODALITY_TEXT:
            return self.text_emb(n)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def done(self, n: int) -> str:
        return self._join(DONE_DIR, f"{part_name(n)}.json")

    def index(self, modality: str) -> str:
        return self._join(INDICES_DIR, f"{modality}.index")

    def index_json(self, modality: str) -> str:
        return self._join(INDICES_DIR, f"{modality}.json")

    def subset(self, name: str) -> str:
        return self._join(SUBSETS_DIR, f"{name}.yaml")


# ---- export (training input) ------------------------------------------------------------
EXPORT_MANIFEST = "manifest.json"
EXPORT_IMAGE_EXT = "jpg"
EXPORT_TEXT_EXT = "txt"
EXPORT_JSON_EXT = "json"
EXPORT_IMG_EMB_EXT = "img_emb.npy"
EXPORT_TXT_EMB_EXT = "txt_emb.npy"
#: parquet/urls exports: the image bytes and embedding columns (img2dataset names the bytes `jpg`)
EXPORT_IMAGE_COLUMN = "jpg"
EXPORT_IMG_EMB_COLUMN = "img_emb"
EXPORT_TXT_EMB_COLUMN = "txt_emb"
EXPORT_WEBDATASET = "webdataset"
EXPORT_PARQUET = "parquet"
EXPORT_URLS = "urls"
EXPORT_FORMATS: tuple[str, ...] = (EXPORT_WEBDATASET, EXPORT_PARQUET, EXPORT_URLS)
RESIZE_MODES: tuple[str, ...] = ("none", "center_crop", "keep_ratio")

# manifest.json keys: what `curation.export` writes and `hdit_train.data` reads
MANIFEST_FORMAT = "format"
MANIFEST_SPEC = "spec"  # the normalised subset spec
MANIFEST_SPEC_HASH = "spec_hash"  # identifies the query (spec + collection id)
MANIFEST_COLLECTION = "collection"  # where the collection was
MANIFEST_COLLECTION_ID = "collection_id"
MANIFEST_CLIP_MODEL = "clip_model"  # the CLIP spec the embeddings came from
MANIFEST_DIM = "dim"  # embedding dimension
MANIFEST_COUNT = "count"  # samples written
MANIFEST_SHARDS = "shards"
MANIFEST_COLUMNS = "columns"  # the fields of each sample's json / parquet row
MANIFEST_CREATED = "created"
#: bytes read from the source shards, and bytes of the exported samples' image members there
#: (their ratio is the export's read overhead); also in each shard's _stats.json
MANIFEST_BYTES_FETCHED = "source_bytes_fetched"
MANIFEST_MEMBER_BYTES = "source_member_bytes"
#: samples left out because their image is no longer in the source as embedded (per shard's
#: _stats.json: `missing`, each key with its reason)
MANIFEST_MISSING = "missing_images"
MANIFEST_REQUIRED: tuple[str, ...] = (
    MANIFEST_FORMAT,
    MANIFEST_SPEC_HASH,
    MANIFEST_CLIP_MODEL,
    MANIFEST_DIM,
    MANIFEST_COUNT,
)


def shard_name(i: int, ext: str = "tar") -> str:
    """img2dataset's shard naming: 00000.tar, 00000.parquet, 00000_stats.json."""
    return f"{i:05d}.{ext}"


def stats_name(i: int) -> str:
    return f"{i:05d}_stats.json"


# ---- duplicates, concepts, uniqueness, the embedding map --------------------------------
DEDUP_DIR = "dedup"
DUPLICATES_FILE = "duplicates.parquet"
DEDUP_REPORT_FILE = "report.json"
CONCEPTS_DIR = "concepts"
#: concepts/{name}.labels.json: a concept's 👍/👎 labels as a person gives them (curation.labels)
CONCEPT_LABELS_SUFFIX = ".labels.json"
MAP_DIR = "map"
UNIQUENESS_FILE = "uniqueness.parquet"

#: duplicates.parquet columns: one row per member of a duplicate group (the kept one included)
DUP_KEY = KEY
DUP_GROUP = "group"
DUP_KEPT = "kept"
DUP_REASON = "reason"
DUP_NEAREST = "nearest_key"
DUP_SIMILARITY = "similarity"
DUPLICATES_COLUMNS: tuple[str, ...] = (
    DUP_KEY,
    DUP_GROUP,
    DUP_KEPT,
    DUP_REASON,
    DUP_NEAREST,
    DUP_SIMILARITY,
)
#: why a row is in its group: same bytes, the same picture transformed, or SemDeDup's rule
REASON_EXACT = "exact"
REASON_COPY = "copy"
REASON_SEMANTIC = "semantic"
DUP_REASONS: tuple[str, ...] = (REASON_EXACT, REASON_COPY, REASON_SEMANTIC)
#: `curation.dedup --level`: each level runs alone; several at once run in this order, each on
#: what the ones before it kept (`--level exact,copies,semantic`)
LEVEL_EXACT = "exact"
LEVEL_COPIES = "copies"
LEVEL_SEMANTIC = "semantic"
DEDUP_LEVELS: tuple[str, ...] = (LEVEL_EXACT, LEVEL_COPIES, LEVEL_SEMANTIC)

#: uniqueness.parquet columns (joinable on key or id)
UNIQUENESS = "uniqueness"
KTH_DISTANCE = "kth_distance"
UNIQUENESS_COLUMNS: tuple[str, ...] = (KEY, ID, UNIQUENESS, KTH_DISTANCE)

#: map/{modality}.parquet columns
MAP_X = "x"
MAP_Y = "y"
MAP_CLUSTER = "cluster"
MAP_COLUMNS: tuple[str, ...] = (KEY, MAP_X, MAP_Y, MAP_CLUSTER)

#: concepts/{name}.parquet columns (a concept's score of every sample)
CONCEPT_SCORE = "score"


def dedup_levels(level: str | Sequence[str]) -> tuple[str, ...]:
    """The levels named by `level` ("copies", "exact,copies", or a list), in the order they run;
    ValueError naming the unknown one."""
    names = level.split(",") if isinstance(level, str) else list(level)
    names = [str(n).strip() for n in names if str(n).strip()]
    for name in names:
        if name not in DEDUP_LEVELS:
            raise ValueError(f"level must be one of {list(DEDUP_LEVELS)}, got {name!r}")
    if not names:
        raise ValueError(f"level must be one or more of {list(DEDUP_LEVELS)}, got {level!r}")
    return tuple(n for n in DEDUP_LEVELS if n in names)


def dedup_run_name(level: str | Sequence[str], eps: float | None = None) -> str:
    """The default run folder of a level or levels (and ε with semantic): `copies`,
    `semantic-eps0.05`, `exact-copies-semantic-eps0.05`."""
    levels = dedup_levels(level)
    name = "-".join(levels)
    return f"{name}-eps{eps:g}" if LEVEL_SEMANTIC in levels else name


@dataclass(frozen=True)
class InsightLayout:
    """Paths of the duplicates, concepts, uniqueness and map files inside one collection."""

    root: str

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root.rstrip("/"), *parts)

    @property
    def dedup_dir(self) -> str:
        return self._join(DEDUP_DIR)

    def dedup_run(self, run: str) -> str:
        return self._join(DEDUP_DIR, run)

    def duplicates(self, run: str) -> str:
        return self._join(DEDUP_DIR, run, DUPLICATES_FILE)

    def dedup_report(self, run: str) -> str:
        return self._join(DEDUP_DIR, run, DEDUP_REPORT_FILE)

    @property
    def concepts_dir(self) -> str:
        return self._join(CONCEPTS_DIR)

    def concept(self, name: str) -> str:
        return self._join(CONCEPTS_DIR, f"{name}.json")

    def concept_labels(self, name: str) -> str:
        return self._join(CONCEPTS_DIR, f"{name}{CONCEPT_LABELS_SUFFIX}")

    def concept_scores(self, name: str) -> str:
        return self._join(CONCEPTS_DIR, f"{name}.parquet")

    @property
    def uniqueness(self) -> str:
        return self._join(UNIQUENESS_FILE)

    def map(self, modality: str) -> str:
        return self._join(MAP_DIR, f"{modality}.parquet")
