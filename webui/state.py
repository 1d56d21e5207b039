"""The app's process-wide resources and per-session state: which collections are open, what
each has been built up to, and the searcher, catalog and CLIP model loaded once per process.

Loading is started in a background thread when a collection is first opened, so the first
page renders while FAISS, the metadata rows, CLIP and the SQL sandbox load; a page that needs
one of them waits for it under a spinner. What a collection lacks (not built, not embedded,
no index) is found by looking at its folder, and each lack comes with the command that fixes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import posixpath
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from collection import schema as S
from collection.storage import REMOTE_ERRORS, read_collection_json, url_to_fs
from curation import stats
from indices.local import signature
from models.runtime import cores
from models.specs import TINY_NAME
from webui import ast_guard  # noqa: F401 - imported for its effect: ast.parse serialised (CPython < 3.13 threads)
from webui.encoder import EncoderClient, EncoderError
from webui.roots import roots_of

if TYPE_CHECKING:  # for annotations only: the modules themselves load in the loading thread
    from curation.catalog import Catalog
    from indices.search import Searcher

log = logging.getLogger(__name__)

#: the bins of Explore's histograms until the page's slider says otherwise
EXPLORE_BINS = 30

REPO = Path(__file__).resolve().parent.parent
#: what `make demo` builds (DEMO=demo), opened when the app is started without --collection
DEFAULT_COLLECTION = str(REPO / "demo" / "collection")
BUILD_COMMAND = "make demo"
#: session-state keys shared by the pages
COLLECTIONS = "collections"
CURRENT = "collection"
#: the folders this session may read and write under (`webui.roots`), fixed at its start
ROOTS = "data_roots"
#: samples any result grid sent to the Subset page ("Send to Subset"): {"path": collection,
#: "keys": [sample keys], "source": what they were, e.g. "search: a red circle"}; the Subset
#: page reads it (and may pop it once used)
SUBSET_INBOX = "subset_inbox"


@dataclass(frozen=True)
class Health:
    """How far a collection folder has been built, read off its files (no data loaded)."""

    path: str
    exists: bool
    parts: int = 0
    embeddings: tuple[str, ...] = ()
    indices: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    #: changes whenever a stage finishes (a new part, a new index): the resources are reloaded then
    signature: tuple = ()

    @property
    def queryable(self) -> bool:
        """SQL, counts and histograms work: there are complete metadata parts."""
        return self.parts > 0

    @property
    def searchable(self) -> bool:
        return bool(self.indices)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def session_id() -> str | None:
    """This browser session's id: the SQL pool's client, so one session's reruns queue as one
    user (None outside a Streamlit run: the pool then uses the calling thread)."""
    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else None


def location(typed: str) -> str:
    """A collection's location as the app keeps it: a URL as given, a local path absolute."""
    return typed if "://" in typed else os.path.abspath(os.path.expanduser(typed))


def is_folder(path: str) -> bool:
    """Whether `path` (a local folder or any fsspec URL) is a folder that exists and answers."""
    try:
        fs, p = url_to_fs(path)
        return bool(fs.isdir(p))
    except REMOTE_ERRORS as exc:  # unreachable store, missing credentials: not openable
        log.info("%s: cannot be listed: %s", path, exc)
        return False


def _stamp(url: str) -> tuple:
    """What changes when the file or folder at `url` is rewritten ((): nothing to compare)."""
    try:
        return tuple(signature(url)["signature"])
    except REMOTE_ERRORS:
        return ()


def inspect(path: str) -> Health:
    """What `path` (a folder or any fsspec URL) holds, and for each missing stage the one
    command that builds it."""
    layout = S.CollectionLayout(path)
    if not is_folder(path):
        fix = (
            f"`{BUILD_COMMAND}`"
            if os.path.abspath(path) == DEFAULT_COLLECTION
            else f"`python -m pipelines.embed SHARDS {path}` "
            f"(then `python -m indices.build {path}`)"
        )
        return Health(path, False, problems=(f"{path} does not exist yet. Build it with {fix}.",))
    done = sorted(
        int(f[:-5]) for f in _listdir(layout.done_dir) if f.endswith(".json") and f[:-5].isdigit()
    )
    problems = []
    if not done:
        problems.append(
            f"{path} has no complete parts (nothing in _done/): embed shards into it with "
            f"`python -m pipelines.embed SHARDS {path}`."
        )
    metadata = set(_listdir(layout.metadata_dir))
    missing_meta = [n for n in done if _name(layout.metadata(n)) not in metadata]
    if missing_meta:
        problems.append(
            f"{path}: metadata of part(s) {missing_meta} is missing although marked done; "
            f"re-embed with `python -m pipelines.embed SHARDS {path} --overwrite`."
        )
        done = []
    emb_dirs = {m: posixpath.dirname(layout.emb(m, 0)) for m in S.MODALITIES}
    emb_names = {m: set(_listdir(d)) for m, d in emb_dirs.items()} if done else {}
    embeddings = tuple(
        m
        for m in S.MODALITIES
        if done and all(_name(layout.emb(m, n)) in emb_names[m] for n in done)
    )
    if done and not embeddings:
        problems.append(
            f"{path} has metadata but no embeddings; re-embed with "
            f"`python -m pipelines.embed SHARDS {path} --overwrite`."
        )
    built = set(_listdir(layout.indices_dir)) if embeddings else set()
    indices = tuple(
        m
        for m in embeddings
        if _name(layout.index(m)) in built and _name(layout.index_json(m)) in built
    )
    if embeddings and not indices:
        problems.append(
            f"{path} has no index yet, so it cannot be searched: `python -m indices.build {path}`."
        )
    signature = (
        tuple(done),
        indices,
        _stamp(layout.done_dir),
        _stamp(layout.indices_dir),
        *(_stamp(layout.index_json(m)) for m in indices),
    )
    return Health(path, True, len(done), embeddings, indices, tuple(problems), signature)


