"""The collection layer: what a Sieve collection is and how every stage reads and writes it.

The layout and column names (`schema`), atomic writes and JSON on any fsspec URL (`storage`),
complete parts and metadata (`parts`), embedding stores (`embeddings`), the img2dataset source
shards (`shards`), samples' images read back from them (`images`), the takedown list
(`takedown`) and the SQL sandbox (`sandbox`). It sits under every other folder and imports none
of them.
"""
