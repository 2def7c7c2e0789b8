"""The notifiers (issue 7, point 6): every notice in the notifications outbox is
delivered, retried or falls back, and every attempt is in the audit chain.

``runner`` claims due rows (``FOR UPDATE SKIP LOCKED``) and feeds them through
``alerting.pipeline``'s stages; one module per channel implements
``alerting.ports.NotifierChannel``: ``console``, ``webhook`` (the bureau's safety
network), ``messaging`` (Apprise), ``voice`` (voice call / SMS provider).
"""
