"""The decoding layer: a trained model turned into translations.

``search`` holds greedy and beam search over an abstract scoring protocol (it
never sees ``Seq2Seq``), ``inference`` freezes a model into search's fast path,
``ensemble`` averages several, and ``translator`` turns lines of text into
n-best lists in length-sorted batches. ``sharding`` splits a translation job
over torchrun ranks and ``plotting`` draws attention.
"""
