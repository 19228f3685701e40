"""The children's ties: every process below the job dies with it, however it started (the tree
stop, the fork hook and lifeline, the tiny parent, the servers). Imports only ``base``."""
