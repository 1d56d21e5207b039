"""SQL: a query box on the collection's sandboxed catalog (table `samples`). One SELECT, time,
memory and row limits, taken-down rows invisible; errors are shown as they are. The result is
converted for the page once, by `webui.tables.for_display` (row and byte caps counted before
anything is converted, every DuckDB type shown or written as text), and is dropped when the
takedown list changes after the query ran. The session keeps only what the page shows (those
rows, and the ids of the first ones for the grid: a `key` column's by one sandboxed lookup of
those keys, never the collection's keys); a download runs the query again. The same query runs
as `python -m curation.sql COLLECTION "..." --untrusted`."""

from __future__ import annotations

import pyarrow as pa
import streamlit as st

from collection import schema as S
from collection.takedown import list_signature
from webui import components, grid, state, tables

EXAMPLE = "SELECT status, count(*) AS n FROM samples GROUP BY status ORDER BY n DESC"
RESULT = "sql_result"
#: result rows shown as thumbnails when the result has an `id` or `key` column
GRID_ROWS = 200


def _ids_of_keys(cur: state.Current, keys: list[str]) -> list[int]:
    """The global ids of `keys`, in their order, by one sandboxed query: no key of the
    collection comes into the app (a key that is not an embedded, visible row is left out)."""
    wanted = [k for k in dict.fromkeys(keys) if "\x00" not in k]
    if not wanted:
        return []
    listed = ", ".join("'" + k.replace("'", "''") + "'" for k in wanted)
    found = cur.catalog().query(
        f"SELECT {S.KEY}, {S.ID} FROM samples WHERE {S.ID} IS NOT NULL AND {S.KEY} IN ({listed})",
        client=state.session_id(),
    )
    ids = dict(zip(found.table.column(0).to_pylist(), found.table.column(1).to_pylist()))
    return [int(ids[k]) for k in wanted if k in ids]


def result_ids(cur: state.Current, table: pa.Table) -> list[int]:
    """The global ids of a result's first GRID_ROWS rows, from its `id` column, else its `key`
    column; [] when it has neither."""
    if "id" in table.column_names:
        ids = table.column("id").slice(0, GRID_ROWS).to_pylist()
        return [int(i) for i in ids if i is not None]
    if S.KEY in table.column_names:
        keys = table.column(S.KEY).slice(0, GRID_ROWS).to_pylist()
        return _ids_of_keys(cur, [str(k) for k in keys if k is not None])
    return []


def _run(cur: state.Current, sql: str) -> None:
    """Run `sql` and keep what the page shows of it (the converted rows, the note, the grid's
    ids), not the result: a download runs the query again."""
    listed = list_signature(cur.path)  # before the query: a change during it drops the result
    try:
        result = cur.catalog().query(sql, client=state.session_id())
        table = result.table
        ids = result_ids(cur, table) if cur.health.searchable else []
    except ValueError as exc:  # SqlError: a refused or failed statement, one line
        st.session_state[RESULT] = {"path": cur.path, "sql": sql, "error": str(exc)}
        return
    note = f"{table.num_rows:,} rows in {result.seconds * 1000:.0f} ms"
    if result.truncated:
        note += " (cut at the row cap: add a LIMIT or aggregate)"
    st.session_state[RESULT] = {
        "path": cur.path,
        "sql": sql,
        "note": note,
        "shown": tables.for_display(table),
        "ids": ids,
        "ids_from": "id" if "id" in table.column_names else S.KEY,
        "takedown": listed,
    }


def _download(cur: state.Current, sql: str, fmt: str) -> bytes:
    """The query's result as a file, run again when the download is asked for (outside the
    page's run: no spinner)."""
    assert cur.resources is not None
    return tables.download(cur.resources.catalog().query(sql).table, fmt)


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
    view = shown["shown"]
    st.caption("; ".join(n for n in (shown["note"], view.note()) if n))
    st.dataframe(view.frame, hide_index=True)
    ids = shown["ids"]
    if ids:
        st.caption(
            f"The first {len(ids)} rows as thumbnails (from the result's `{shown['ids_from']}` "
            "column):"
        )
        try:
            rows = cur.searcher().records(ids)
        except ValueError as exc:  # QueryError: an `id` column that is not the vector's id
            st.warning(f"`id` column: {exc}; select the samples' own `id` to see thumbnails.")
        else:
            grid.show(rows, key="sql-grid", path=cur.path, source="sql")
            grid.notice()
    sql_run = shown["sql"]
    c1, c2 = st.columns(2)
    c1.download_button(
        "CSV",
        data=lambda: _download(cur, sql_run, "csv"),
        file_name="query.csv",
        mime="text/csv",
        key="sql_download_csv",
    )
    c2.download_button(
        "parquet",
        data=lambda: _download(cur, sql_run, "parquet"),
        file_name="query.parquet",
        mime="application/octet-stream",
        key="sql_download_parquet",
    )


render()
