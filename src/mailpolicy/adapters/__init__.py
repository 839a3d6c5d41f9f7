"""Adapters: the core bound to the world (SMTP, DNS, delivery, state, replay).

Adapters import the core; the core never imports an adapter.
"""
