"""Train a tiny LLaVA on the CIFAR-10 VQA set generated from ../shared/data (vlm/pretrain.py; docs/vlm.md)."""
import sys

from vlm.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
