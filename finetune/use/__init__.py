"""Using a trained model: load a checkpoint, predict, evaluate, export, embed.

Imports nothing from training: a checkpoint carries everything needed to rebuild the model.
"""
