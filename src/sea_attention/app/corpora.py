"""Texts by ``datasets`` name: ``wikitext-2``, ``wikitext-103`` or any dataset id with a text column.

The paper's language-modelling protocol (WikiText): the raw configuration (``wikitext-2-raw-v1``),
the rows of a split joined with ``"\\n\\n"`` into one text, tokenised without BOS, scored in
non-overlapping windows (``sea eval``'s default stride). A local dataset folder (parquet, json, csv
files named by split) loads through the same ``datasets.load_dataset`` call as a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

#: short names -> (dataset id, configuration)
DATASET_ALIASES = MappingProxyType({
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
})
JOIN = "\n\n"
DATA_FORMS = (f"'wiki', 'bbc', a text file, {', '.join(DATASET_ALIASES)} or any `datasets` id (or local dataset "
              "folder) with a text column")  # what --data accepts


@dataclass(frozen=True)
class DatasetText:
    """One split of a ``datasets`` corpus, joined into a single text."""

    name: str  # an alias of DATASET_ALIASES, a hub id or a local dataset folder
    split: str = "test"
    config: str | None = None  # default: the alias's, else the dataset's own
    text_column: str = "text"

    def resolved(self) -> tuple[str, str | None]:
        """(dataset id or folder, configuration)."""
        path, config = DATASET_ALIASES.get(self.name, (self.name, None))
        return path, self.config or config


def load_dataset_text(source: DatasetText) -> str:
    """The split's ``text_column`` rows joined with ``"\\n\\n"``; a ``ValueError`` naming the dataset when
    it cannot be loaded (no such dataset, split or column, or the hub out of reach)."""
    import datasets

    path, config = source.resolved()
    about = f"dataset {path!r}" + (f" (config {config!r})" if config else "")
    try:
        rows = datasets.load_dataset(path, config, split=source.split)
    except ConnectionError as error:
        raise ValueError(f"could not load {about}: the Hugging Face hub cannot be reached ({error}); "
                         "download it where there is internet, or pass a local dataset folder (--data takes "
                         f"{DATA_FORMS})") from error
    except (FileNotFoundError, ValueError) as error:  # DatasetNotFoundError is a FileNotFoundError
        raise ValueError(f"could not load {about}, split {source.split!r}: {error} (--data takes {DATA_FORMS})") from error
    if source.text_column not in rows.column_names:
        raise ValueError(f"{about} has no column {source.text_column!r}: its columns are {rows.column_names}; "
                         "name one with --text-column")
    return JOIN.join(rows[source.text_column])
