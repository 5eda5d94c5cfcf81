"""Analysis: error metrics and plots, learning curves, MD observables."""
