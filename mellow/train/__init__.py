"""02_align and 03_train: the training loop, its data (examples, token cache, batches), checkpoints, stopping,
tracking, GPU memory and runs. Imports model, store and the bottom floor."""
