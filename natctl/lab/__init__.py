"""A network of namespaces that looks like the real deployment (demo, tests, bench).

Only 198.18.0.0/15 and loopback are used; every namespace has a unique name and
is removed on teardown, also after a failure or Ctrl-C.
"""