def _name(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def insight_version(path: str) -> tuple:
    """Changes whenever a concept, the map, a duplicates run or the takedown list is (re)written:
    cached answers that read them are keyed on it."""
    insight = S.InsightLayout(path)
    dedup_runs = sorted(os.path.join(insight.dedup_dir, d) for d in _listdir(insight.dedup_dir))
    return tuple(
        _mtime(p)
        for p in (
            insight.concepts_dir,
            os.path.dirname(insight.map(S.MODALITY_IMAGE)),
            insight.dedup_dir,
            *dedup_runs,
            S.CollectionLayout(path).takedown,
        )
    )


def _listdir(path: str) -> list[str]:
    """Names in the folder `path` (a local path or any fsspec URL); [] when it cannot be listed."""
    try:
        fs, p = url_to_fs(path)
        fs.invalidate_cache(p)  # an object store's listing is cached per process otherwise
        return [_name(e) for e in fs.ls(p, detail=False)]
    except REMOTE_ERRORS:  # missing, unreadable or unreachable: the stage is not there
        return []


# ---- resources: loaded once per process ----------------------------------------------------
_ENCODERS: dict[str, Any] = {}
_ENCODERS_LOCK = threading.Lock()


def encoder(spec: str) -> EncoderClient:
    """The CLIP model of a spec, one encoder process per app whatever the number of collections
    and sessions using it (`webui.encoder`: the app's own process never loads torch)."""
    with _ENCODERS_LOCK:
        if spec not in _ENCODERS:
            _ENCODERS[spec] = EncoderClient(spec)
            atexit.register(_ENCODERS[spec].close)
        return _ENCODERS[spec]


def collection_encoder(path: str) -> EncoderClient:
    """The CLIP model a collection was embedded with
    (collection.json's spec), shared per process."""
    return encoder(read_collection_json(path).get("clip_model", TINY_NAME))


def _warm(clip: EncoderClient) -> None:
    try:
        clip.start()
    except EncoderError as exc:  # said again, to the page, by the first query that needs it
        log.warning("%s", exc)


_CLUSTER: list[Any] = []


def export_client() -> Any:
    """A Dask client for exports started from the app, kept for the process: workers are threads
    in this process, so the page's server never forks (and starts no second copy of itself).
    (Not st.cache_resource: a Client is awaitable, which Streamlit's cache refuses.)"""
    # Dask (a second): only once an export is asked for
    from collection.cluster import open_cluster

    with _ENCODERS_LOCK:
        if not _CLUSTER or _CLUSTER[0].client.status in ("closed", "closing"):
            _CLUSTER[:] = [open_cluster(workers=1, threads_per_worker=cores(), processes=False)]
            # closed before the interpreter finalises: its event-loop and worker threads would
            # otherwise be torn down mid-call at exit
            atexit.register(_close_cluster, _CLUSTER[0])
        return _CLUSTER[0].client


def _close_cluster(cluster: Any) -> None:
    try:
        cluster.close(timeout=10)
    except (
        OSError,
        RuntimeError,
        TimeoutError,
    ) as exc:  # exiting anyway: say so, do not mask the exit
        log.warning("closing the export cluster at exit: %s", exc)


@dataclass
class Loaded:
    """One collection's searcher and sandboxed catalog, loading in the background from creation,
    and then Explore's opening figures (`curation.stats.overview`)."""

    health: Health
    _searcher: Future | None = None
    _catalog: Future | None = None
    _overview: Future | None = None
    _overview_version: tuple = ()
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="sieve-load")
    )

    def __post_init__(self) -> None:
        if self.health.searchable:
            self._searcher = self._pool.submit(self._load_searcher)
        if self.health.queryable:
            self._catalog = self._pool.submit(self._load_catalog)
            self._overview_version = insight_version(self.health.path)
            self._overview = self._pool.submit(self._load_overview)

    def _load_overview(self) -> dict[str, Any]:
        """Explore's figures at its opening settings: two scans of the collection, made once
        the index has loaded (not competing with it), so opening Explore reads no row."""
        if self._searcher is not None:
            wait([self._searcher])
        return stats.overview(self.catalog(), bins=EXPLORE_BINS)

    def overview(self, insight: tuple) -> dict[str, Any] | None:
        """Explore's opening figures (waits for them) when made under `insight` (the takedown
        list they hide rows by, `insight_version`); None when stale or they could not be made."""
        if self._overview is None or insight != self._overview_version:
            return None
        try:
            return self._overview.result()
        except (ValueError, OSError) as exc:  # SqlError: the page asks again and says why
            log.info("%s: Explore's figures not made in the background: %s", self.health.path, exc)
            return None

    def _load_searcher(self) -> Searcher:
        from indices.search import (
            Searcher,
        )  # faiss and pyarrow: imported by this thread so the first page shows first

        path = self.health.path
        spec = read_collection_json(path).get("clip_model", TINY_NAME)
        # the encoder process loads CLIP meanwhile, in parallel with the index
        clip = encoder(spec)
        threading.Thread(target=_warm, args=(clip,), daemon=True).start()
        searcher = Searcher(path, encoder=clip, columns=None)
        for m in (
            searcher.modalities()
        ):  # FAISS indices and embedding stores, now rather than at the first query
            searcher.index(m)
        return searcher

    def _load_catalog(self) -> Catalog:
        from curation.catalog import (
            Catalog,
        )  # DuckDB and pandas: imported by this thread so the first page shows first

        return Catalog(self.health.path, untrusted=True).start()

    def searcher_ready(self) -> bool:
        return self._searcher is not None and self._searcher.done()

    def searcher(self) -> Searcher:
        """The searcher (waits for it); ValueError when the collection has no index."""
        if self._searcher is None:
            raise ValueError("; ".join(self.health.problems) or f"{self.health.path}: no index")
        return self._searcher.result()

    def catalog(self) -> Catalog:
        """The sandboxed catalog (waits for it): every query the pages run goes through it."""
        if self._catalog is None:
            raise ValueError("; ".join(self.health.problems) or f"{self.health.path}: no metadata")
        return self._catalog.result()


