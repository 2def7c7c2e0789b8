"""eldersafe alert engine: the pure core (rules, lifecycle, escalation, pipeline, audit).

Imports no other top-level package of the project: the gateway hands it typed
events and gives it its ports (``alerting.ports``). See ``alerting/README.md``.
"""
