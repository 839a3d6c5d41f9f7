"""Embedding in a real Postfix: the policy delegation server
(:mod:`.policyd`) and the ``main.cf`` export (:mod:`.export`)."""
