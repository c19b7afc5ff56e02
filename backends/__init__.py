"""Backends that run logical machines: one module per engine, all behind one protocol.

Installed as ``lmrunner.backends`` (the repository keeps this folder at top level).
"""
