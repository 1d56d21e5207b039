"""Label sets kept in the collection (`curation.labels`), the grid's label merging
(`webui.labelling.merge`), its cards (`webui.grid.items`) and the hidden-results note."""

from __future__ import annotations

import json
import os

import pytest

from collection import schema as S
from collection.parts import read_metadata
from curation.concept import main as concept_main
from curation.concept_probe import load_concept, saved_concepts
from curation.labels import load_labels, save_labels
from webui.grid import hidden_counts, items, weak_flags
from webui.labelling import merge


def test_a_label_set_round_trips_and_is_no_concept(tmp_path):
    coll = str(tmp_path)
    assert load_labels(coll, "red") == {}
    url = save_labels(coll, "red", {"a": 1, "b": 0, "c": 1})
    assert url == S.InsightLayout(coll).concept_labels("red") and os.path.exists(url)
    assert load_labels(coll, "red") == {"a": 1, "b": 0, "c": 1}
    doc = json.load(open(url))
    assert doc["positives"] == ["a", "c"] and doc["negatives"] == ["b"]
    assert saved_concepts(coll) == []  # red.labels.json is not a fitted concept


@pytest.mark.parametrize("name", ["../x", "", ".hidden", "a b"])
def test_a_bad_name_is_refused_and_nothing_written(tmp_path, name):
    with pytest.raises(ValueError, match="concept name"):
        save_labels(str(tmp_path), name, {"a": 1})
    assert not os.path.exists(S.InsightLayout(str(tmp_path)).concepts_dir)


def test_a_damaged_or_foreign_file_is_named(tmp_path):
    coll = str(tmp_path)
    url = S.InsightLayout(coll).concept_labels("red")
    os.makedirs(os.path.dirname(url))
    open(url, "w").write("{not json")
    with pytest.raises(ValueError, match="red.labels.json: not a label set"):
        load_labels(coll, "red")
    open(url, "w").write(json.dumps({"kind": "sieve-concept"}))
    with pytest.raises(ValueError, match="red.labels.json: not a label set"):
        load_labels(coll, "red")
    assert open(url).read() == json.dumps({"kind": "sieve-concept"})  # left as it was


def test_merge_keeps_the_newest_label_of_each_key():
    labels, times = {}, {}
    assert merge(labels, times, {"a": [1, 10], "b": [0, 11]})
    assert labels == {"a": 1, "b": 0}
    # another grid's older label of "a" loses; its newer "b" wins
    assert merge(labels, times, {"a": [0, 5], "b": [1, 12]})
    assert labels == {"a": 1, "b": 1}
    assert not merge(labels, times, {"a": [1, 10], "b": [1, 12]})  # resent: nothing new
    assert merge(labels, times, {"a": [None, 13]}) and labels == {"b": 1}  # taken back
    assert merge(labels, times, {"c": [0, None]}) and labels == {"b": 1, "c": 0}  # t None: always
    assert not merge(labels, times, {"d": "junk", "e": [2, 20], "f": [1, "x"]})
    assert labels == {"b": 1, "c": 0}


def test_cards_flag_weak_results_and_carry_their_rows(monkeypatch):
    from webui import grid

    monkeypatch.setattr(grid, "row_thumbnails", lambda rows: [grid.Thumb(None, "gone")] * len(rows))
    rows = [
        {"id": 1, "key": "k1", "caption": "a red circle", "similarity": 0.8, "punsafe": 0.1},
        {"id": 2, "key": "k2", "caption": "zebra", "similarity": 0.6, "odd": float("nan")},
    ]
    cards = items(rows, weak_below=0.68)
    # the best clears the bar: the page holds a real match, nothing is flagged
    assert [c["weak"] for c in cards] == [False, False]
    weak_page = [{**rows[0], "similarity": 0.65}, rows[1]]
    assert [c["weak"] for c in items(weak_page, weak_below=0.68)] == [True, True]
    assert weak_flags([None, 0.5], 0.68) == [False, True]
    assert weak_flags([], 0.68) == [] and weak_flags([0.7, 0.1], 0.68) == [False, False]
    assert cards[0]["details"]["caption"] == "a red circle" and cards[1]["why"] == "gone"
    assert "similarity 0.800" in cards[0]["line"] and "nsfw 0.10" in cards[0]["line"]
    json.dumps(cards, allow_nan=False)  # what the browser gets is plain JSON
    assert not any(c["weak"] for c in items(rows, weak_below=None))


def test_hidden_counts_name_each_cause():
    unfiltered = [
        {"id": 1},
        {"id": 2, "punsafe": 0.9},
        {"id": 3, "pwatermark": 0.95},
        {"id": 4},
        {"id": 5, "punsafe": 0.9, "pwatermark": 0.95},
    ]
    shown = [{"id": 1}]
    assert hidden_counts(shown, unfiltered, safe=True, hide_wm=True) == {
        "safe mode": 2,
        "watermark": 1,
        "dedup / filter": 1,
    }
    assert hidden_counts(shown, unfiltered, safe=False, hide_wm=False) == {"dedup / filter": 4}


def test_the_concept_command_fits_from_the_saved_label_set(insight_collection, capsys):
    coll = insight_collection["collection"]
    meta = read_metadata(coll, [S.KEY, "watermark"]).to_pylist()
    pos = [r[S.KEY] for r in meta if r["watermark"]][:4]
    neg = [r[S.KEY] for r in meta if not r["watermark"]][:4]
    with pytest.raises(SystemExit):  # no label set saved yet: refused, named
        concept_main([coll, "wm-labels", "--labels"])
    assert "no label set saved for concept 'wm-labels'" in capsys.readouterr().err
    save_labels(coll, "wm-labels", {**{k: 1 for k in pos}, **{k: 0 for k in neg}})
    concept_main([coll, "wm-labels", "--labels", "--suggest", "2"])
    out = json.loads(capsys.readouterr().out)
    assert out["concept"].endswith("wm-labels.json")
    concept = load_concept(coll, "wm-labels")
    assert sorted(concept.positives) == sorted(pos) and sorted(concept.negatives) == sorted(neg)
