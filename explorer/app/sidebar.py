"""The sidebar every page shares: the checkpoint picker (shipped checkpoints, ones in training and
this session's upload), the uploader, live training progress and broken-checkpoint notices; and
the "train a new checkpoint" form the Explorer page adds at its bottom. :func:`render` also reads
the URL into the widgets on a session's first run (:mod:`.state`) and returns what the pages need."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from .. import checkpoints as ckpt
from . import charts, state
from . import support as sup


@dataclass
class Context:
    """What the shared part of a run found, for the page: the checkpoint directory and its listing,
    the usable checkpoints by name and their picker labels, this session's upload (or None) and the
    explorer's view from the URL."""

    ckpt_dir: Path
    infos: list
    by_name: dict
    labels: dict
    upload: sup.UploadedCheckpoint | None
    view: state.ViewState

    @property
    def names(self) -> list[str]:
        return list(self.labels)

    @property
    def selected(self) -> str | None:
        return st.session_state.get("ckpt")


def on_upload() -> None:
    """The uploader changed: validate the file (:func:`explorer.app.support.check_upload`) and keep it
    in this session only, selected in the picker; an invalid file leaves the session's checkpoints
    as they were."""
    ss = st.session_state
    f = ss.get("upload")
    ss.pop("upload_error", None)
    previous = ss.pop("uploaded", None)
    if f is None:  # removed from the uploader
        if previous is not None and ss.get("ckpt") == previous.key:
            ss.pop("ckpt", None)
        return
    try:
        up = sup.check_upload(f.name, f.getvalue())
    except sup.UploadError as e:
        ss["upload_error"] = str(e)
        if previous is not None and ss.get("ckpt") == previous.key:
            ss.pop("ckpt", None)
        return
    ss["uploaded"] = up
    ss["ckpt"] = up.key


def checkpoint_signature(infos) -> tuple:
    return tuple((i.name, i.complete, i.training, i.error is None) for i in infos)


def run_signature(infos, launch: sup.LaunchRecord | None) -> tuple:
    """What changes the sidebar outside the progress fragment: the checkpoint listing and whether
    the app's last launch is alive (when it ends, the page shows how)."""
    return checkpoint_signature(infos) + (launch is not None and launch.alive,)


def ended_launch_message(launch: sup.LaunchRecord | None, infos, ckpt_dir: Path, within_s: float = 86_400) -> str | None:
    """For the app's last launch that ended in the last ``within_s`` seconds without a complete
    checkpoint: one line saying so, with the last line of its log (its error); else None."""
    if launch is None or launch.alive or time.time() - launch.started > within_s:
        return None
    if any(i.name == launch.name and i.complete for i in infos):
        return None
    last = next((l for l in reversed(sup.tail(launch.log, 20).splitlines()) if l.strip()), "")
    return (f"The {launch.what} run **{launch.name}** started from the app ended before finishing"
            + (f": `{last.strip()[:300]}`" if last else "") + f" (log: `{launch.log}`)")


@st.fragment(run_every=5)
def training_progress(ckpt_dir: str, signature: tuple) -> None:
    """Live progress of running trainers and fine-tuning runs; re-runs every 5 s. When a run starts
    or ends, the whole page re-runs so that the checkpoint picker shows it."""
    infos = ckpt.list_checkpoints(ckpt_dir)
    rec = sup.last_launch()
    if run_signature(infos, rec) != signature:
        st.rerun()
    shown = False
    for info in infos:
        if not info.training:
            continue
        shown = True
        run_progress(info.name, info.status or {}, "fine-tuning" if "finetune" in info.meta else "training",
                     int(info.meta.get("epochs") or 1))
    if rec is not None and rec.alive and not any(i.name == rec.name and i.training for i in infos):
        shown = True
        status = sup.live_status(Path(ckpt_dir), rec.name)
        if status is not None:  # in its first epoch: no metadata yet, so not in the picker
            run_progress(rec.name, status, rec.what, 1)
            st.caption("It appears in the checkpoint picker after its first epoch.")
        else:
            st.caption(f"Starting **{rec.name}** ({rec.what}, pid {rec.pid}){PREPARING.get(rec.kind, '')}; "
                       "its progress shows here once its first status is written.")
        log = sup.tail(rec.log, 3)
        if log:
            st.code(log, language=None)
    if not shown:
        st.caption("No training run in progress.")


# What a run does before its first status: fine-tuning clusters the net and evaluates it first.
PREPARING = {"finetune": ": clustering the base net and evaluating it before and after clustering on the test split"}


def run_progress(name: str, status: dict, what: str, epochs_default: int) -> None:
    """A progress bar and caption (latest test top-1, ETA, age) of one running run's status file."""
    s = status
    epoch, epochs = float(s.get("epoch") or 0), int(s.get("epochs") or epochs_default)
    eta = s.get("eta_seconds")
    age = time.time() - float(s.get("updated") or time.time())
    st.progress(min(1.0, epoch / max(1, epochs)), text=f"**{name}** {what}: epoch {epoch:.1f}/{epochs}")
    bits = []
    if s.get("test_top1") is not None:
        monitor = "fp32, compressed net" if what == "fine-tuning" else "bf16 monitor"
        bits.append(f"latest test top-1 {charts.pct(s['test_top1'])} ({monitor})")
    if eta:
        bits.append(f"ETA {int(eta) // 3600} h {int(eta) % 3600 // 60:02d} min")
    bits.append(f"updated {int(age)} s ago")
    st.caption(" · ".join(bits))


def training_enabled() -> bool:
    try:
        secrets = st.secrets.to_dict() if hasattr(st.secrets, "to_dict") else dict(st.secrets)
    except Exception:  # no secrets.toml
        secrets = {}
    return sup.training_enabled(secrets)


