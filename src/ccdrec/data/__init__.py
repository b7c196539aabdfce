"""Block streams: the bundled Yelp and Gowalla streams, the user's own prepared logs, synthetic ones."""

from ccdrec.data.stream import Block, Stream, load_stream

__all__ = ["Block", "Stream", "load_stream"]
