"""The cgroup controller (v2 first, v1 fallback) used by every backend.

Installed as ``lmrunner.cgroups`` (the repository keeps this folder at top level).
"""
