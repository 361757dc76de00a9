"""seq2seq: neural machine translation with recurrent networks."""

__version__ = "0.1.0"
