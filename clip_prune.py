"""Zero-shot CLIP evaluation (clip_benchmark) with training-free anchor token pruning.

The original flags --enable_pruning --k_anchors --top_m --alpha --extract_attention
--attention_output, plus every `clip_benchmark eval` flag. See docs/tokens.md.

    python clip_prune.py --model ViT-B-32 --pretrained openai --dataset cifar10 --dataset_root data \
        --task zeroshot_classification --output pruned.json --enable_pruning --k_anchors 10 --top_m 50 --alpha 0.5
"""
import sys

from tokens.clip_eval import main

if __name__ == "__main__":
    sys.exit(main())
