"""UI helpers for the Streamlit app: Altair chart builders and display formatting (:mod:`.charts`),
and the app's Analysis page (:mod:`.analysis_page`).

Only :mod:`.analysis_page` imports Streamlit (it draws a whole page); :mod:`.charts` does not, and
``streamlit_app.py`` wires it to widgets.
"""
