"""Struct modes (how each round's masks are chosen), behind one registry.

Adding a mode means adding one file that registers a StructMode subclass.
"""
from utils.registry import Registry

STRUCTS: Registry = Registry("struct mode", "--struct")

from pruners import lowrank, merge, refill, regroup, rsst, token, unstructured  # noqa: E402,F401  (registration)


def create_struct(config):
    return STRUCTS[config.struct](config)
