"""Building blocks shared by detectors: feature grids, coreset selection, nearest-neighbour search, heatmap smoothing."""
