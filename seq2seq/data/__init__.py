"""The data layer: sentence pairs in, padded id tensors out.

Corpora are located and read here (aligned text, TSV, JSONL, hub datasets, the
built-in generated corpus), SentencePiece models are trained and cached, the
training split is encoded once into a memory-mapped token store, and batches are
formed by token budget. Nothing here knows the network: the model layer above
receives ``Batch`` tensors and never a file.
"""
