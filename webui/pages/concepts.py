"""Concepts: placeholder until its curation API lands on main."""

from __future__ import annotations

import streamlit as st

st.title("Concepts")
st.info("Not yet available.")
