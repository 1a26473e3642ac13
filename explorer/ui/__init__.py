"""UI helpers for the Streamlit app: Altair chart builders and display formatting (:mod:`.charts`).

Nothing in this package imports Streamlit; ``streamlit_app.py`` wires these to widgets.
"""
