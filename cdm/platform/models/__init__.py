"""Models out: weights as the registry stores them (`weights`), the MLflow registry with provenance tags and
aliases (`registry`) and its cleanup and hard purge (`cleanup`), the serving invariant every load goes through
(`gate`), shard plans and training (`shards`, `text_models`), composite versions (`composites`), the shared base
(`pretrain`), MLflow pyfunc serving (`serving`, `text_serving`), and the files the DVC pipeline tracks
(`pipeline_files`).

May import: `workspace`, `stack`, `data`.
"""