@st.cache_resource(show_spinner=False, max_entries=16)
def loaded(path: str, signature: tuple) -> Loaded:
    """The resources of a collection as built now (a new signature after a rebuild loads anew)."""
    return Loaded(inspect(path))


# ---- per session ---------------------------------------------------------------------------
@dataclass
class Current:
    """What a page works on: the chosen collection, what it has, and its resources."""

    path: str
    health: Health
    resources: Loaded | None

    def searcher(self) -> Searcher:
        assert self.resources is not None
        if not self.resources.searcher_ready():
            with st.spinner("Loading the index, metadata rows and CLIP model…"):
                return self.resources.searcher()
        return self.resources.searcher()

    def catalog(self) -> Catalog:
        assert self.resources is not None
        with st.spinner("Starting the SQL sandbox…"):
            return self.resources.catalog()


def open_collections(paths: list[str], data_roots: list[str] | None = None) -> None:
    """Session start: the collections given on the command line (or the demo's), and the data
    roots (`--data-root`; default those collections), fixed for the session: a collection
    opened later does not widen them."""
    if COLLECTIONS not in st.session_state:
        st.session_state[COLLECTIONS] = [location(p) for p in paths] or [DEFAULT_COLLECTION]
    if ROOTS not in st.session_state:
        st.session_state[ROOTS] = roots_of(data_roots or st.session_state[COLLECTIONS])


def data_roots() -> tuple[str, ...]:
    """The session's data roots (set by `open_collections`, which every page runs first)."""
    return tuple(st.session_state.get(ROOTS) or ())


def current() -> Current:
    """The collection chosen in the sidebar, inspected now, its resources loading or loaded."""
    paths = st.session_state.get(COLLECTIONS) or [DEFAULT_COLLECTION]
    path = st.session_state.get(CURRENT) or paths[0]
    health = inspect(path)
    resources = loaded(path, health.signature) if (health.queryable or health.searchable) else None
    return Current(path, health, resources)


def show_problems(health: Health, need: str = "") -> None:
    """The collection's missing stages, each with its command, as messages on the page."""
    for p in health.problems:
        (st.error if not health.exists or not health.queryable else st.warning)(p)
    if need:
        st.info(need)
