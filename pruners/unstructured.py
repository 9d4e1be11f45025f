"""`--struct none`: classic IMP with global L1 element-wise masks (Frankle & Carbin, 2019)."""
from pruners import STRUCTS
from pruners.base import StructMode


@STRUCTS.register("none")
class Unstructured(StructMode):
    name = "none"
