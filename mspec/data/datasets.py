"""Opens prepared TFDS datasets (array_record, no TensorFlow), building them on first use.

A dataset is named ``"<name>/<config>"`` (e.g. ``"qm9/full"``, ``"qm9/sample"``). Datasets live in
``data_dir`` (default ``$MSPEC_DATA_DIR`` or ``~/tensorflow_datasets``). A missing dataset is
built automatically (with a progress bar) when its builder needs no user files; TFDS writes into
an ``incomplete.*`` directory and renames it only when complete, so an interrupted build never
leaves a dataset that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
from typing import Any

import tensorflow_datasets as tfds


class DatasetError(RuntimeError):
    """A dataset is missing, incomplete or corrupt."""


def default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("MSPEC_DATA_DIR", "~/tensorflow_datasets"))


# Builders are plug-ins: the package that defines one announces it under this entry-point group
# (this repository's in setup.py: ``qm9 = data_pipelines.qm9:QM9``, ...), so the library names
# no builder module and imports one only when its dataset is opened (RDKit stays unimported
# until then). :func:`register_builder` adds one at run time.
ENTRY_POINT_GROUP = "mspec.datasets"
_registered: dict[str, Any] = {}


def register_builder(name: str, builder_class) -> None:
    """Makes ``builder_class`` (a TFDS ``GeneratorBasedBuilder``) the builder of datasets
    ``"<name>/<config>"``, ahead of any installed entry point of that name."""
    _registered[name] = builder_class


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)  # the first installation on the path wins, like imports
    return found


def known_datasets() -> list[str]:
    """Names of every registered or installed dataset builder."""
    return sorted({*_registered, *_entry_points()})


def _builder_class(name: str):
    if name in _registered:
        return _registered[name]
    installed = _entry_points()
    if name not in installed:
        if not installed:
            raise DatasetError(
                f"unknown dataset {name!r}: no dataset builders are installed (entry-point group "
                f"{ENTRY_POINT_GROUP!r}); install this repository with `pip install -e .`, or "
                "call mspec.data.datasets.register_builder"
            )
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known_datasets()}")
    try:
        return installed[name].load()
    except (ImportError, AttributeError) as e:
        raise DatasetError(
            f"dataset {name!r}: cannot import its builder {installed[name].value} ({e})"
        ) from e


def get_builder(dataset: str, data_dir: str | None = None, build: bool = True,
                manual_dir: str | None = None, **builder_kwargs):
    """Returns a prepared TFDS builder for ``dataset`` ("name/config[:version]"), building it if
    needed. Without a version, the builder's current one; an older supported version (e.g.
    ``qm9s/gfn2_qm9train:1.0.0``, the spectra set before it grew) is built as that version.

    ``builder_kwargs`` go to the builder's constructor, e.g. ``source_dir=`` (the directory holding
    the user's raw files, for builders that need them) or ``num_workers=``. ``manual_dir`` is
    TFDS's manual-download directory (the MD17 builder reads the user's npz files from it).

    Raises:
      DatasetError: the name is unknown, the dataset is missing and ``build`` is False, or the
        prepared directory is corrupt (unreadable metadata or missing record files).
    """
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    name, _, config = dataset.partition("/")
    name, _, name_version = name.partition(":")
    config, _, version = config.partition(":")
    version = version or name_version
    cls = _builder_class(name)
    kwargs = {"data_dir": data_dir, "file_format": "array_record", **builder_kwargs}
    chosen = None
    if config:
        known = {c.name: c for c in cls.BUILDER_CONFIGS}
        if config not in known:
            raise DatasetError(f"unknown config {config!r} for dataset {name!r}; known: {list(known)}")
        kwargs["config"] = config
        chosen = known[config]
    elif getattr(cls, "BUILDER_CONFIGS", None):
        chosen = next((c for c in cls.BUILDER_CONFIGS
                       if c.name == getattr(cls, "DEFAULT_CONFIG_NAME", None)), cls.BUILDER_CONFIGS[0])
    if version:
        versions = _versions(cls, chosen)
        if version not in versions:
            raise DatasetError(f"dataset {dataset!r}: no version {version!r}; "
                               f"versions: {', '.join(versions)}")
        kwargs["version"] = version
    builder = _construct(cls, kwargs, dataset, data_dir)
    if not build:
        if not builder.is_prepared():
            raise DatasetError(
                f"dataset {dataset!r} is not prepared in {data_dir} (expected {builder.data_dir})"
            )
        if _source_changed(builder):
            raise DatasetError(
                f"dataset {dataset!r} in {builder.data_dir} was built from other source files than "
                "the current ones; rebuild it (delete that directory, or allow building)"
            )
    elif not builder.is_prepared() or _source_changed(builder):
        # Two runs on one data directory (the reproduction study's parallel stages) must not
        # build the same dataset at once: the second waits, then finds it built.
        with _build_lock(data_dir, dataset):
            builder = _construct(cls, kwargs, dataset, data_dir)
            if builder.is_prepared() and _source_changed(builder):
                print(f"Dataset {dataset!r}: its source files changed since {builder.data_dir} was "
                      "built; rebuilding", file=sys.stderr)
                shutil.rmtree(builder.data_dir)
                builder = _construct(cls, kwargs, dataset, data_dir)
            if not builder.is_prepared():
                # The builder (data_pipelines.local_builder) says what it builds and from what.
                if manual_dir:
                    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                        manual_dir=os.path.expanduser(manual_dir)))
                else:
                    builder.download_and_prepare()
    _check_files(builder, dataset)
    return builder


def _versions(cls, config) -> list[str]:
    """The versions a builder (config) can build, current first."""
    current = (config.version if config is not None and config.version else None) or cls.VERSION
    older = (config.supported_versions if config is not None and config.version
             else getattr(cls, "SUPPORTED_VERSIONS", []))
    return [str(v) for v in [current, *older]]


def _construct(cls, kwargs: dict, dataset: str, data_dir: str):
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001  (TFDS raises many types on a corrupt info file)
        raise DatasetError(
            f"dataset {dataset!r} in {data_dir} is corrupt: cannot read its metadata ({e}). "
            "Delete that directory to rebuild it."
        ) from e


def _source_changed(builder) -> bool:
    return builder.is_prepared() and getattr(builder, "source_changed", lambda: False)()


@contextlib.contextmanager
def _build_lock(data_dir: str, dataset: str):
    """An exclusive lock on building ``dataset`` in ``data_dir`` (released when the process
    ends, however it ends)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "." + dataset.replace("/", "-") + ".build.lock")
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Dataset {dataset!r}: another process is building it in {data_dir}; waiting",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _check_files(builder, dataset: str) -> None:
    """Fails with a clear message if record files listed in the metadata are absent or empty."""
    for split, info in builder.info.splits.items():
        for path in info.filepaths:
            path = os.fspath(path)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                raise DatasetError(
                    f"dataset {dataset!r} in {builder.data_dir} is corrupt: split {split!r} "
                    f"record file {path} is missing or empty. Delete {builder.data_dir} to rebuild."
                )


