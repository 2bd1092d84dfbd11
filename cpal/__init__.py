"""CPAL: Context Prototype-Aware Learning for weakly supervised semantic segmentation.

A library for the pipeline's stages; importing it has no side effects.
"""

__version__ = "0.1.0"
