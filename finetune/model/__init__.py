"""The network: a pretrained backbone (timm, torchvision classics, LeNet) with verified weights,
its named layer groups, a new head, and the freezing plan that decides what trains.

Imports nothing from data, training or using a model.
"""
