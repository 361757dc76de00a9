"""The model layer: the network, its CPU kernels, and its files on disk.

``model.py`` reads as the paper (bidirectional GRU encoder, context vector,
attentional GRU decoder, masked loss). ``gru``, ``additive``, ``loss`` and
``softmax`` are speed kernels a first reading may skip. ``ensemble`` holds
several trained models as one module and ``bundle`` saves and loads models with
their tokenizer, so persistence needs nothing from decoding or training.
"""
