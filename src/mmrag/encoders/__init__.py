"""The retriever's towers behind one Protocol; see `base.py` for the registry."""

from mmrag.encoders.base import Encoder, EncoderSpec, load_encoder
from mmrag.encoders.mixed import encode_documents, encode_query

__all__ = ["Encoder", "EncoderSpec", "encode_documents", "encode_query", "load_encoder"]
