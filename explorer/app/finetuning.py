"""The Explorer page's "Fine-tune" tab: fine-tune the configuration on screen into a new checkpoint
(``python -m explorer.finetune`` as a detached process, like the sidebar's training form: same
permission switch, one run at a time, live progress and ETA in the sidebar), and the downloads of
a fine-tuned checkpoint's compressed export. The checks and the launcher are
:func:`explorer.app.support.finetune_problem` and :func:`explorer.app.support.launch_finetune`."""
from __future__ import annotations

import streamlit as st

from .. import checkpoints as ckpt
from ..clustering import ClusteringConfig
from . import sidebar
from . import support as sup

FLASH_KEY = "ft.flash"
METHOD_LABELS = {"plain": "Fine-tune", "distill": "Fine-tune + distillation"}


def _selected_info(ckpt_dir) -> ckpt.CheckpointInfo | None:
    """The picked checkpoint's listing entry; None for this session's upload."""
    key = st.session_state.get("ckpt") or ""
    if key.startswith(sup.UPLOAD_PREFIX):
        return None
    return next((i for i in ckpt.list_checkpoints(ckpt_dir) if i.name == key), None)


def section(model, config: ClusteringConfig) -> None:
    """The tab's content for the picked checkpoint (``model``: its loaded ResNet20) and the
    configuration the sliders show. A configuration that cannot be fine-tuned gets one st.error
    saying why and what to do, and no form."""
    ss = st.session_state
    ckpt_dir = sup.checkpoint_dir()
    st.markdown("**Fine-tune this configuration**")
    st.caption("Trains the clustered net for a few epochs with its clusters tied (each centroid moves by the mean "
               "of its members' gradients), so it stays exactly as small. The result is a new checkpoint in the "
               "picker, with its compressed export (.pt, .json, .onnx) in the Downloads tab. Runs `python -m "
               "explorer.finetune` in the background; progress and ETA show in the sidebar.")
    flash = ss.pop(FLASH_KEY, None)
    if flash:
        st.success(flash, icon=":material/model_training:")
    if not sidebar.training_enabled():
        st.caption(f"Disabled on this server. Enable with `{sup.ENV_ALLOW_TRAINING}=1` or `allow_training = true` "
                   "under `[explorer]` in `.streamlit/secrets.toml`; or download the configuration (Downloads tab) "
                   "and run `python -m explorer.finetune --config FILE` yourself.")
        return
    info = _selected_info(ckpt_dir)
    problem = sup.finetune_problem(info, config, model)
    if problem:
        st.error(f"This configuration cannot be fine-tuned: {problem}", icon=":material/block:")
        return
    n = len(config.active)
    parts = [f"{n}: k = {k}" for n, k in config.active.items()]
    parts += [f"stage-{s} residual stream: k = {k}" for s, k in config.active_stream.items()]
    st.caption(f"{n} layer{'s' if n != 1 else ''}" + (f" and {len(config.active_stream)} residual streams"
                                                     if config.active_stream else "")
               + " clustered (" + ", ".join(parts) + f"); {config.metric}, {config.granularity}{', BN folded' if config.fold_bn else ''}, "
               f"space {config.space}, recovery {config.recovery}.")
    with st.form("finetune_form"):
        a, b = st.columns(2)
        epochs = a.number_input("Epochs", 1, sup.MAX_EPOCHS, 30, key="ft.epochs",
                                help="30 gave the shipped p58 net (about 8 min an epoch on 2 CPU cores, seconds on a GPU)")
        lr = b.number_input("Peak learning rate", 0.0005, 0.5, 0.02, step=0.005, format="%.4f", key="ft.lr",
                            help="Half an epoch of warm-up, then cosine to 0 (0.02 beat 0.05 by 0.2 points)")
        method = st.radio("Method", list(sup.FINETUNE_METHODS), format_func=METHOD_LABELS.__getitem__, key="ft.method",
                          horizontal=True, help="; ".join(f"{METHOD_LABELS[k]}: {v}" for k, v in sup.FINETUNE_METHODS.items()))
        c, d = st.columns(2)
        alpha = c.slider("Distillation weight α", 0.05, 1.0, 0.7, 0.05, key="ft.distill",
                         help="With distillation: loss = (1 - α) CE + α T² KL(teacher || student)")
        temperature = d.number_input("Temperature T", 0.5, 20.0, 4.0, step=0.5, key="ft.temperature",
                                     help="With distillation: softens both nets' logits")
        name = st.text_input("Name", sup.default_finetune_name(info.name, ckpt_dir), max_chars=64,
                             key=f"ft.name.{info.name}", help="Writes checkpoints/<name>.pt and .json; must not exist yet")
        go = st.form_submit_button("Start fine-tuning", type="primary", key="ft.submit")
    if go:
        distill = float(alpha) if method == "distill" else 0.0
        try:
            rec = sup.launch_finetune(info, config, name.strip(), int(epochs), distill, float(temperature), float(lr),
                                      model=model, ckpt_dir=ckpt_dir)
        except sup.LaunchError as e:
            st.error(str(e), icon=":material/error:")
            return
        ss[FLASH_KEY] = (f"Started fine-tuning `{rec.name}` (pid {rec.pid}); log: `{rec.log}`. It appears in the "
                         "checkpoint picker after its first epoch.")
        st.rerun(scope="app")  # the sidebar (outside this fragment) shows the run's progress


def export_downloads(name: str) -> None:
    """Download buttons for checkpoint ``name``'s compressed export, when a fine-tuning run wrote one
    (:func:`explorer.app.support.finetune_export`); nothing otherwise."""
    if st.session_state.get("ckpt") != name:  # an upload of the same name is not that checkpoint
        return
    files = sup.finetune_export(sup.checkpoint_dir(), name)
    if not files:
        return
    st.markdown("**Compressed export of this fine-tuned checkpoint**")
    cols = st.columns(len(files) + 1)
    cols[0].download_button("All files (.zip)", lambda: sup.export_zip(files, name), f"{name}.compressed.zip",
                            "application/zip", on_click="ignore", width="stretch", key="ft.export.zip",
                            help="The structurally smaller net as written by fine-tuning: .pt + .json specs + .onnx")
    mime = {".pt": "application/octet-stream", ".json": "application/json", ".onnx": "application/octet-stream"}
    for col, path in zip(cols[1:], files):
        col.download_button(path.suffix, path.read_bytes, path.name, mime[path.suffix], on_click="ignore",
                            width="stretch", key=f"ft.export{path.suffix}")
    st.caption("Load the .pt with `explorer.compress.load_compressed` (keep the .json beside it); the .onnx runs "
               "in onnxruntime.")
