"""Checkpoint formats, strict loading, caches and export."""

from vitkit.weights.export import save_pretrained, to_meta_state_dict
from vitkit.weights.formats import FORMATS, Format, convert, detect_format
from vitkit.weights.hub import resolve_file, resolve_hf, vitkit_home
from vitkit.weights.io import read_checkpoint, read_state_dict
from vitkit.weights.loading import LoadReport, infer_config, inspect, load_weights, read_and_convert

__all__ = ["FORMATS", "Format", "LoadReport", "convert", "detect_format", "infer_config", "inspect", "load_weights",
           "read_and_convert", "read_checkpoint", "read_state_dict", "resolve_file", "resolve_hf", "save_pretrained",
           "to_meta_state_dict", "vitkit_home"]
