"""The web attacks of `bench.security_web` (takedown bypass, UI paths, server bodies, UI type
rendering), each run in the suite against a small generated collection: every one must hold."""

from __future__ import annotations

import pytest

from bench.security_lab import ATTACKS, CATEGORIES
from bench.security_web import web_attacks
from bench.synthetic import clustered_vectors, write_collection

NAMES = [name for _, name, _ in ATTACKS]


@pytest.fixture(scope="module")
def attacks(tmp_path_factory) -> dict:
    from indices.build import build

    base = tmp_path_factory.mktemp("web-attacks")
    coll = str(base / "collection")
    write_collection(
        coll, [clustered_vectors(300, 16, 6, seed=0)], [clustered_vectors(300, 16, 6, seed=1)]
    )
    build(coll)
    return {name: (category, run) for category, name, run in web_attacks(coll, base / "work")}


def test_the_list_covers_every_category_with_enough_attacks(attacks):
    assert len(NAMES) == len(set(NAMES)) >= 35
    assert {category for category, _ in attacks.values()} == set(CATEGORIES)


@pytest.mark.parametrize("name", NAMES)
def test_the_attack_is_held(attacks, name):
    category, run = attacks[name]
    held, detail = run()
    assert held, f"{category}: {name}: {detail}"