def open_split(builder, split: str) -> Any:
    """Random-access data source (``len``, ``[i]``) of one split, with a clear error if absent.

    ``split`` may carry TFDS's slice syntax, e.g. ``"train[:1000]"`` (the first 1,000 examples:
    a random subset where the split is stored in a seeded permutation order, as QM9's is).
    """
    base = split.split("[", 1)[0]
    meta = builder.info.metadata or {}
    if base not in builder.info.splits and base in meta.get("empty_splits", ()):
        raise DatasetError(
            f"split {base!r} of {builder.info.full_name} is empty: its source is too small for "
            f"the split rule (split sizes {meta.get('split_sizes')}); see build_report.json in "
            f"{builder.data_dir}")
    if base not in builder.info.splits:
        raise DatasetError(
            f"split {split!r} not in dataset {builder.info.full_name}; "
            f"available: {sorted(builder.info.splits)}"
        )
    try:
        source = builder.as_data_source(split=split)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001  (TFDS raises several types on a bad slice)
        raise DatasetError(
            f"bad split {split!r} for dataset {builder.info.full_name}: {e}") from e
    if base != split and not len(source):
        raise DatasetError(f"split {split!r} of {builder.info.full_name} selects no example")
    try:
        if len(source):
            source[0]  # Decode one record now, so corruption fails here and not mid-training.
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DatasetError(
            f"cannot read split {split!r} of {builder.info.full_name} in {builder.data_dir}: {e}. "
            "Delete that directory to rebuild it."
        ) from e
    return source


def log_metadata(builder) -> None:
    """Logs the build-time counts (e.g. molecules falling back to Coord noise) once, on process 0."""
    import jax  # noqa: PLC0415  (keeps `import mspec.data.datasets` free of JAX start-up)

    meta = dict(builder.info.metadata or {})
    if meta and jax.process_index() == 0:
        logging.info("dataset %s metadata: %s", builder.info.full_name, meta)
        if "coord_noise_fallback" in meta:
            print(
                f"{builder.info.full_name}: {meta['coord_noise_fallback']} molecules have no "
                f"usable torsion and get Coord noise: {meta.get('torsion_status_counts')}",
                file=sys.stderr,
            )
