"""SQL: a query box on the collection's sandboxed catalog (table `samples`). One SELECT, time,
memory and row limits, taken-down rows invisible; errors are shown as they are. The result is
converted for the page once, by `webui.tables.for_display` (row and byte caps counted before
anything is converted, every DuckDB type shown or written as text), and is dropped when the
takedown list changes after the query ran. The same query runs as
`python -m curation.sql COLLECTION "..." --untrusted`."""

from __future__ import annotations

import streamlit as st

from collection.takedown import list_signature
from webui import components, state, tables

EXAMPLE = "SELECT status, count(*) AS n FROM samples GROUP BY status ORDER BY n DESC"
RESULT = "sql_result"


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
