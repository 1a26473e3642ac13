"""The Streamlit app (``streamlit_app.py`` is its router): one module per page
(:mod:`.explorer_page`, :mod:`.analysis_page`), the shared sidebar (:mod:`.sidebar`), the view state
and its URL form (:mod:`.state`), Altair charts and display formatting (:mod:`.charts`), and what
the pages need besides widgets (:mod:`.support`: checkpoint listing, uploads, downloads, the
training launcher). Only this package imports Streamlit; no maths happens here."""
