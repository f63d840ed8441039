"""Errors a client caused, with messages that are safe and useful to show them.

Xinference replaces most model-side errors with a generic HTTP 500 so that worker
internals never leak; these carry a message we wrote for the client, and the
registration maps them to an HTTP 400-class answer that keeps the message.
"""

from __future__ import annotations


class Ovis2RequestError(ValueError):
    """Bad input in a chat request: names the message, part, URL or limit at fault."""

    status_code = 400

    def __reduce__(self):
        return (type(self), self.args)


class Ovis2LimitError(Ovis2RequestError):
    """A configured limit (size, pixels, images, frames, context) was exceeded."""

    status_code = 400
