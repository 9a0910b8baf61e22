"""virtstored: the Connection interface served over HTTP (unix sockets and TLS)."""
