"""ResNet20 filter-clustering explorer: ``streamlit run streamlit_app.py``.

The router: page config, the title and the Explorer / Analysis switch, the shared sidebar
(:mod:`explorer.app.sidebar`), and ``st.navigation`` over one module per page
(:mod:`explorer.app.explorer_page`, :mod:`explorer.app.analysis_page`). The URL's ``page``
parameter picks the page (``?page=analysis``), so a shared link opens the page it was copied from;
the view state and its URL form live in :mod:`explorer.app.state`.
"""
import os

import streamlit as st
import torch

from explorer.app import analysis_page, explorer_page, sidebar, state

st.set_page_config(page_title="ResNet20 filter clustering explorer", page_icon=":material/scatter_plot:",
                   layout="wide", initial_sidebar_state="expanded")


@st.cache_resource(show_spinner=False)
def init_process() -> int:
    """Once per server process: the torch thread count (``EXPLORER_THREADS``, else torch's default)."""
    n = os.environ.get("EXPLORER_THREADS", "").strip()
    if n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


init_process()
st.title("ResNet20 filter clustering explorer")
page, query, page_warns = state.split_page(state.query_dict())
state.keep_explorer_state()  # the explorer's widgets are not drawn on every page (run)
state.page_switch(page)
ctx = sidebar.render(query, page_warns)

pages = {name: st.Page(lambda render=module.render: render(ctx), title=state.PAGES[name], url_path=name,
                       default=name == page)
         for name, module in (("explorer", explorer_page), ("analysis", analysis_page))}
current = st.navigation(list(pages.values()), position="hidden")
if current is not pages[page]:
    # The switch changed ?page= in its callback, but the rerun still names the page it came from.
    st.switch_page(pages[page], query_params=state.query_dict())
if not ctx.names:
    st.info("Train one with `python -m explorer.train` (see the README), or enable training from the app below.")
    with st.sidebar:
        sidebar.training_form(ctx.ckpt_dir)
else:
    current.run()
