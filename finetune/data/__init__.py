"""Data: sources (digits, image folders) -> samples -> albumentations pipelines -> DataModule."""
