"""Public camera-trap data from LILA (lila.science): its index files, a columnar copy of its
all-images table, selection by taxon and place, subsets as CCT plus MegaDetector boxes.

- ``index``: LILA's three index files, fetched once into a metadata folder, and their columns;
- ``table``: the all-images CSV (millions of rows) converted once to Parquet and queried with DuckDB;
- ``taxa``: names (common, scientific, any rank) resolved against the taxonomy mapping;
- ``select``: the rows a user asks for, mapped to one taxonomic level and capped, seeded;
- ``subset``: the selection written as a CCT file and a MegaDetector file, and downloaded;
- ``locations``: where target taxa live and what else lives there.
"""
