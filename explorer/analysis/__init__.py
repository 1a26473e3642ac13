"""Analyses over many configurations, as functions: the per-layer sensitivity sweep
(:mod:`.sensitivity`), the budgeted search (:mod:`.search`), the report (:mod:`.report`) with its
charts (:mod:`.charts`), the benchmark (:mod:`.benchmark`), and their resumable result files
(:mod:`.results`). The CLIs and the app's Analysis page call them."""
