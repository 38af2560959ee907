"""Applications built on vitkit (domain-specific data, post-processing and metrics).

* :mod:`vitkit.apps.peaks` -- Bragg-peak finding in X-ray crystallography detector frames (PeakNet).
"""
