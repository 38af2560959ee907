"""Lightning training of EoMT segmenters: module, optimiser groups and schedules."""

from vitkit.tasks.train.module import SegmentationModule
from vitkit.tasks.train.schedule import layerwise_param_groups, warmup_decay_lambda

__all__ = ["SegmentationModule", "layerwise_param_groups", "warmup_decay_lambda"]
