"""Train the vision-token merger, layer pruner and discriminator on a frozen LLaVA (vlm/trainer.py; docs/vlm.md).

    python train_vlm_pruning.py --config configs/vision_token_pruning.yaml --tiny_random steps=20
"""
import sys

from vlm.trainer import main

if __name__ == "__main__":
    sys.exit(main())
