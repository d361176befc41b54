"""Bytes in and out: storage (the one place that touches fsspec), image decoding, the decoder process, map files, data sets."""
