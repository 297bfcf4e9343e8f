"""Reading and writing model files from other codebases (torch-free).

* :mod:`mspec.io.torch_pickle`: ``torch.save`` files (``.pt``, Lightning ``.ckpt``) as numpy.
* :mod:`mspec.io.torch_et`: torchmd-net / Frad / MolSpectra ET checkpoints -> mspec parameters.
"""
