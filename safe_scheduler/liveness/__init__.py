"""A process that stops doing its job is hung, not alive: the stall watchdog, the endpoint no
client can stall, systemd's notifications. Imports ``shutdown``, ``children`` and ``base``."""
