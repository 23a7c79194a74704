"""kvbench: evaluate KV-cache compression methods on LongBench and Needle-in-a-Haystack."""

__version__ = "0.1.0"
