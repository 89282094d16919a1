"""Long-tailed image datasets (stage 1 and extraction only; stage 2 never imports this)."""
from ltcache.data.augment import hflip
from ltcache.data.dataset import LTDataset, Split, build_dataset, default_data_root
from ltcache.data.profiles import draw_validation, lt_counts, select_indices
from ltcache.data.spec import SOURCE_FORMS, DatasetSpec, parse_source
from ltcache.data.streaming import Batch

__all__ = ["Batch", "DatasetSpec", "LTDataset", "Split", "build_dataset", "default_data_root", "draw_validation",
           "hflip", "lt_counts", "parse_source", "select_indices", "SOURCE_FORMS"]
