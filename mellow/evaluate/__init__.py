"""04_eval and using a model: generation and ranking, metrics, run reports (Markdown, plots, HTML), export
and `mellow ask`. Imports train (checkpoints, examples), model, store, encode (for ask) and the bottom floor."""
