"""Private broker and database instances for the demo and the tests.

They run in their own directories on free loopback ports and never touch the
machine's system services.
"""
