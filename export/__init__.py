"""Export a torch ImageNet classifier as an npcam model bundle (needs torch).

``python -m export resnet18 --out DIR [--weights FILE]``; see :mod:`export.__main__`.
"""
