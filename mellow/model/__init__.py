"""The audio-language model: frozen-encoder tokens -> audio projector -> causal LM decoder, the decoders it can
use and their folders. Imports settings and the bottom floor."""
