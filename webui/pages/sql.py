"""SQL: a query box on the collection's sandboxed catalog (table `samples`). One SELECT, time,
memory and row limits, taken-down rows invisible; errors are shown as they are. The result is
converted for the page once, by `webui.tables.for_display` (row and byte caps counted before
anything is converted, every DuckDB type shown or written as text), and is dropped when the
takedown list changes after the query ran. The same query runs as
`python -m curation.sql COLLECTION "..." --untrusted`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import streamlit as st

from collection import schema as S
from collection.takedown import list_signature
from curation.vectors import read_keys
from webui import components, grid, state, tables

EXAMPLE = "SELECT status, count(*) AS n FROM samples GROUP BY status ORDER BY n DESC"
RESULT = "sql_result"
#: result rows shown as thumbnails when the result has an `id` or `key` column
GRID_ROWS = 200


@st.cache_resource(max_entries=4, show_spinner=False)
def _keys(path: str, signature: tuple) -> np.ndarray:
    """Every embedded row's key in global-id order (a key's id is its position), shared."""
    return read_keys(path)


def result_ids(cur: state.Current, table: pa.Table) -> list[int]:
    """The global ids of a result's first GRID_ROWS rows, from its `id` column, else its `key`
    column; [] when it has neither."""
    if "id" in table.column_names:
        ids = table.column("id").slice(0, GRID_ROWS).to_pylist()
        return [int(i) for i in ids if i is not None]
    if S.KEY in table.column_names:
        wanted = [str(k) for k in table.column(S.KEY).slice(0, GRID_ROWS).to_pylist()]
        keys = _keys(cur.path, cur.health.signature)
        found = np.flatnonzero(np.isin(keys, wanted))
        rank = {k: r for r, k in enumerate(wanted)}
        return sorted(found.tolist(), key=lambda i: rank.get(keys[i], len(rank)))
    return []


def _run(cur: state.Current, sql: str) -> None:
    listed = list_signature(cur.path)  # before the query: a change during it drops the result
    try:
        result = cur.catalog().query(sql, client=state.session_id())
    except ValueError as exc:  # SqlError: a refused or failed statement, one line
        st.session_state[RESULT] = {"path": cur.path, "sql": sql, "error": str(exc)}
        return
    st.session_state[RESULT] = {
        "path": cur.path,
        "sql": sql,
        "result": result,
        "shown": tables.for_display(result.table),
        "takedown": listed,
    }


def render() -> None:
    st.title("SQL")
    cur = components.collection_sidebar()
    if not cur.health.queryable:
        state.show_problems(cur.health)
        return
    st.caption(
        "Table `samples`: every metadata column and `id`, "
        "the vector's global id. Sandboxed: one SELECT, "
        f"a time and memory limit, at most {cur.catalog().row_cap:,} rows back."
    )
    with st.expander("Columns"):
        st.code(", ".join(cur.catalog().columns), language=None, wrap_lines=True)
    sql = st.text_area("Query", value=EXAMPLE, key="sql_text", height=120)
    if st.button("Run", key="sql_run", type="primary"):
        _run(cur, sql)
    shown = st.session_state.get(RESULT)
    if not shown or shown["path"] != cur.path:
        return
    if "error" in shown:
        st.error(shown["error"])
        return
    if list_signature(cur.path) != shown["takedown"]:
        st.session_state.pop(RESULT, None)
        st.info("The takedown list changed since this query ran: run it again.")
        return
    result = shown["result"]
    table = result.table
    note = f"{table.num_rows:,} rows in {result.seconds * 1000:.0f} ms"
    if result.truncated:
        note += " (cut at the row cap: add a LIMIT or aggregate)"
    view = shown["shown"]
    st.caption("; ".join(n for n in (note, view.note()) if n))
    st.dataframe(view.frame, hide_index=True)
    ids = result_ids(cur, table) if cur.health.searchable else []
    if ids:
        st.caption(
            f"The first {len(ids)} rows as thumbnails (from the result's "
            f"`{'id' if 'id' in table.column_names else S.KEY}` column):"
        )
        try:
            rows = cur.searcher().records(ids)
        except ValueError as exc:  # QueryError: an `id` column that is not the vector's id
            st.warning(f"`id` column: {exc}; select the samples' own `id` to see thumbnails.")
        else:
            grid.show(rows, key="sql-grid", path=cur.path, source="sql")
            grid.notice()
    c1, c2 = st.columns(2)
    c1.download_button(
        "CSV",
        data=lambda: tables.download(table, "csv"),
        file_name="query.csv",
        mime="text/csv",
        key="sql_download_csv",
    )
    c2.download_button(
        "parquet",
        data=lambda: tables.download(table, "parquet"),
        file_name="query.parquet",
        mime="application/octet-stream",
        key="sql_download_parquet",
    )


render()
