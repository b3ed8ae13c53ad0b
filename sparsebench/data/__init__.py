"""Text corpora (calibration / perplexity) and lm-eval task sets, all from registry packages."""
