"""Native kernels, compiled on first use (see :mod:`mspec.kernels.build`)."""
