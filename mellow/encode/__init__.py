"""01_precompute: the frozen audio encoders, the audio and caption precompute stages and what they share (a
sharded job's report). Imports audio, store, sources (a dataset's settings) and the bottom floor."""
