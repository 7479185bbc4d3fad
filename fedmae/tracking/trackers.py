"""Where a run's figures go: TensorBoard event files, an MLflow store, or nowhere.

One small interface, :class:`Tracker` (scalars by step, markdown text, PNG figures, close), and
:func:`open_tracker`, which picks what ``tracking.backend`` names. Offline by default: TensorBoard
writes ``tensorboard/`` in the run's folder; MLflow a local store in ``mlruns/`` there (SQLite
metadata and artifact files: MLflow 3 made SQLite its default and refuses its old plain-file store),
or the store that ``tracking.uri`` names. MLflow's usage telemetry is switched off.

A tracker writes nothing until the first thing is logged, so it can be opened before the run has
checked and claimed its folder, and a missing package is reported then, before training starts.
A run that resumes continues its curves: a (tag, step) it has already logged is not logged again
(a resumed run recomputes the same figures, wall-clock times aside); a run that starts afresh in
its folder starts its curves afresh. Nothing here runs at a federated site: sites never track.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import yaml

from fedmae import __version__
from fedmae.config import ExperimentConfig, is_uri

INSTALL = "pip install fedmae[tracking]"
TENSORBOARD_DIR = "tensorboard"  # in the run's folder
MLFLOW_DIR = "mlruns"  # the run's local MLflow store: mlflow.db and artifacts/
PARAM_CHARS = 500  # MLflow's limit for a parameter's value in its older stores; the full config is an artifact
PARAMS_PER_CALL = 100  # MLflow's limit per log_batch call
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")


class TrackingError(ValueError):
    """Tracking cannot start (its package is missing, its store cannot be opened): one line naming the fix."""


class Tracker(Protocol):
    """Where one run's figures go. Tags are ``/``-separated names, the same in every backend."""

    def log_metrics(self, step: int, metrics: Mapping[str, float | None], prefix: str = "") -> None:
        """Scalars at ``step``, named ``prefix/name``; None and non-finite values are left out."""

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown: a table, the config."""

    def log_image(self, tag: str, png: Path, step: int = 0) -> None:
        """A figure, from its PNG file."""

    def close(self, failed: bool = False) -> None:
        """Flush and end the run (``failed``: it stopped on an error); closing twice is harmless."""

    def __enter__(self) -> Tracker: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None: ...


class NoTracker:
    """``tracking.backend: none``: every call does nothing."""

    def log_metrics(self, step: int, metrics: Mapping[str, float | None], prefix: str = "") -> None:
        pass

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def log_image(self, tag: str, png: Path, step: int = 0) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass

    def __enter__(self) -> NoTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        self.close(failed=kind is not None)


def open_tracker(cfg: ExperimentConfig, run_dir: str | Path, command: str, *, resume: bool) -> Tracker:
    """The tracker ``cfg.tracking`` asks for, for the run in ``run_dir``; nothing is written before
    the first thing is logged. ``command``: what the run is (``pretrain``, ``federated``, ...), its
    name unless ``tracking.run_name`` gives one. ``resume``: the run continues where its folder
    left off (its curves continue); else it starts afresh (so do its curves).
    Raises :class:`TrackingError` when the backend's package is missing or its store cannot be opened."""
    backend = cfg.tracking.backend
    if backend == "tensorboard":
        return TensorBoardTracker(cfg, Path(run_dir), command, resume)
    if backend == "mlflow":
        return MLflowTracker(cfg, Path(run_dir), command, resume)
    return NoTracker()


def check_tracking(cfg: ExperimentConfig) -> None:
    """Raise :class:`TrackingError` now when the backend's package is missing: for a run whose
    tracker opens in another process (the ServerApp), so the user hears of it before anything starts."""
    if cfg.tracking.backend == "tensorboard":
        _tensorboard()
    elif cfg.tracking.backend == "mlflow":
        _mlflow()


def for_nested_run(cfg: ExperimentConfig, name: str, root: str | Path | None = None) -> ExperimentConfig:
    """The config of a run that is part of a larger one (a comparison's arm): named
    ``<run name>/<name>``, and with MLflow kept in the local store of ``root`` (unless
    ``tracking.uri`` names one), so that a comparison's runs are one store. TensorBoard runs stay
    in their own folders: ``tensorboard --logdir <root>`` shows them together."""
    t = cfg.tracking
    if t.backend == "none":
        return cfg  # a comparison without tracking runs exactly the config it was given
    uri = t.uri
    if uri is None and root is not None and t.backend == "mlflow":
        uri = str(Path(root).absolute() / MLFLOW_DIR)  # a folder: its local store
    named = dataclasses.replace(t, run_name=f"{t.run_name or cfg.name}/{name}", uri=uri)
    return dataclasses.replace(cfg, tracking=named)


