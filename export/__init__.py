"""Export a classifier as an npcam model bundle.

``npcam-export resnet18 --out DIR [--weights FILE]``; the library is :mod:`export.api`,
the command line :mod:`export.__main__`.
"""
