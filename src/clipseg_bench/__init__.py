"""clipseg-bench: fine-tuning strategies for text-prompted CLIPSeg on abdominal CT, measured fairly."""

__version__ = "0.1.0"
