"""Audio: decoding through FFmpeg (in-process and CLI), where a clip's bytes come from (a file, a URL, a tar
member, a Parquet row), whether a file still holds the audio its record names, and the crop/view policy.
Imports only the bottom floor (files, errors, manifests)."""
