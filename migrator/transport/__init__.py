"""Moving the migration stream with trio: TCP and unix sockets, parallel streams, files.

``connect``/``serve`` give a ``Channel`` of events (the handshake done); ``open_file_writer``/
``open_file_reader`` record a source stream as a checkpoint image and play it back.
``client_context``/``server_context`` build the TLS contexts ``connect``/``serve`` take;
``HandshakeLimits`` caps the connections a ``serve`` lets wait to authenticate (token files and
where a receiver keeps its token by default: ``migrator.core.tokens``).
Compression and MACs run in worker threads; memory use is bounded everywhere.
"""

from ._address import Address, parse_address
from ._gate import HandshakeLimits
from ._link import ChannelStats
from .channel import Channel
from .files import FileReader, FileWriter, open_file_reader, open_file_writer
from .net import Acceptor, connect, open_source, serve
from .tls import check_tls_address, client_context, server_context

__all__ = [
    "Acceptor", "Address", "Channel", "ChannelStats", "FileReader", "FileWriter", "HandshakeLimits",
    "check_tls_address", "client_context", "connect", "open_file_reader", "open_file_writer", "open_source",
    "parse_address", "serve", "server_context",
]