def prepare_store(cfg: ExperimentConfig, root: str | Path) -> None:
    """Create, now, the MLflow store and experiment that the runs nested under ``root``
    (:func:`for_nested_run`) write to: runs that start at once in several processes then only
    open it (two processes creating one SQLite store race)."""
    if cfg.tracking.backend == "mlflow":
        _connect(cfg, *mlflow_store(for_nested_run(cfg, "", root).tracking.uri, Path(root)))


def clean_tag(tag: str) -> str:
    """A tag both backends take: letters, digits, ``_ - . /`` and spaces; others become ``_``."""
    cleaned = "".join(c if c in _TAG_CHARS else "_" for c in tag)
    return "/".join(part for part in cleaned.split("/") if part)


# ---- what both backends share -------------------------------------------------------------------


class _Backend:
    """Opens on the first call, skips what the run logged already, cleans names."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, command: str, resume: bool):
        self.cfg, self.run_dir, self.command, self.resume = cfg, run_dir.absolute(), command, resume
        self.name = cfg.tracking.run_name or f"{cfg.name}/{command}"
        self._logged: dict[str, set[int]] | None = None  # tag -> steps already logged; None until opened
        self._closed = False

    # The backend's own part.
    def _open(self) -> dict[str, set[int]] | None:
        """Start writing; what the run logged before when it continues, else None (a new run)."""
        raise NotImplementedError

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _text(self, tag: str, text: str, step: int) -> None:
        raise NotImplementedError

    def _image(self, tag: str, png: Path, step: int) -> None:
        raise NotImplementedError

    def _finish(self, failed: bool) -> None:
        raise NotImplementedError

    def _describe(self) -> None:
        """A new run records what it is: its name, command, folder and resolved config."""
        raise NotImplementedError

    # The interface.
    def log_metrics(self, step: int, metrics: Mapping[str, float | None], prefix: str = "") -> None:
        values = {}
        for key, value in metrics.items():
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            tag = clean_tag(f"{prefix}/{key}")
            if self._fresh(tag, step):
                values[tag] = float(value)
        if values:
            self._scalars(step, values)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        tag = clean_tag(tag)
        if self._fresh(tag, step):
            self._text(tag, text, step)

    def log_image(self, tag: str, png: Path, step: int = 0) -> None:
        tag = clean_tag(tag)
        if self._fresh(tag, step):
            self._image(tag, Path(png), step)

    def close(self, failed: bool = False) -> None:
        if self._logged is not None and not self._closed:
            self._finish(failed)
        self._closed = True

    def __enter__(self) -> _Backend:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        self.close(failed=kind is not None)

    def _fresh(self, tag: str, step: int) -> bool:
        """Whether (tag, step) is new to the run, opening the run on the first call."""
        if self._closed:
            raise RuntimeError(f"tracker of {self.run_dir} used after close")
        if self._logged is None:
            logged = self._open()
            self._logged = logged if logged is not None else {}
            if logged is None:
                self._describe()
        steps = self._logged.setdefault(tag, set())
        if step in steps:
            return False
        steps.add(step)
        return True

    def _config_yaml(self) -> str:
        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)


# ---- TensorBoard --------------------------------------------------------------------------------


def _tensorboard() -> ModuleType:
    return _require("torch.utils.tensorboard", "tensorboard", "tensorboard")


class TensorBoardTracker(_Backend):
    """Event files in ``<run>/tensorboard/``, flushed at every call (a crash loses nothing logged)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, command: str, resume: bool):
        super().__init__(cfg, run_dir, command, resume)
        self.folder = self.run_dir / TENSORBOARD_DIR
        self._summary_writer = _tensorboard().SummaryWriter
        self.writer: Any = None

    def _open(self) -> dict[str, set[int]] | None:
        logged = tensorboard_steps(self.folder) if self.resume else None
        if not self.resume and self.folder.exists():
            shutil.rmtree(self.folder)  # a run that starts afresh: the previous attempt's curves go with its metrics
        self.writer = self._summary_writer(str(self.folder))
        return logged or None

    def _describe(self) -> None:
        self._text("run", f"**{self.name}**: `fedmae {self.command}` in `{self.run_dir}`, fedmae {__version__}", 0)
        # Indented: markdown shows it as code, the YAML as written.
        self._text("config", "\n".join(f"    {line}" for line in self._config_yaml().splitlines()), 0)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def _text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def _image(self, tag: str, png: Path, step: int) -> None:
        from matplotlib.image import imread

        self.writer.add_image(tag, imread(png), step, dataformats="HWC")  # RGB(A) floats in [0, 1]
        self.writer.flush()

    def _finish(self, failed: bool) -> None:
        self.writer.close()


