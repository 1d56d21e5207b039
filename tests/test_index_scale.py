"""Index pieces for 10M rows and beyond (issue 22): row files grouped so the number of memory
maps does not follow the number of parts; a list count that keeps its training sample inside
the memory budget, trained by two-level k-means; the exact re-rank bounded by a setting; a
budget too small for any index; the parallel 10M writer's exact answers."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.synthetic import clustered_vectors, write_collection
from bench.synthetic_scale import exact_truth, held_out_queries, write_scale_collection
from collection import schema as S
from collection.embeddings import EmbeddingStore, read_block
from indices import build_parts, exact, rows
from indices.build import build_one, main as build_main
from indices.search import Searcher
from indices.select import (
    MIN_PER_LIST,
    TRAIN_SHARE,
    choose_index,
    nlist_for,
    parse_bytes,
)
from indices.tune import QUANTIZER_EF_MIN, exact_topk, quantizer_ef, sweep_settings

DIM = 16


def _coll(root: str, parts: int = 5, per: int = 300) -> str:
    img = [clustered_vectors(per, DIM, 10, seed=i) for i in range(parts)]
    return write_collection(
        root, img, [clustered_vectors(per, DIM, 10, seed=50 + i) for i in range(parts)]
    )


def _arrow_files(root: str) -> list[str]:
    return sorted(f for f in os.listdir(S.CollectionLayout(root).rows_dir) if f.endswith(".arrow"))


def test_row_files_are_one_per_group_of_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(rows, "PARTS_PER_FILE", 2)
    root = _coll(str(tmp_path / "c"))
    store = rows.RowStore.open(root)
    assert _arrow_files(root) == [rows.group_name(g) for g in range(3)]  # 5 parts, 3 maps
    ids = np.array([1499, 0, 301, 900, 299])
    keys = store.take(ids, [S.KEY]).column(0).to_pylist()
    assert keys == [f"{i // 300:03d}{i % 300:06d}" for i in ids]
    # a part rewritten: only its group's file is written again
    layout = S.CollectionLayout(root)
    before = {f: os.path.getmtime(os.path.join(layout.rows_dir, f)) for f in _arrow_files(root)}
    table = pq.ParquetFile(layout.metadata(3)).read()
    caption = table.schema.get_field_index(S.CAPTION)
    new = table.set_column(caption, S.CAPTION, pa.array(["changed"] * table.num_rows))
    os.utime(layout.metadata(3), (1, 1))
    pq.write_table(new, layout.metadata(3))
    again = rows.RowStore.open(root)
    after = {f: os.path.getmtime(os.path.join(layout.rows_dir, f)) for f in _arrow_files(root)}
    changed = [f for f in after if after[f] != before[f]]
    assert changed == [rows.group_name(1)]
    assert again.take(np.array([900]), [S.CAPTION]).column(0).to_pylist() == ["changed"]
    assert again.take(np.array([600]), [S.CAPTION]).column(0).to_pylist() == ["caption 600"]


def test_old_per_part_row_files_are_replaced(tmp_path):
    root = _coll(str(tmp_path / "c"), parts=2)
    folder = S.CollectionLayout(root).rows_dir
    os.makedirs(folder)
    for n in range(2):
        open(os.path.join(folder, S.rows_name(n)), "wb").close()
    rows.RowStore.open(root)
    assert _arrow_files(root) == [rows.group_name(0)]


def test_list_count_keeps_the_training_sample_in_budget():
    n, dim = 10_000_000, 512
    assert nlist_for(n, dim) == 16384  # 4·sqrt(n), with no budget
    budget = parse_bytes("4G")
    nlist = nlist_for(n, dim, budget)
    assert (
        MIN_PER_LIST * nlist * dim * 4 <= TRAIN_SHARE * budget < MIN_PER_LIST * 2 * nlist * dim * 4
    )
    choice = choose_index(n, dim, "4G", ivf=True)
    assert f"IVF{nlist}_" in choice.index_key and "PQ" in choice.index_key
    assert build_parts.train_size(n, nlist) >= MIN_PER_LIST * nlist


def test_two_level_training_gives_a_full_quantizer(tmp_path, monkeypatch):
    monkeypatch.setattr(build_parts, "TWO_LEVEL_MIN", 16)
    root = _coll(str(tmp_path / "c"), parts=2, per=1000)
    store = EmbeddingStore.open(root)
    index = build_parts.train_index(store, "IVF64,PQ4x8", 64, 0)
    ivf = faiss.extract_index_ivf(index)
    assert index.is_trained and ivf.quantizer.ntotal == 64
    index.add(store.gather(np.arange(store.count)))
    ivf.nprobe = 64
    q = store.gather(np.arange(0, 2000, 97))
    _, found = index.search(q, 1)
    assert (found[:, 0] == np.arange(0, 2000, 97)).mean() > 0.9


def test_re_rank_is_bounded_by_its_setting(tmp_path):
    root = _coll(str(tmp_path / "c"), parts=2, per=1000)
    build_one(root, S.MODALITY_IMAGE, index_key="IVF8,PQ2x4", target_recall=0.0, max_query_ms=1e6)
    store = EmbeddingStore.open(root)
    q = store.gather(np.array([5]))[0]
    q /= np.linalg.norm(q)  # as the searcher normalises it
    exact = store.gather(np.arange(store.count)) @ q

    def sims(rerank_max):
        res = Searcher(root, rerank_max=rerank_max).query(embedding=q, k=20, deduplicate=False)
        return np.array([r["id"] for r in res]), np.array([r["similarity"] for r in res])

    ids, s = sims(None)  # a local collection: re-ranked exactly
    np.testing.assert_allclose(s, exact[ids], atol=1e-5)
    ids0, s0 = sims(0)  # off: the index's own (PQ) scores
    assert not np.allclose(s0, exact[ids0], atol=1e-3)
    ids5, s5 = sims(5)  # the index's best 5 candidates re-scored and first, the others not
    np.testing.assert_allclose(s5[:5], exact[ids5[:5]], atol=1e-5)
    assert list(s5[:5]) == sorted(s5[:5], reverse=True)
    assert not np.allclose(s5[5:], exact[ids5[5:]], atol=1e-3)
    assert Searcher(root).rerank_max > 0


def test_a_budget_too_small_for_any_index_is_one_line(tmp_path, capsys):
    root = _coll(str(tmp_path / "c"), parts=1)
    with pytest.raises(SystemExit) as e:
        build_main([root, "--max-index-memory", "1k", "--modality", "image"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "fits in 1024 bytes" in err[0] and "--max-index-memory" in err[0]
    assert not os.path.exists(S.CollectionLayout(root).index_json(S.MODALITY_IMAGE))


def test_parallel_writer_exact_answers_match_a_scan(tmp_path):
    root, truth = str(tmp_path / "c"), str(tmp_path / "truth")
    q = held_out_queries(7, DIM, 20)
    write_scale_collection(root, 3000, 3, DIM, 2, q, 10, truth, n_clusters=20)
    store = EmbeddingStore.open(root)
    assert store.count > 2900 and store.parts == [0, 1, 2]
    np.testing.assert_array_equal(exact_truth(root, truth), exact_topk(store, q, 10))


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


def test_a_pass_over_every_part_leaves_no_mapped_pages_resident(tmp_path):
    """An exact scan (the build's tuning truth) reads every part; at 10M rows the parts'
    mapped pages stayed in the build driver's RSS (11 GB). Parts are read, not mapped, there."""
    per, dim = 8192, 512
    img = [clustered_vectors(per, dim, 10, seed=i) for i in range(8)]  # 64 MB of float16
    root = write_collection(str(tmp_path / "c"), img, img)
    store = EmbeddingStore.open(root, S.MODALITY_IMAGE)
    before = _rss_file_kb()
    total = sum(float(x[:, 0].sum()) for _, x in store.iter_parts())
    grown_mb = (_rss_file_kb() - before) / 1024
    assert np.isfinite(total)
    assert grown_mb < 16, f"{grown_mb:.0f} MB of the parts' pages stayed mapped"
    # gathering rows still goes through the maps (and reads the same values)
    ids = np.array([0, per + 5, 7 * per + 1])
    np.testing.assert_array_equal(
        store.gather(ids), np.concatenate([x for _, x in store.iter_parts()])[ids]
    )


def test_an_hnsw_quantizer_is_searched_wide_in_tuning_and_widened_probes():
    """ef 2 x nprobe missed some of the nearest lists at 10M (recall capped near 0.94); the tuner
    and the widened probe of large-k searches share one wider rule."""
    settings = sweep_settings("IVF8192_HNSW32,PQ128x8", 8192, True)
    assert settings and all(
        s["quantizer_efSearch"] == quantizer_ef(s["nprobe"]) >= max(4 * s["nprobe"], 256)
        for s in settings
    )
    assert QUANTIZER_EF_MIN == 256 and quantizer_ef(1) == 256 and quantizer_ef(128) == 512
    assert exact.quantizer_ef is quantizer_ef
    assert all("quantizer_efSearch" not in s for s in sweep_settings("IVF256,PQ16x8", 256, True))


def test_sampled_rows_are_read_without_mapping_them_and_dropped_pages_are_released(tmp_path):
    """A training sample of one row in 30 mapped (by fault-around) nearly every page at 10M;
    rows read by pread are the same values and leave the maps untouched, and `drop_pages`
    releases what a timed gather mapped."""
    per, dim = 8192, 512
    img = [clustered_vectors(per, dim, 10, seed=i) for i in range(8)]  # 64 MB of float16
    root = write_collection(str(tmp_path / "c"), img, img)
    store = EmbeddingStore.open(root, S.MODALITY_IMAGE)
    before = _rss_file_kb()
    ids, x = store.sample(len(img) * per // 30, seed=3)
    assert (_rss_file_kb() - before) / 1024 < 4, "sampling mapped the parts' pages"
    np.testing.assert_array_equal(x, store.gather(ids))  # the same rows, read through the maps
    assert (_rss_file_kb() - before) / 1024 > 32, "the gather should have mapped pages"
    store.drop_pages()
    assert (_rss_file_kb() - before) / 1024 < 4, "drop_pages left the gathered pages mapped"


def test_populate_maps_only_the_rows_asked_for(tmp_path):
    """The tuner's latency measure maps one query's candidate rows before re-scoring them and
    drops them after: the pages mapped are those rows' (not the parts'), and then none."""
    per, dim = 8192, 512
    img = [clustered_vectors(per, dim, 10, seed=i) for i in range(4)]  # 32 MB of float16
    root = write_collection(str(tmp_path / "c"), img, img)
    store = EmbeddingStore.open(root, S.MODALITY_IMAGE)
    before = _rss_file_kb()
    store.populate(np.arange(4) * per)  # each part's first row
    grown_kb = _rss_file_kb() - before
    # the kernel maps around each page it maps: 64 KB on a disk, a 2 MB huge page on tmpfs
    assert 0 < grown_kb <= 4 * 2048 + 64, f"{grown_kb} KB of 32 MB mapped for 4 rows"
    store.drop_pages()
    assert _rss_file_kb() - before < 64


def test_a_pass_in_blocks_reads_the_rows_without_mapping_them(tmp_path):
    """Scoring a concept streams every part in blocks; through the maps that left 10 GB of the
    10M collection resident in the driver."""
    per, dim = 8192, 512
    img = [clustered_vectors(per, dim, 10, seed=i) for i in range(4)]  # 32 MB of float16
    root = write_collection(str(tmp_path / "c"), img, img)
    store = EmbeddingStore.open(root, S.MODALITY_IMAGE)
    before = _rss_file_kb()
    blocks = [read_block(a, lo, lo + 3000) for a in store.arrays for lo in range(0, per, 3000)]
    assert (_rss_file_kb() - before) / 1024 < 4, "the blocks were read through the maps"
    whole = np.concatenate([x for _, x in store.iter_parts(S.EMB_DTYPE)])
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
