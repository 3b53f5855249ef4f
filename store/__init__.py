"""genrecal.store: everything extract/ and train/ share.

- ``genrecal.store.vlm``: VLM loading, per-family knowledge, the tiny-VLM kit;
- ``genrecal.store.data``: input datasets (LLaVA / HF messages) and the synthetic VQA set;
- the teacher cache format (schema, writer, reader, inspect, validate).
"""
