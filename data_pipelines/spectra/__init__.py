"""Molecular spectra: the stick-spectrum file format, broadening onto the QM9S grids, and (in later
modules) the GFN2-xTB / sTDA computation pipeline."""
