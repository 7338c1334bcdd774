"""Ray Data callables, one map_batches each: prepare (CPU), infer (model actor), finish (CPU), and
the column names and error kinds they share (columns.py). They know rows and columns, not Ray
scheduling, storage or job files.
"""