def training_form(ckpt_dir: Path) -> None:
    """The "Train a new checkpoint" expander (off unless enabled on the server)."""
    with st.expander("Train a new checkpoint"):
        if not training_enabled():
            st.caption(f"Disabled on this server. Enable with `{sup.ENV_ALLOW_TRAINING}=1` or `allow_training = true` "
                       "under `[explorer]` in `.streamlit/secrets.toml`; or run `python -m explorer.train` yourself.")
            return
        with st.form("train_form"):
            epochs = st.number_input("Epochs", 1, sup.MAX_EPOCHS, 90, key="train.epochs")
            seed = st.number_input("Seed", 0, 2**31 - 1, 1, key="train.seed")
            name = st.text_input("Name", "resnet20_seed1", max_chars=64, key="train.name",
                                 help="Writes checkpoints/<name>.pt and .json; must not exist yet")
            go = st.form_submit_button("Start training", type="primary", key="train.submit")
        if go:
            try:
                rec = sup.launch_training(name.strip(), int(epochs), int(seed), ckpt_dir)
            except sup.LaunchError as e:
                st.error(str(e))
            else:
                st.success(f"Started `{name}` (pid {rec.pid}); log: `{rec.log}`")


def stream_sliders(limit_of: dict[int, int] | None = None) -> None:
    """One "stream k" slider per stage (widget keys ``s.<stage>``, :func:`explorer.app.state.s_key`):
    the coupled clustering of that stage's residual-stream channels, shared by every conv that
    writes it (:func:`explorer.clustering.cluster_stream`). Drawn in the sidebar by the Explorer
    page next to the per-layer sliders. ``limit_of``: each stage's largest k that can be
    clustered (:func:`explorer.limits.stream_limits`). A configuration the sliders cannot express
    (no fold_bn, a stage below the shortcut's minimum, a writer's own k as well) is shown with the
    library's one-line reason by the page, not clamped here."""
    from ..clustering import stream_min_k
    from ..model import STREAM_STAGES, stream_width, stream_writers

    ss = st.session_state
    with st.sidebar, st.expander("Residual stream (needs fold BatchNorm)", expanded=False):
        stream = {s: int(ss.get(state.s_key(s), stream_width(s))) for s in STREAM_STAGES}
        for s in STREAM_STAGES:
            w = stream_width(s)
            limit = (limit_of or {}).get(s, w)
            lo = stream_min_k(s, {t: k for t, k in stream.items() if k < stream_width(t)})
            st.slider(f"stream k, stage {s} ({w} channels" + (f", at most {limit}" if limit < w else "") + ")",
                      1, w, key=state.s_key(s),
                      help=f"Cluster the {w} channels of stage {s}'s residual stream into k, with one assignment "
                           f"shared by {', '.join(stream_writers(s))}; the stream itself narrows to k channels. "
                           + (f"The option-A shortcut needs k >= {lo} here (one more than stage {s - 1}'s count). "
                              if s > 1 else "")
                           + f"{w} leaves it unchanged; those layers' own k must then stay at {w}.")


def render(query: dict, warns: list[str]) -> Context:
    """The checkpoint part of the sidebar. ``query`` is the URL without ``page``; on the session's
    first run it is written into the widgets and its ``warns`` (with the URL's own) are shown."""
    ss = st.session_state
    ckpt_dir = sup.checkpoint_dir()
    infos = ckpt.list_checkpoints(ckpt_dir)
    usable = sup.usable_checkpoints(infos)
    by_name = {i.name: i for i in usable}
    labels = {i.name: sup.checkpoint_label(i) for i in usable}
    upload = ss.get("uploaded")  # this session's uploaded checkpoint (memory only), if any
    if upload is not None and upload.key not in by_name:
        labels[upload.key] = upload.label
    names = list(labels)

    view, url_warns = state.parse_query(query, names)
    if not ss.get("_initialised"):
        state.put_view(view, only_missing=False)
        ss["_initialised"] = True
        for w in url_warns + warns:
            st.warning(w, icon=":material/link_off:")
    else:
        state.put_view(view, only_missing=True)
    if ss.get("ckpt") not in labels and names:
        ss["ckpt"] = names[0]

    with st.sidebar:
        st.header("Checkpoint")
        if not names:
            st.error(f"No usable checkpoint in `{ckpt_dir}`.")
        else:
            st.selectbox("Checkpoint", names, key="ckpt", format_func=labels.__getitem__,
                         label_visibility="collapsed")
            st.caption(labels[ss["ckpt"]])
        st.file_uploader(f"Upload a checkpoint (.pt, at most {sup.MAX_UPLOAD_MB} MB)", type=["pt"], key="upload",
                         on_change=on_upload, max_upload_size=sup.MAX_UPLOAD_MB,
                         help="A ResNet20 state dict (`torch.save(model.state_dict(), 'name.pt')`). It is checked "
                              "(loaded without running any code from the file), kept in this browser session's "
                              "memory only, and neither saved on the server nor shown to anyone else.")
        if ss.get("upload_error"):
            st.error(ss["upload_error"], icon=":material/error:")
        launch = sup.last_launch()
        if any(i.training for i in infos) or (launch and launch.alive):
            training_progress(str(ckpt_dir), run_signature(infos, launch))
        ended = ended_launch_message(launch, infos, ckpt_dir)
        if ended:
            st.warning(ended, icon=":material/warning:")
        for bad in (i for i in infos if i.error):
            st.error(f"{bad.name}: {bad.error}", icon=":material/error:")
    return Context(ckpt_dir, infos, by_name, labels, upload, view)
