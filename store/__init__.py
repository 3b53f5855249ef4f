"""genrecal.store: the teacher cache format: schema and the types it stores, codecs, the manifest,
fingerprints, writer, reader, inspect and validate.
"""
