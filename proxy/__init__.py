"""meterproxy: a metering, quota-enforcing reverse proxy for LLM APIs."""
import os

# frozenlist's C extension is built as C++ and maps libstdc++ (1.1 MiB of the server's resident
# set, measured) for a list type aiohttp uses for its middleware and signal lists, touched at most
# once per request (~0.3 µs slower in pure Python). Set before aiohttp is imported; a setting the
# user made wins.
os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")
