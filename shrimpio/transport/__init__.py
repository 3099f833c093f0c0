"""asyncio over shrimpio connections (transports, the uvloop-based loop).

Empty until the asyncio layer lands; see docs/ and the design notes.
"""

__all__: list[str] = []
