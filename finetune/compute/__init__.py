"""Running a network over data fast, for training and for using a model alike: precision and
memory-layout choices per machine (``speed``) and the frozen-backbone feature cache (``features``).

Imports model/ and data/, nothing from training.
"""
