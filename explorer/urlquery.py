"""Reading URL query values: Streamlit gives a key's values as a string or a list of strings (a
key repeated in the URL); the last one wins, as in a browser's ``URLSearchParams.get`` order of
overrides. Shared by :meth:`explorer.clustering.ClusteringConfig.from_query` and the app."""
from __future__ import annotations


def last_value(value, limit: int | None = None) -> str:
    """The last of a query parameter's values as a string ("" for an empty list), cut to ``limit``
    characters when given, so that a hostile URL cannot make later parsing slow."""
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else ""
    text = str(value)
    return text if limit is None else text[:limit]
