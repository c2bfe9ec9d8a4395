"""Backbones, weights loading, the prompted forward pass and prompt modules."""

from pgpcl.models.prompts import PromptPool, Selection, batch_vote, join_layer_prefixes, prefix_split
from pgpcl.models.vit import FeatureOutput, PromptedViT, build_vit
from pgpcl.models.weights import WeightsInfo, load_weights_file, npz_to_state_dict, read_state_dict

__all__ = [
    "FeatureOutput",
    "PromptPool",
    "PromptedViT",
    "Selection",
    "WeightsInfo",
    "batch_vote",
    "build_vit",
    "join_layer_prefixes",
    "load_weights_file",
    "npz_to_state_dict",
    "prefix_split",
    "read_state_dict",
]
