"""genrecal.data: input datasets (LLaVA, HF messages) and the synthetic VQA set, for extract/ and train/.

Importing this package is light (no torch, no transformers): readers and the synthetic VQA
generator only pull in ``datasets`` / ``pyarrow`` when they actually read or write a dataset.
"""

from genrecal.data.pipeline_data import ensure_synthetic, read_split, synthetic_dir
from genrecal.data.problems import Skip
from genrecal.data.readers import DatasetRead, iter_dataset, read_dataset
from genrecal.data.sample import Sample, Turn
from genrecal.data.synthetic import make_synthetic_vqa

__all__ = ["DatasetRead", "Sample", "Skip", "Turn", "ensure_synthetic", "iter_dataset",
           "make_synthetic_vqa", "read_dataset", "read_split", "synthetic_dir"]
