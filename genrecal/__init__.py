"""genrecal: cross-architecture distillation of vision-language models.

The installed namespace holds three packages, ``genrecal.extract`` (teacher pass),
``genrecal.store`` (cache format, datasets, model loading) and ``genrecal.train``
(trainer), plus this thin package with the command line and the config schema.
"""

__version__ = "0.1.0"
