"""Where target taxa live on LILA, and what else lives there (animl-ml's "find rat locations" notebook).

For the ``--taxon`` names given, every (dataset, location) with at least one image of them, and every
class seen at those locations with its image count: the classes a model trained for those places must
tell apart from the targets. Classes are the rows' values at ``label_rank``; rows named only above it
(and blanks, humans, vehicles) keep their own LILA name, so nothing seen at a location is hidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from classification.data.lila.index import Dataset
from classification.data.lila.select import SelectionOptions, base_where, label_sql, taxon_sql
from classification.data.lila.table import connect, table_columns
from classification.data.lila.taxa import Taxonomy, check_rank
from classification.errors import UserError
from classification.io import write_csv_atomic

LOCATION_COLUMNS = ["dataset", "location", "label", "images", "is_target", "target_images", "location_images"]


def species_locations(parquet_path: Path, datasets: Mapping[str, Dataset], taxonomy: Taxonomy,
                      options: SelectionOptions) -> pd.DataFrame:
    """One row per (location holding a target, class seen there): its images, and the location's totals."""
    if not options.taxa:
        raise UserError("--taxon: give at least one taxon whose locations to find")
    check_rank(options.label_rank)
    columns = table_columns(parquet_path)
    base = base_where(options, datasets)
    taxon, taxon_params = taxon_sql(options, taxonomy, columns)
    label = f"coalesce({label_sql(options.label_rank, columns)}, nullif(common_name, ''), lower(trim(original_label)))"
    frame = connect().execute(
        f"""
        WITH rows AS (SELECT dataset_name, location_id, image_id, {label} AS label, ({taxon}) AS is_target
                      FROM read_parquet(?) WHERE {base.sql()}),
             places AS (SELECT dataset_name, location_id, count(DISTINCT image_id) AS target_images
                        FROM rows WHERE is_target GROUP BY ALL),
             totals AS (SELECT dataset_name, location_id, count(DISTINCT image_id) AS location_images
                        FROM rows JOIN places USING (dataset_name, location_id) GROUP BY ALL)
        SELECT r.dataset_name, r.location_id, r.label, count(DISTINCT r.image_id) AS images, bool_or(r.is_target) AS is_target,
               any_value(p.target_images) AS target_images, any_value(t.location_images) AS location_images
        FROM rows r JOIN places p USING (dataset_name, location_id) JOIN totals t USING (dataset_name, location_id)
        GROUP BY r.dataset_name, r.location_id, r.label
        ORDER BY target_images DESC, r.dataset_name, r.location_id, images DESC, r.label
        """, [*taxon_params, str(parquet_path), *base.params]).df()
    if frame.empty:
        raise UserError(f"no LILA location holds {', '.join(options.taxa)} under the options given")
    short = {name: dataset.short_name for name, dataset in datasets.items()}
    frame["location"] = [_location_name(d, loc, short.get(d, d)) for d, loc in zip(frame["dataset_name"], frame["location_id"])]
    frame["dataset"] = [short.get(d, d) for d in frame["dataset_name"]]
    return frame[LOCATION_COLUMNS].reset_index(drop=True)


def _location_name(dataset_name: str, location_id: str, short: str) -> str:
    """The subset's location name (``<short_name>/<location>``), as ``lila_subset_cct.json`` writes it."""
    if location_id == dataset_name:
        return f"{short}/(no locations)"
    return f"{short}/{location_id.split(' : ', 1)[1] if location_id.startswith(dataset_name + ' : ') else location_id}"


def write_locations(frame: pd.DataFrame, path: Path) -> None:
    write_csv_atomic(path, frame)