def tensorboard_steps(folder: Path) -> dict[str, set[int]]:
    """The steps of every scalar, text and image tag in the event files of ``folder``."""
    if not any(folder.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    steps = {tag: {e.step for e in events.Scalars(tag)} for tag in tags.get("scalars", [])}
    steps.update({tag: {e.step for e in events.Images(tag)} for tag in tags.get("images", [])})
    # add_text stores "<tag>/text_summary" as a tensor.
    steps.update({tag.removesuffix("/text_summary"): {e.step for e in events.Tensors(tag)}
                  for tag in tags.get("tensors", [])})
    return steps


# ---- MLflow -------------------------------------------------------------------------------------


def _mlflow() -> ModuleType:
    # Offline: MLflow 3 sends usage telemetry unless told not to. Set before mlflow is imported.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow = _require("mlflow", "mlflow", "mlflow")
    # Creating a SQLite store runs MLflow's schema migrations, each logged at INFO.
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return mlflow


def mlflow_store(uri: str | None, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location of a new experiment) for ``tracking.uri`` and a run in
    ``run_dir``: a local store (``mlflow.db`` and ``artifacts/``) in ``<run_dir>/mlruns`` (null)
    or in the folder ``uri`` names; a URI as given, a SQLite file keeping its artifacts beside it
    (MLflow's own default would be ./mlruns in whatever folder the process runs in)."""
    if uri is None or not is_uri(uri):
        folder = Path(uri).expanduser().absolute() if uri else run_dir.absolute() / MLFLOW_DIR
        return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        database = Path(uri.removeprefix("sqlite:///")).expanduser().absolute()
        return uri, (database.parent / "artifacts").as_uri()
    return uri, None


def _connect(cfg: ExperimentConfig, uri: str, artifacts: str | None) -> tuple[Any, str]:
    """(client, experiment id) of ``cfg.name`` in the store at ``uri``, created if new."""
    _mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(cfg.name)
        if found is None:
            try:
                return client, client.create_experiment(cfg.name, artifact_location=artifacts)
            except MlflowException:  # another process created it meanwhile
                found = client.get_experiment_by_name(cfg.name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return client, found.experiment_id
    except (MlflowException, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(f"tracking.uri: cannot open the MLflow store {uri} ({first_line}); check the URI, or "
                            "leave tracking.uri null for a local store in the run's folder") from None


class MLflowTracker(_Backend):
    """One MLflow run in experiment ``cfg.name``: metrics by step, the config as parameters and
    ``config.yaml``, text as ``<tag>.md`` and figures as ``<tag>.png`` artifacts. A resumed run
    continues the MLflow run of its folder (tag ``fedmae.run_key``)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, command: str, resume: bool):
        super().__init__(cfg, run_dir, command, resume)
        _mlflow()  # a missing package is refused now, before training
        self.uri, self.artifacts = mlflow_store(cfg.tracking.uri, self.run_dir)
        self.client: Any = None
        self.experiment_id = self.run_id = ""
        if cfg.tracking.uri is not None:
            self._reach()  # a store outside the run's folder: an unusable one is refused before training

    def _reach(self) -> None:
        if self.client is None:
            self.client, self.experiment_id = _connect(self.cfg, self.uri, self.artifacts)

    @property
    def run_key(self) -> str:
        """Names the run's folder in a filter (a path may hold quotes)."""
        return hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:20]

    def _open(self) -> dict[str, set[int]] | None:
        self._reach()
        if self.resume:
            previous = self.client.search_runs([self.experiment_id], f"tags.`fedmae.run_key` = '{self.run_key}'",
                                               order_by=["attributes.start_time DESC"], max_results=1)
            if previous:
                self.run_id = previous[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return {key: {m.step for m in self.client.get_metric_history(self.run_id, key)}
                        for key in previous[0].data.metrics}
        tags = {"fedmae.command": self.command, "fedmae.run_dir": str(self.run_dir), "fedmae.run_key": self.run_key,
                "fedmae.seed": str(self.cfg.seed), "fedmae.version": __version__}
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags).info.run_id
        return None

    def _describe(self) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:PARAM_CHARS]) for key, value in _flat(self.cfg.to_dict())]
        for start in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start:start + PARAMS_PER_CALL])
        self.client.log_text(self.run_id, self._config_yaml(), "config.yaml")

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in values.items()])

    def _text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.md")

    def _image(self, tag: str, png: Path, step: int) -> None:
        folder, _, leaf = tag.rpartition("/")
        with tempfile.TemporaryDirectory() as scratch:  # the artifact takes the file's name: the tag's
            named = shutil.copyfile(png, Path(scratch) / f"{leaf}.png")
            self.client.log_artifact(self.run_id, str(named), artifact_path=folder or None)

    def _finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield clean_tag(f"{prefix}{key}"), value


def _require(module: str, package: str, backend: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingError(f"tracking.backend: {backend} needs the {package} package, which is not installed; "
                            f"{INSTALL}") from None
