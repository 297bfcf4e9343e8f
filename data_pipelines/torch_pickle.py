"""The torch-free ``torch.save`` reader, shared with the model converter; it lives in
:mod:`mspec.io.torch_pickle` (so that ``mspec`` never imports ``data_pipelines``)."""

from mspec.io.torch_pickle import (  # noqa: F401  (re-exported)
    PygObject,
    TorchFileError,
    graph_item,
    load,
    pyg_collated,
)
