"""Physical compaction of structured checkpoints (channels of ResNets, heads and MLP neurons of timm ViTs)
and safe loading of the result: see docs/compact.md.

    load_compact(DIR) -> nn.Module                    arch.json + model.safetensors, nothing unpickled
    structured_cost(model, masks, input_shape) -> {flops_per_image, parameters} with removable structure removed
"""
from compact.families import structured_cost
from compact.files import load_compact

__all__ = ["load_compact", "structured_cost"]
