"""Base class of mspec's TFDS builders: they read local files only (nothing is ever downloaded).

What it adds to :class:`tfds.core.GeneratorBasedBuilder`, shared by every builder in
``data_pipelines``:

* honest log lines: TFDS prints "Downloading and preparing dataset Unknown size (download:
  Unknown size, ...)" before a build and, through ``is_prepared``, warns "Variant folder ... has no
  dataset_info.json" for every dataset not built yet; both read like a failed download. Here a
  build says once what it builds, where, and that it reads local files;
* ``build_report.json`` beside every prepared dataset (the builder's ``_report`` dict: counts,
  skips, fallbacks, split sizes);
* :meth:`LocalBuilder.drop_empty_splits`: a source too small for the split rule (a handful of
  molecules, a short rMD17 split file) gives a dataset without the empty splits, recorded as
  ``empty_splits`` in the metadata, instead of TFDS's "No examples were yielded" after the whole
  build; :func:`mspec.data.datasets.open_split` names such a split and why it is absent.
"""

from __future__ import annotations

import json
import os
import sys

import tensorflow_datasets as tfds

REPORT_FILE = "build_report.json"
DATASET_INFO_FILE = "dataset_info.json"


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder whose sources are local files (shipped, pip-installed or the user's)."""

    def is_prepared(self) -> bool:
        # TFDS's version logs a warning for every dataset that is not built yet.
        return os.path.isfile(os.path.join(self.data_dir, DATASET_INFO_FILE))

    def _log_download_bytes(self) -> None:
        print(f"Building dataset {self.name}/{self.builder_config.name} in {self.data_dir} from "
              "local files (nothing is downloaded) ...", file=sys.stderr)

    def _log_download_done(self) -> None:
        print(f"Dataset {self.name}/{self.builder_config.name} prepared in {self.data_dir}",
              file=sys.stderr)

    def download_and_prepare(self, *args, **kwargs):
        """Builds the dataset (if needed), then writes ``build_report.json`` beside it."""
        super().download_and_prepare(*args, **kwargs)
        path = self.write_build_report()
        if path:
            print(f"Build report: {path}", file=sys.stderr)

    def write_build_report(self) -> str | None:
        """Writes ``_report`` (set by ``_split_generators``) as ``build_report.json`` next to the
        prepared dataset; None when nothing was built in this process."""
        report = getattr(self, "_report", None)
        if report is None:
            return None
        path = os.path.join(self.data_dir, REPORT_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)
        return path

    def drop_empty_splits(self, splits: dict) -> dict:
        """``splits`` (name -> examples) without the empty ones, which are reported.

        TFDS cannot write an empty split: it fails with "No examples were yielded" once the rest
        has been built. An empty split is a legitimate outcome of a split rule on a small source,
        so it is left out, printed, and listed as ``empty_splits`` in the metadata and in
        ``build_report.json`` (set ``_report`` before calling this).
        """
        sizes = {name: len(examples) for name, examples in splits.items()}
        empty = [name for name, size in sizes.items() if size == 0]
        if not empty:
            return splits
        if len(empty) == len(splits):
            raise ValueError(f"{self.name}/{self.builder_config.name}: every split would be empty "
                             f"({sizes})")
        print(f"{self.name}/{self.builder_config.name}: split(s) {', '.join(empty)} would be "
              f"empty (the source is too small for the split rule: {sizes}) and are left out "
              "of the dataset", file=sys.stderr)
        self.info.metadata["empty_splits"] = empty
        if getattr(self, "_report", None) is not None:
            self._report["empty_splits"] = empty
        return {name: examples for name, examples in splits.items() if sizes[name]}
