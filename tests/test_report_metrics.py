"""The report's metric tables: splits as columns, dead/alive figures named with their definition."""

import pandas as pd

from medsae.report.build import metric_tables
from medsae.report.names import DEAD_ALIVE_DEFINITIONS


def test_dead_and_alive_rows_say_what_they_count_and_splits_are_ordered():
    rows = [
        ("evaluate", "dead_fraction", "test", 0.05),
        ("evaluate", "dead_fraction", "train", 0.01),
        ("evaluate", "dead_fraction", "val", 0.08),
        ("evaluate", "fvu", "val", 0.3),
        ("summarize", "latents_dead", "val", 0.04),
    ]
    metrics = pd.DataFrame(rows, columns=["stage", "name", "split", "value"]).assign(target=None, n_features=None)
    (scalars,) = metric_tables(metrics)
    assert scalars["columns"] == ["stage", "name", "train", "val", "test"]
    by_name = {r[1].split(":")[0]: r for r in scalars["rows"]}
    assert by_name["dead_fraction"][1] == f"dead_fraction: {DEAD_ALIVE_DEFINITIONS['dead_fraction']}"
    assert by_name["dead_fraction"][2:] == [0.01, 0.08, 0.05]
    assert by_name["latents_dead"][1].endswith(DEAD_ALIVE_DEFINITIONS["latents_dead"])
    assert by_name["fvu"][1] == "fvu"  # other metrics keep their bare name
