"""Before anything starts: the job's ``main``, flags, settings read once, the checks that refuse
bad input with one line and exit 2, the wait for a database that does not answer. The top layer:
it may import every layer below."""
