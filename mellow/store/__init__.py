"""The embedding store: writer, shard reader, id index, integrity checks (verify, finalize's counts) and the
WebDataset export. Imports audio and the bottom floor; never a stage's package."""
