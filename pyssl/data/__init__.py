"""Datasets, transforms and loaders (image folders, built-in offline datasets, multi-crop,
video and LiDAR samples, the synthetic driving world).

Import submodules directly (``from pyssl.data import synthetic_world``); this package
imports nothing on its own so that ``import pyssl`` stays light."""
